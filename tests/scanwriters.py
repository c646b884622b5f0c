"""Writers for scan files Pillow cannot write: 16-bit-per-channel PNG and TIFF (48-bit RGB, 64-bit RGBA,
32-bit grey+alpha), byte for byte as the specifications lay them out, so tests can feed them to the reader."""

from __future__ import annotations

import struct
import zlib

import numpy as np

PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type (grey, grey+alpha, RGB, RGBA)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png16(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of (H, W) or (H, W, C) uint16 values. Rows use the Sub filter, which depends on the bytes
    per pixel, so a reader that unfilters with the wrong pixel size gets other values."""
    a = pixels if pixels.ndim == 3 else pixels[..., None]
    h, w, c = a.shape
    bpp = 2 * c
    rows = []
    for row in a:
        raw = np.frombuffer(row.astype(">u2").tobytes(), np.uint8).astype(np.int16)
        sub = raw.copy()
        sub[bpp:] = (raw[bpp:] - raw[:-bpp]) % 256
        rows.append(b"\x01" + sub.astype(np.uint8).tobytes())
    header = struct.pack(">IIBBBBB", w, h, 16, PNG_COLOUR_TYPES[c], 0, 0, 0)
    body = _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def tiff16(pixels: np.ndarray, big_endian: bool = False, deflate: bool = False) -> bytes:
    """A one-strip 16-bit RGB TIFF of (H, W, 3) uint16 values, uncompressed or Adobe deflate."""
    h, w, c = pixels.shape
    e = ">" if big_endian else "<"
    data = pixels.astype(e + "u2").tobytes()
    data = zlib.compress(data) if deflate else data
    n_tags = 10
    bits_at = 8 + 2 + 12 * n_tags + 4  # BitsPerSample values follow the IFD, then the strip
    strip_at = bits_at + 2 * c
    tags = [  # (tag, type: 3 SHORT / 4 LONG, count, value or offset)
        (256, 3, 1, w), (257, 3, 1, h), (258, 3, c, bits_at), (259, 3, 1, 8 if deflate else 1), (262, 3, 1, 2),
        (273, 4, 1, strip_at), (277, 3, 1, c), (278, 3, 1, h), (279, 4, 1, len(data)), (284, 3, 1, 1),
    ]  # fmt: skip
    out = bytearray((b"MM" if big_endian else b"II") + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", n_tags))
    for tag, kind, count, value in tags:
        if kind == 3 and count == 1:
            out += struct.pack(e + "HHIHH", tag, kind, count, value, 0)
        else:
            out += struct.pack(e + "HHII", tag, kind, count, value)
    out += struct.pack(e + "I", 0) + struct.pack(e + "H" * c, *([16] * c)) + data
    return bytes(out)


def huge_png(width: int, height: int) -> bytes:
    """A valid 1-bit all-white PNG of any size, compressed row by row: a 20000 x 20000 scan is ~60 KB on disk
    (and 400 MB once decoded by Pillow, which stores 1-bit images a byte a pixel)."""
    row = b"\x00" + b"\xff" * ((width + 7) // 8)
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
