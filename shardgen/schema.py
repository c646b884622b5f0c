"""The shard schema and manifest: the public contract between shardgen, trainer and evaluate.

Shards are ``URL/{split}-{000000..}.tar``. Each sample's ``__key__`` is ``{image_id}_{i}_{j}`` and it holds
``image.png`` (8-bit L, or RGB with ``--channels 3``), ``mask.png`` (8-bit class ids, 255 = ignore) and
``json`` (tile metadata). The 25 tiles of an image are consecutive in one shard. ``URL/manifest.json`` is
written last; a dataset without one is incomplete.
"""

from __future__ import annotations

import io
import json
from pathlib import PurePath

import numpy as np
from PIL import Image

from . import storage

FORMAT = "diamond-defect-shards"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
IMAGE_KEY = "image.png"
MASK_KEY = "mask.png"
META_KEY = "json"


class ManifestError(ValueError):
    """A manifest that is missing, unreadable or of another format."""


def image_id_of(file_name: str) -> str:
    """The image id is the file stem with '.' replaced by '-' (keys may not contain dots)."""
    return PurePath(file_name).stem.replace(".", "-")


def sample_key(image_id: str, i: int, j: int) -> str:
    return f"{image_id}_{i}_{j}"


def parse_key(key: str) -> tuple[str, int, int]:
    """(image_id, i, j) of a sample key; ValueError if it is not ``{image_id}_{i}_{j}``."""
    image_id, i, j = key.rsplit("_", 2)
    return image_id, int(i), int(j)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def encode_png(pixels: np.ndarray, compress_level: int = 1) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def _decode_l_into(im: Image.Image, out: np.ndarray) -> None:
    """Let PIL's PNG decoder write an L image straight into ``out`` (C-contiguous, the image's shape):
    ``Image.frombuffer`` maps ``out``'s memory as a PIL image and the decoder fills it, with no copy."""
    im.im = Image.frombuffer("L", im.size, out, "raw", "L", 0, 1).im
    im.load()


def _direct_decode_works() -> bool:
    """Whether this Pillow decodes into a mapped buffer as ``_decode_l_into`` expects (checked once)."""
    pixels = np.arange(7 * 5, dtype=np.uint8).reshape(7, 5) * 7
    out = np.zeros_like(pixels)
    try:
        with Image.open(io.BytesIO(encode_png(pixels))) as im:
            _decode_l_into(im, out)
    except Exception:
        return False
    return bool((out == pixels).all())


DIRECT_DECODE = _direct_decode_works()


def decode_png(data: bytes, out: np.ndarray | None = None) -> np.ndarray:
    """PNG bytes -> uint8 array with the exact stored values: (H, W) for L, (H, W, 3) for RGB.

    With ``out`` (a writable uint8 array of that shape; ValueError if it differs), the pixels are decoded
    into it: an L image straight from the decoder, with no intermediate copy (the training loader decodes
    into its shared-memory batches this way).
    """
    with Image.open(io.BytesIO(data)) as im:
        if im.mode not in ("L", "RGB"):
            raise ValueError(f"unexpected PNG mode {im.mode} (shards hold L or RGB)")
        shape = (im.height, im.width) if im.mode == "L" else (im.height, im.width, 3)
        if out is None:
            out = np.empty(shape, np.uint8)
        elif out.shape != shape:
            raise ValueError(f"a PNG of shape {shape} does not fit the buffer's {out.shape}")
        if im.mode == "L" and DIRECT_DECODE and out.flags.c_contiguous:
            _decode_l_into(im, out)
        else:  # PIL holds RGB as 4 bytes per pixel: one copy out of its own memory
            out[...] = np.asarray(im)
        return out


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_shape(data: bytes) -> tuple[int, ...] | None:
    """The array shape ``decode_png`` returns for ``data``, read from the IHDR header alone; None for
    anything but an 8-bit L or RGB PNG (``decode_png`` then says what is wrong)."""
    if len(data) < 26 or data[:8] != PNG_SIGNATURE or data[12:16] != b"IHDR" or data[24] != 8:
        return None
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return {0: (height, width), 2: (height, width, 3)}.get(data[25])


def decode_sample(sample: dict, image_out: np.ndarray | None = None, mask_out: np.ndarray | None = None):
    """A raw webdataset sample -> (image (C, H, W) uint8, mask (H, W) uint8, meta).

    Masks are decoded by PIL from mode L as stored, never through webdataset's "l"/"pil" decoders, which
    rescale values. ``image_out`` (C, H, W) and ``mask_out`` (H, W), when given, receive the pixels.
    """
    if image_out is None:
        image = decode_png(sample[IMAGE_KEY])
        image = image[None] if image.ndim == 2 else np.ascontiguousarray(image.transpose(2, 0, 1))
    elif image_out.shape[0] == 1:
        image = image_out
        decode_png(sample[IMAGE_KEY], image_out[0])
    else:
        image = image_out
        image_out[...] = decode_png(sample[IMAGE_KEY]).transpose(2, 0, 1)
    mask = decode_png(sample[MASK_KEY], mask_out)
    meta = sample[META_KEY]
    meta = json.loads(meta) if isinstance(meta, (bytes, str)) else meta
    return image, mask, meta


def manifest_url(url: str) -> str:
    """Accept either a dataset root or the manifest itself."""
    return url if url.endswith(".json") else storage.join(url, MANIFEST_NAME)


def root_of(manifest: str) -> str:
    return manifest.rsplit("/", 1)[0] if "/" in manifest else "."


def read_manifest(url: str) -> dict:
    """Load and validate ``manifest.json`` (``url`` is the dataset root or the manifest's own URL)."""
    murl = manifest_url(url)
    try:
        text = storage.read_text(murl)
    except FileNotFoundError:
        raise ManifestError(f"{murl}: no manifest (the dataset is missing or its build did not finish)") from None
    except OSError as e:
        raise ManifestError(f"{murl}: cannot read manifest: {e}") from None
    try:
        manifest = json.loads(text)
    except json.JSONDecodeError as e:
        raise ManifestError(f"{murl}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{murl}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ManifestError(
            f"{murl}: manifest format version {manifest.get('format_version')!r}, "
            f"this code reads version {FORMAT_VERSION}; rebuild the shards with this shardgen"
        )
    _check_shard_names(manifest, murl)
    manifest["_url"] = murl
    return manifest


def _check_shard_names(manifest: dict, murl: str) -> None:
    """Every shard ``url`` is a name relative to the manifest's folder (the format has no absolute URLs): one
    that is absolute or climbs out with ``..`` would read data from outside the dataset."""
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise ManifestError(f"{murl}: no splits")
    for split, info in splits.items():
        for shard in info.get("shards", []) if isinstance(info, dict) else []:
            name = shard.get("url") if isinstance(shard, dict) else None
            if not isinstance(name, str) or storage.leaves_folder(name):
                raise ManifestError(f"{murl}: shard URL {name!r} of split {split!r} leaves the dataset folder")


def split_info(manifest: dict, split: str) -> dict:
    splits = manifest["splits"]
    if split not in splits:
        raise ManifestError(f"{manifest.get('_url', 'manifest')}: no split {split!r} (has {sorted(splits)})")
    return splits[split]


def image_offsets(manifest: dict, split: str) -> list[int]:
    """Index (in manifest order) of the first image of each shard of ``split``."""
    counts = [int(s["images"]) for s in split_info(manifest, split)["shards"]]
    return [sum(counts[:k]) for k in range(len(counts))]


def rank_images(manifest: dict, split: str, rank: int, world: int) -> int:
    """How many images of ``split`` belong to ``rank`` when image k is dealt to rank k % world (the dealing
    used by validation and evaluation, so every image is scored exactly once)."""
    return len(range(rank, int(split_info(manifest, split)["images"]), world))


def shard_urls(manifest: dict, split: str) -> list[str]:
    """Absolute URLs of a split's shards, resolved against the manifest's location."""
    root = root_of(manifest["_url"])
    return [storage.join(root, s["url"]) for s in split_info(manifest, split)["shards"]]
