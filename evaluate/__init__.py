"""Full-image evaluation of a trained checkpoint, and prediction on new scans.

    python -m evaluate --checkpoint runs/u2net/best.pt --data s3://bucket/ds --split test --out eval/
    python -m evaluate predict --checkpoint runs/u2net/best.pt --images scans/ --out pred/

Modules: ``inference`` (checkpoint -> tile predictions -> blended full-image class maps), ``tiles`` (the
tiles of each image out of the shards, checked complete), ``run`` (the evaluate command), ``predict``
(raw scans -> masks and CVAT XML), ``contours`` (class maps -> CVAT polygons and masks), ``review``
(task labels and the summary of the XML), and the pieces they use:
``blend``, ``metrics``, ``overlay``, ``report``.
"""


class EvaluateError(ValueError):
    """Bad input to evaluate or predict; the message names the file and the reason, on one line."""


def fresh_folders(out, subs: tuple[str, ...]) -> None:
    """``out/sub`` for each of ``subs``, created, and emptied of the PNGs an earlier run wrote there (another
    split's or other scans' images would sit beside this run's, which its metrics and XML do not count)."""
    from pathlib import Path

    for sub in subs:
        folder = Path(out) / sub
        folder.mkdir(parents=True, exist_ok=True)
        for old in folder.glob("*.png"):
            old.unlink(missing_ok=True)


DECISIONS = ("tuned", "argmax")
# Test-time augmentation: (quarter turns, horizontal flip) pairs; "flips" is {identity, h, v, h+v}, "d4" the
# square's whole symmetry group. Scans have no preferred orientation, so every view is equally valid.
TTA = {
    "none": ((0, False),),
    "flips": ((0, False), (0, True), (2, True), (2, False)),
    "d4": tuple((k, f) for k in range(4) for f in (False, True)),
}
