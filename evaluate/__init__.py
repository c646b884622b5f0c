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
