"""Planning a build: every XML parsed, every label resolved, every image found and its size checked, before
anything is written, so bad input fails fast with ``FILE:LINE: reason``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import schema, storage
from .classes import DEFAULT_CLASSES_YAML, ClassMap
from .cvat import CvatError, ImageAnnotation, parse_cvat
from .scanfile import DEFAULT_MAX_PIXELS, ScanError, scan_size
from .splits import DEFAULT_RATIOS, SPLITS, assign_splits, stone_id_of


class ShardgenError(Exception):
    """Bad input or a failed build; the message names the file and the reason."""


@dataclass
class BuildOptions:
    mode: str = "multiclass"  # multiclass ids 0..10, or binary (any defect is 1)
    reflections: str = "merge"  # merge: parent class; ignore: 255; background: 0
    unknown_labels: str = "error"  # error, or ignore (counted warning)
    skip_missing: bool = False  # count images named in XML but missing on disk instead of failing
    channels: int = 1  # 1: 8-bit grayscale tiles; 3: RGB
    image_size: int = 1200  # side the crust crop is resized to
    tile: int = 400  # tile side
    stride: int = 200  # tile step
    shard_size: int = 1000  # samples per shard, rounded down to whole images (about 100 MB)
    split_ratios: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_RATIOS))
    split_method: str = "hash"  # hash: stable per stone (datasets that grow); exact: exact shares (small ones)
    stone_id_regex: str | None = None  # groups images into stones; default: one stone per image
    polyline_width: int = 3  # px, at source resolution
    point_radius: int = 2  # px, at source resolution
    png_level: int = 1  # zlib level of tile PNGs: 1 encodes several times faster than 6, shards slightly larger
    classes: str = str(DEFAULT_CLASSES_YAML)  # class map YAML
    # A scan with more pixels is refused from its header, before it is decoded (Pillow's bomb limit).
    max_pixels: int = DEFAULT_MAX_PIXELS


# Options that decide what is accepted but never change a byte of the output: left out of the shard
# fingerprint (raising --max-pixels reuses finished shards) and of the manifest's options.
NON_OUTPUT_OPTIONS = ("max_pixels",)


@dataclass(frozen=True)
class ImageJob:
    ann: ImageAnnotation
    path: str  # local image file
    image_id: str
    stone_id: str
    split: str
    values: tuple[int | None, ...]  # paint value per shape, by shape order (None: paint nothing)


# ---------------------------------------------------------------------------------------------- planning


def _find_image(images_dir: Path, name: str) -> Path | None:
    for candidate in (images_dir / name, images_dir / Path(name).name):
        if candidate.is_file():
            return candidate
    return None


def xml_files(annotations: Path) -> list[Path]:
    """The CVAT XML files of ``annotations``: the file itself, or every ``*.xml`` under the folder, in
    subfolders too and in any letter case (``*.XML``), in path order."""
    if not annotations.is_dir():
        return [annotations]
    return sorted(p for p in annotations.rglob("*") if p.suffix.lower() == ".xml" and p.is_file())


def plan(
    annotations: Path, images: Path, opts: BuildOptions, skipped: Counter, warnings: list[str] | None = None
) -> list[ImageJob]:
    """Every image to build, validated, in a deterministic order (split, image id).

    What is left out by option (unknown labels with ``--unknown-labels ignore``, missing images with
    ``--skip-missing``) is counted in ``skipped`` and reported as ``FILE:LINE: reason`` in ``warnings``.
    """
    warnings = warnings if warnings is not None else []
    cmap = ClassMap.load(opts.classes)
    found_xml = xml_files(annotations)
    if not found_xml:
        raise ShardgenError(f"{annotations}: no CVAT XML files found (*.xml, in subfolders too)")
    found, seen, named = [], {}, 0
    for xml in found_xml:
        try:
            anns = parse_cvat(xml, skipped=skipped)
        except CvatError as e:
            raise ShardgenError(str(e)) from None
        named += len(anns)
        for ann in anns:
            values = []
            for shape in ann.shapes:
                info = cmap.lookup(shape.label)
                if info is None:
                    msg = f"{xml}:{shape.line}: unknown label {shape.label!r}"
                    if opts.unknown_labels != "ignore":
                        raise ShardgenError(msg + " (use --unknown-labels ignore to skip such shapes)")
                    skipped[f"unknown label {shape.label!r}"] += 1
                    warnings.append(msg + ", shape skipped")
                    values.append(None)
                else:
                    values.append(cmap.paint_value(info, opts.mode, opts.reflections))
            if storage.leaves_folder(ann.name):  # checked before any lookup: the file is never touched
                raise ShardgenError(f"{xml}:{ann.line}: image name {ann.name!r} leaves the images folder")
            path = _find_image(images, ann.name)
            if path is None:
                if not opts.skip_missing:
                    raise ShardgenError(
                        f"{xml}:{ann.line}: image {ann.name!r} not found in {images} (use --skip-missing to skip)"
                    )
                skipped["image missing"] += 1
                warnings.append(f"{xml}:{ann.line}: image {ann.name!r} not found in {images}, skipped")
                continue
            try:
                size = scan_size(path, str(path), opts.max_pixels)  # the header only: nothing is decoded
            except ScanError as e:
                raise ShardgenError(str(e)) from None
            if size != (ann.width, ann.height):
                raise ShardgenError(
                    f"{path}: image is {size[0]}x{size[1]} but {xml}:{ann.line} says {ann.width}x{ann.height}"
                )
            image_id = schema.image_id_of(ann.name)
            if image_id in seen:
                raise ShardgenError(f"{xml}:{ann.line}: image id {image_id!r} also comes from {seen[image_id]}")
            seen[image_id] = f"{xml}:{ann.line}"
            try:
                stone = stone_id_of(image_id, opts.stone_id_regex)
            except ValueError as e:
                raise ShardgenError(str(e)) from None
            found.append((ann, str(path), image_id, stone, tuple(values)))
    # An empty dataset would only fail later, in the trainer.
    if not named:
        raise ShardgenError(f"{annotations}: no images in {len(found_xml)} XML files")
    if not found:
        raise ShardgenError(f"{annotations}: all {named} images named in the XML are missing from {images}")
    try:  # after the loop: the exact method cuts the whole set of stones
        splits = assign_splits((f[3] for f in found), opts.split_ratios, opts.split_method)
    except ValueError as e:
        raise ShardgenError(str(e)) from None
    jobs = [ImageJob(ann, path, image_id, stone, splits[stone], values) for ann, path, image_id, stone, values in found]
    jobs.sort(key=lambda j: (SPLITS.index(j.split), j.image_id))
    return jobs
