"""Reading a scan file: PNG, JPEG, TIFF or BMP in any mode Pillow opens, at its source bit depth.

``read_scan`` returns the scan's colour channels as they are stored (uint8, uint16 or float32; (H, W) grey
or (H, W, 3) colour), upright, so that the crust can be judged on the source values (exact zero) before
``to_8bit`` scales them. The rules, also in docs/data-format.md:

- Formats: PNG, JPEG (also MPO), TIFF and BMP; any other file is a ``ScanError`` naming its format.
- Size: checked from the header before anything is decoded. A scan of more than ``max_pixels`` pixels is a
  ``ScanError`` naming the file and its size; Pillow's own decompression-bomb check is replaced by this one
  so the error names the file and the limit can be raised deliberately (``--max-pixels``).
- Orientation: the EXIF orientation (JPEG, TIFF, a PNG eXIf chunk before the pixel data) is applied, as
  CVAT applies it when it shows the image; the size an XML states is the upright size.
- Modes: 1 and L as they are; P and PA expanded through the palette; RGBA, RGBX, LA and PA lose the alpha
  (crust is judged on the colour channels); YCbCr becomes RGB. 16-bit grey and colour keep all 16 bits
  (Pillow keeps only the high byte of 16-bit colour, so those are read at full depth here) and scale by the
  full range, ``round(v * 255 / 65535)``: an 8-bit image saved as 16-bit (``v * 257``) reads back exactly.
  Mode I (32-bit integer) must hold 0..65535 and scales like 16-bit; mode F (32-bit float) must hold 0..1
  and scales as ``round(v * 255)``. Values outside those ranges, and modes without a defined grey or RGB
  reading (CMYK, LAB, HSV, ...), are a ``ScanError`` naming the file and the mode, never a guess.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from PIL import ExifTags, Image

FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "TIFF": "TIFF", "BMP": "BMP"}  # Pillow name -> ours
SCAN_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")  # matched case-insensitively
# Pillow's own decompression-bomb error limit (2 x Image.MAX_IMAGE_PIXELS), e.g. 13,377 x 13,377 pixels.
DEFAULT_MAX_PIXELS = 178_956_970
GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
RGB_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "YCbCr")  # read through Pillow's convert("RGB")
MAX_16 = 65535
_ROWS_PER_BLOCK = 1024  # rows scaled at a time, so 16-bit scaling needs no full-size 32-bit temporary
# Pillow's ``exif_transpose`` operations by EXIF orientation, as numpy index operations on (H, W[, C]).
_ORIENT = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.swapaxes(0, 1),  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270 (90 degrees clockwise)
    7: lambda a: a[::-1, ::-1].swapaxes(0, 1),  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90
}


class ScanError(ValueError):
    """A scan that cannot be used; the message names the file and the reason."""


def max_pixels_arg(text: str) -> int:
    """The ``--max-pixels`` argument of ``shardgen build`` and ``evaluate predict``: a positive integer."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"--max-pixels {text!r} is not a positive integer")
    return value


@contextmanager
def _opened(source, name: str, max_pixels: int) -> Iterator[Image.Image]:
    """The scan opened (header only), its format and pixel count checked."""
    saved = Image.MAX_IMAGE_PIXELS
    # Our limit below replaces Pillow's, which raises an anonymous error before the size can be reported.
    # The scan readers run one at a time per process (build workers are processes), so this is not raced.
    Image.MAX_IMAGE_PIXELS = None
    try:
        try:
            im = Image.open(source)
        except Image.UnidentifiedImageError:  # its message names the stream object, not the file
            raise ScanError(f"{name}: not an image Pillow can identify (PNG, JPEG, TIFF or BMP)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ScanError(f"{name}: corrupt or truncated image: {e}") from None
        with im:
            if im.format not in FORMATS:
                raise ScanError(f"{name}: unsupported image format {im.format} (scans are PNG, JPEG, TIFF or BMP)")
            w, h = im.size
            if w * h > max_pixels:
                raise ScanError(
                    f"{name}: scan is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,} "
                    "(raise it with --max-pixels if the scan is genuine)"
                )
            yield im
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _orientation(im: Image.Image, name: str) -> int:
    """The EXIF orientation (1..8) read without decoding the pixels; 1 when there is none."""
    try:
        if im.format == "PNG":  # PngImageFile.getexif() decodes the image to look for an eXIf after IDAT
            exif = Image.Exif()
            if "exif" in im.info:
                exif.load(im.info["exif"])
        else:
            exif = im.getexif()
        value = exif.get(ExifTags.Base.Orientation, 1)
    except (OSError, SyntaxError, ValueError, TypeError) as e:
        raise ScanError(f"{name}: unreadable EXIF data: {e}") from None
    return value if value in _ORIENT else 1


def scan_size(path, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of a scan as shown upright, from its header: format, mode and size are checked and
    nothing is decoded."""
    with _opened(path, name, max_pixels) as im:
        _check_mode(im, name)
        w, h = im.size
        if im.format == "TIFF":  # newer Pillows report a TIFF's upright size already: start from the stored one
            w, h = im.tag_v2.get(256, w), im.tag_v2.get(257, h)
        return (h, w) if _orientation(im, name) >= 5 else (w, h)


def _check_mode(im: Image.Image, name: str) -> None:
    if im.mode not in (*GREY16_MODES, "I", "F", "1", "L", "LA", *RGB_MODES):
        raise ScanError(
            f"{name}: unsupported image mode {im.mode}: only grey, palette, RGB(A) and 16-bit or float grey "
            "scans have a defined reading (convert the scan to RGB)"
        )


def read_scan(data: bytes, name: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """The scan's colour channels at source depth, upright: (H, W) or (H, W, 3) of uint8, uint16 or float32."""
    with _opened(io.BytesIO(data), name, max_pixels) as im:
        _check_mode(im, name)
        try:
            pixels = _decode(im, data, name)
        except ScanError:
            raise
        except (OSError, SyntaxError, ValueError) as e:
            raise ScanError(f"{name}: corrupt or truncated image: {e}") from None
        # Read after decoding: newer Pillows turn a TIFF upright while loading it and then drop its tag.
        orientation = _orientation(im, name)
    if orientation != 1:
        pixels = np.ascontiguousarray(_ORIENT[orientation](pixels))
    return pixels


def _rawmode(tile) -> str:
    return tile.args[0] if isinstance(tile.args, tuple) else tile.args


def _decode(im: Image.Image, data: bytes, name: str) -> np.ndarray:
    mode = im.mode
    rawmodes = {_rawmode(t) for t in im.tile}
    if mode in ("RGB", "RGBA") and any(";16" in r for r in rawmodes):
        return _colour16(im, data, name)
    if mode in GREY16_MODES:
        return np.asarray(im).astype(np.uint16)
    if mode == "I":
        values = np.asarray(im)
        lo, hi = (int(values.min()), int(values.max())) if values.size else (0, 0)
        if lo < 0 or hi > MAX_16:
            raise ScanError(f"{name}: mode I scan holds {lo}..{hi}; 32-bit integer scans must hold 0..65535")
        return values.astype(np.uint16)
    if mode == "F":
        values = np.asarray(im)
        finite = bool(np.isfinite(values).all())
        lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if not finite or lo < 0 or hi > 1:
            found = "non-finite values" if not finite else f"{lo:g}..{hi:g}"
            raise ScanError(f"{name}: mode F scan holds {found}; float scans must hold 0..1")
        return values.astype(np.float32)
    if mode in ("1", "L", "LA"):
        return np.asarray(im.convert("L"))  # 1 becomes 0/255; LA drops the alpha
    return np.asarray(im.convert("RGB"))  # palette expanded, alpha dropped, YCbCr converted


def _swapped(rawmode: str) -> str:
    """The same 16-bit raw mode read with the other byte order: Pillow unpacks its high byte, our low byte."""
    order = rawmode[-1]
    if order == "N":
        order = "L" if sys.byteorder == "little" else "B"
    return rawmode[:-1] + ("B" if order == "L" else "L")


def _colour16(im: Image.Image, data: bytes, name: str) -> np.ndarray:
    """16-bit RGB(A) or grey+alpha at full depth: Pillow unpacks only the high byte of each sample, so the
    pixel data is unpacked a second time with the byte order swapped, which yields the low bytes."""
    rawmodes = {_rawmode(t) for t in im.tile}
    if rawmodes == {"LA;16B"}:  # PNG 16-bit grey+alpha: 4 bytes a pixel, exactly what 8-bit RGBA unpacks
        im.tile = [t._replace(args="RGBA") for t in im.tile]
        raw = np.asarray(im)
        return (raw[..., 0].astype(np.uint16) << 8) | raw[..., 1]
    high = np.asarray(im)
    with Image.open(io.BytesIO(data)) as low_im:
        try:
            low_im.tile = [
                t._replace(args=(_swapped(t.args[0]), *t.args[1:]) if isinstance(t.args, tuple) else _swapped(t.args))
                for t in low_im.tile
            ]
            low = np.asarray(low_im)
        except ValueError as e:  # Pillow has no unpacker for the swapped raw mode
            raw = ", ".join(sorted(rawmodes))
            raise ScanError(f"{name}: 16-bit mode {im.mode} ({raw}) cannot be read at full depth: {e}") from None
    return ((high[..., :3].astype(np.uint16) << 8) | low[..., :3]).astype(np.uint16)


def to_8bit(pixels: np.ndarray) -> np.ndarray:
    """Source pixels -> uint8: 16-bit as round(v * 255 / 65535), float 0..1 as round(v * 255)."""
    if pixels.dtype == np.uint8:
        return pixels
    out = np.empty(pixels.shape, np.uint8)
    for y in range(0, pixels.shape[0], _ROWS_PER_BLOCK):
        block = pixels[y : y + _ROWS_PER_BLOCK]
        if pixels.dtype == np.uint16:
            out[y : y + _ROWS_PER_BLOCK] = (block.astype(np.uint32) * 255 + MAX_16 // 2) // MAX_16
        else:
            out[y : y + _ROWS_PER_BLOCK] = np.rint(block * np.float32(255))
    return out
