"""Every scan a scanner writes: the same scan saved in each mode and format Pillow opens builds into the same
tiles and masks (``shardgen.scanfile``); 16-bit and float scans scale by their stated ranges and keep
their crust judged on the source values; EXIF orientation is applied; unsupported scans are one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    BOTTOM,
    HAND,
    LEFT,
    RIGHT,
    SCAN_H,
    SCAN_W,
    SIDE,
    TOP,
    assemble,
    build_args,
    cli,
    png16,
    read_split,
    rect,
    tiff16,
    write_xml,
)
from PIL import Image, ImageOps

RNG = np.random.default_rng(13)
CRUST = ((TOP, BOTTOM), (LEFT, RIGHT))
# Colour content drawn from a 256-colour palette whose only black entry is 0, so a palette PNG holds it too.
PALETTE = np.concatenate([np.zeros((1, 3), np.uint8), RNG.integers(1, 256, (255, 3), dtype=np.uint8)])
INDEX = np.pad(RNG.integers(1, 256, (SIDE, SIDE), dtype=np.uint8), CRUST)
RGB8 = PALETTE[INDEX]
GREY8 = np.pad(RNG.integers(1, 256, (SIDE, SIDE), dtype=np.uint8), CRUST)
ALPHA = RNG.integers(0, 256, GREY8.shape, dtype=np.uint8)  # alpha 0 included: crust is judged on colour
BINARY = np.pad(np.where(RNG.random((SIDE, SIDE)) < 0.5, 0, 255).astype(np.uint8), CRUST)
BINARY[TOP, LEFT:-RIGHT] = BINARY[TOP:-BOTTOM, LEFT] = 255  # content reaches its box on every side
BINARY[-BOTTOM - 1, LEFT:-RIGHT] = BINARY[TOP:-BOTTOM, -RIGHT - 1] = 255


def shapes(dx: int = 0, dy: int = 0) -> list[str]:
    """A Pit and a Crystal on the same content pixels when the crust grows by dx columns and dy rows."""
    return [rect("Pit", 20 + dx, 30 + dy, 40 + dx, 50 + dy), rect("Crystal", 5 + dx, 60 + dy, 25 + dx, 70 + dy)]


def expected_mask() -> np.ndarray:
    full = np.zeros((SCAN_H, SCAN_W), np.uint8)
    full[30:51, 20:41] = 9
    full[60:71, 5:26] = 2
    return full[TOP : TOP + SIDE, LEFT : LEFT + SIDE]


def save(pixels: np.ndarray, path: Path, mode: str | None = None, **params) -> None:
    Image.fromarray(pixels, mode).save(path, **params) if mode else Image.fromarray(pixels).save(path, **params)


def save_palette(path: Path, index: np.ndarray, palette: np.ndarray) -> None:
    """A palette (mode P) scan: ``index`` into ``palette`` (256, 3)."""
    im = Image.fromarray(index).convert("P")
    im.putpalette(palette.ravel().tolist())
    im.save(path)


GREY_PALETTE = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
# name -> (reference 8-bit pixels, file name, writer of that scan). Every writer saves the reference.
CASES = {
    "png-rgb": (RGB8, "s.png", lambda p: save(RGB8, p)),
    "png-rgba": (RGB8, "s.png", lambda p: save(np.dstack([RGB8, ALPHA]), p)),
    "png-palette": (RGB8, "s.png", lambda p: save_palette(p, INDEX, PALETTE)),
    "png-rgb16": (RGB8, "s.png", lambda p: p.write_bytes(png16(RGB8.astype(np.uint16) * 257))),
    "png-rgba16": (RGB8, "s.png", lambda p: p.write_bytes(png16(np.dstack([RGB8, ALPHA]).astype(np.uint16) * 257))),
    "tiff-rgb": (RGB8, "s.tif", lambda p: save(RGB8, p)),
    "tiff-rgb-lzw": (RGB8, "s.tiff", lambda p: save(RGB8, p, compression="tiff_lzw")),
    "tiff-rgba": (RGB8, "s.tif", lambda p: save(np.dstack([RGB8, ALPHA]), p)),
    "tiff-rgb16": (RGB8, "s.tif", lambda p: p.write_bytes(tiff16(RGB8.astype(np.uint16) * 257))),
    "tiff-rgb16-be-deflate": (
        RGB8, "s.tif", lambda p: p.write_bytes(tiff16(RGB8.astype(np.uint16) * 257, big_endian=True, deflate=True))
    ),
    "bmp-rgb": (RGB8, "s.bmp", lambda p: save(RGB8, p)),
    "bmp-palette": (RGB8, "s.bmp", lambda p: save_palette(p, INDEX, PALETTE)),
    "png-l": (GREY8, "s.png", lambda p: save(GREY8, p)),
    "png-la": (GREY8, "s.png", lambda p: save(np.dstack([GREY8, ALPHA]), p, "LA")),
    "png-grey-palette": (GREY8, "s.png", lambda p: save_palette(p, GREY8, GREY_PALETTE)),
    "png-i16": (GREY8, "s.png", lambda p: save(GREY8.astype(np.uint16) * 257, p)),
    "png-la16": (GREY8, "s.png", lambda p: p.write_bytes(png16(np.dstack([GREY8, ALPHA]).astype(np.uint16) * 257))),
    "png-1bit": (BINARY, "s.png", lambda p: Image.fromarray(BINARY).convert("1").save(p)),
    "tiff-l": (GREY8, "s.tif", lambda p: save(GREY8, p)),
    "tiff-i16": (GREY8, "s.tif", lambda p: save(GREY8.astype(np.uint16) * 257, p)),
    "tiff-i32": (GREY8, "s.tif", lambda p: save(GREY8.astype(np.int32) * 257, p, "I")),
    "tiff-float": (GREY8, "s.tif", lambda p: save(GREY8.astype(np.float32) / 255, p, "F")),
    "bmp-l": (GREY8, "s.bmp", lambda p: save(GREY8, p)),
}
JPEG_TOLERANCE = 6  # grey levels: quality 100 still rounds the DCT of noise-like content


def build_one(tmp_path: Path, capsys, name: str, write, channels: int, size=(SCAN_W, SCAN_H), dx=0, dy=0):
    """Write one scan with ``write``, build it at scale 1 and return (image, mask, meta, stdout)."""
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    write(data / "images" / name)
    write_xml(data / "annotations" / "ann.xml", [(name, shapes(dx, dy))], size=size)
    rc, out, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND, "--channels", channels))
    assert rc == 0, err
    samples = read_split(tmp_path / "out", "train")
    return assemble(samples, "image.png"), assemble(samples, "mask.png"), json.loads(samples[0]["json"]), out


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_mode_and_format_builds_the_same_tiles_and_masks(tmp_path, capsys, case, channels):
    reference, name, write = CASES[case]
    image, mask, meta, _ = build_one(tmp_path, capsys, name, write, channels)
    content = reference[TOP : TOP + SIDE, LEFT : LEFT + SIDE]
    expected = np.asarray(Image.fromarray(content).convert("L" if channels == 1 else "RGB"))
    assert image.shape == expected.shape
    np.testing.assert_array_equal(image, expected)
    assert meta["crop_box"] == [LEFT, TOP, LEFT + SIDE, TOP + SIDE] and meta["source_size"] == [SCAN_W, SCAN_H]
    np.testing.assert_array_equal(mask, expected_mask())


# JPEG's loss reaches every 8x8 block that touches the content, so its near-black values would be content
# (crust is exact zero): the JPEG scan has its crust on block boundaries, 8 rows and 16 columns on each side.
JPEG_CRUST = ((8, 8), (16, 16))


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("reference", ["grey", "rgb"])
def test_jpeg_scans_build_the_same_masks_and_tiles_within_their_loss(tmp_path, capsys, reference, channels):
    pixels = {"grey": GREY8, "rgb": RGB8}[reference][TOP : TOP + SIDE, LEFT : LEFT + SIDE]
    scan = np.pad(pixels, JPEG_CRUST + ((0, 0),) * (pixels.ndim - 2))
    size = (scan.shape[1], scan.shape[0])

    def write(path):
        Image.fromarray(scan).save(path, quality=100, subsampling=0)

    image, mask, meta, _ = build_one(tmp_path, capsys, "j.jpg", write, channels, size, dx=16 - LEFT, dy=8 - TOP)
    assert meta["crop_box"] == [16, 8, 16 + SIDE, 8 + SIDE]
    np.testing.assert_array_equal(mask, expected_mask())
    expected = np.asarray(Image.fromarray(pixels).convert("L" if channels == 1 else "RGB"))
    assert np.abs(image.astype(int) - expected).max() <= JPEG_TOLERANCE


def scaled16(values: np.ndarray) -> np.ndarray:
    return np.floor(values.astype(np.float64) * 255 / 65535 + 0.5).astype(np.uint8)


@pytest.mark.parametrize(
    "name, write, channels",
    [
        ("g.png", lambda p, v: Image.fromarray(v[..., 0]).save(p), 1),
        ("g.tif", lambda p, v: Image.fromarray(v[..., 0]).save(p), 1),
        ("c.png", lambda p, v: p.write_bytes(png16(v)), 3),
        ("c.tif", lambda p, v: p.write_bytes(tiff16(v)), 3),
    ],
)
def test_16bit_scans_scale_by_the_full_range(tmp_path, capsys, name, write, channels):
    """round(v * 255 / 65535) for every 16-bit value: not clipped to white (Pillow's I;16 -> L), not the high
    byte (Pillow's 16-bit colour). Crust is judged before scaling: a column of 1..128 is content."""
    h, w = 3 + SIDE + 1, 1 + SIDE + 2  # crust: 3 rows above, 1 below, 1 column left, 2 right
    values = np.zeros((h, w, 3), np.uint16)
    values[3:-1, 1:-2] = RNG.integers(0, 65536, (SIDE, SIDE, 3), dtype=np.uint16)
    values[3:-1, 1] = 0
    values[3:-1, 1, 2] = RNG.integers(1, 129, SIDE)  # rounds to 0, but is not crust
    if channels == 1:
        values[...] = values[..., 2:]
    image, _, meta, _ = build_one(tmp_path, capsys, name, lambda p: write(p, values), channels, size=(w, h))
    assert meta["crop_box"] == [1, 3, 1 + SIDE, 3 + SIDE]
    crop = values[3:-1, 1:-2] if channels == 3 else values[3:-1, 1:-2, 0]
    np.testing.assert_array_equal(image, scaled16(crop))
    assert not image[:, 0].any()  # the column that is content at 16 bits is black at 8


def test_float_scans_scale_by_their_stated_range(tmp_path, capsys):
    """F scans hold 0..1 and scale as round(v * 255); 1e-4 rounds to 0 but is not crust."""
    values = np.pad(RNG.random((SIDE, SIDE), dtype=np.float32), ((TOP, BOTTOM), (1, 2)))
    values[TOP:-BOTTOM, 1] = 1e-4
    image, _, meta, _ = build_one(tmp_path, capsys, "f.tif", lambda p: Image.fromarray(values, "F").save(p), 1,
                                  size=(values.shape[1], values.shape[0]))  # fmt: skip
    assert meta["crop_box"] == [1, TOP, 1 + SIDE, TOP + SIDE]
    np.testing.assert_array_equal(image, np.rint(values[TOP:-BOTTOM, 1:-2] * 255))
    assert not image[:, 0].any()


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["png", "tif", "jpg"])
def test_exif_orientation_is_applied(tmp_path, capsys, orientation, fmt):
    """A camera stores the sensor's pixels and an orientation; the XML (like CVAT) sees the upright scan."""
    inverse = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
               5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
               8: Image.Transpose.ROTATE_270}  # fmt: skip
    content = RGB8[TOP : TOP + SIDE, LEFT : LEFT + SIDE]
    upright = Image.fromarray(np.pad(content, (*JPEG_CRUST, (0, 0))))
    stored = upright.transpose(inverse[orientation]) if orientation > 1 else upright
    exif = Image.Exif()
    exif[0x0112] = orientation
    assert np.array_equal(np.asarray(ImageOps.exif_transpose(_with_exif(stored, exif))), np.asarray(upright))

    def write(path):
        if fmt == "tif":  # TIFF keeps the orientation among its own tags
            stored.save(path, tiffinfo={0x0112: orientation})
        else:
            stored.save(path, exif=exif.tobytes(), **({"quality": 100, "subsampling": 0} if fmt == "jpg" else {}))

    image, mask, meta, _ = build_one(tmp_path, capsys, f"o.{fmt}", write, 3, upright.size, 16 - LEFT, 8 - TOP)
    assert meta["crop_box"] == [16, 8, 16 + SIDE, 8 + SIDE] and meta["source_size"] == list(upright.size)
    if fmt == "jpg":
        assert np.abs(image.astype(int) - content).max() <= JPEG_TOLERANCE
    else:
        np.testing.assert_array_equal(image, content)
    np.testing.assert_array_equal(mask, expected_mask())


def _with_exif(image: Image.Image, exif: Image.Exif) -> Image.Image:
    """``image`` carrying ``exif``, as Pillow's own ``exif_transpose`` reads it (the reference above)."""
    copy = image.copy()
    copy.info["exif"] = exif.tobytes()
    return copy


@pytest.mark.parametrize(
    "name, write, reason",
    [
        ("c.tif", lambda p: Image.fromarray(RGB8).convert("CMYK").save(p), "unsupported image mode CMYK"),
        ("c.jpg", lambda p: Image.fromarray(RGB8).convert("CMYK").save(p), "unsupported image mode CMYK"),
        ("g.gif", lambda p: Image.fromarray(GREY8).save(p), "unsupported image format GIF"),
        ("f.tif", lambda p: Image.fromarray(GREY8.astype(np.float32), "F").save(p),
         "mode F scan holds 0..255; float scans must hold 0..1"),
        ("i.tif", lambda p: Image.fromarray(GREY8.astype(np.int32) - 1, "I").save(p),
         "mode I scan holds -1..254; 32-bit integer scans must hold 0..65535"),
    ],
)  # fmt: skip
def test_a_scan_without_a_defined_reading_is_a_one_line_error(tmp_path, capsys, name, write, reason):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    write(data / "images" / name)
    write_xml(data / "annotations" / "ann.xml", [(name, shapes())])
    rc, _, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND))
    assert rc == 2
    assert err.startswith(f"shardgen: error: {data / 'images' / name}: {reason}")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out" / "manifest.json").exists()
