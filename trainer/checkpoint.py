"""Checkpoints: written atomically, local or s3://, loaded with ``torch.load(weights_only=True)``.

``{out_dir}/last.pt`` and ``{out_dir}/best.pt`` are kept. ``{out_dir}/latest.json`` names the newest one and
is rewritten only after the checkpoint itself is completely stored (a local temp file renamed into place, or
a finished S3 upload), so a reader following the pointer never finds a partial file. Uploads that meet a
storage fault are retried with the readers' backoff policy (shardgen.reader.retry_call); if the storage stays
down, an object store still holds the previous complete checkpoint and pointer, since a PUT that did not
finish leaves no object behind.
"""

from __future__ import annotations

import io
import json
import pickle
import random
import zipfile

import numpy as np
import torch

from shardgen import storage
from shardgen.reader import retry_call

LATEST = "latest.json"


class CheckpointError(ValueError):
    pass


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's device only: *_all would open a context on every GPU
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _numpy_state() -> list:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss]


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def save(out_dir: str, name: str, state: dict, *, retries: int = 1, backoff: float = 0.0, pointer: bool = True) -> str:
    """Store ``state`` as ``{out_dir}/{name}.pt`` atomically, then point ``latest.json`` at it (unless
    ``pointer`` is false: a checkpoint rewritten with new meta must not become the one a resume starts from).

    Each write is attempted up to ``retries`` times, waits doubling from ``backoff`` seconds; then
    ``StorageUnavailable`` is raised (and ``latest.json`` was not touched if the checkpoint was not stored).
    """
    buf = io.BytesIO()
    torch.save(state, buf)
    url = storage.join(out_dir, f"{name}.pt")
    _write(url, buf.getvalue(), retries, backoff)
    if pointer:
        newest = {"checkpoint": f"{name}.pt", "step": int(state.get("step", 0))}
        _write(storage.join(out_dir, LATEST), json.dumps(newest).encode(), retries, backoff)
    return url


def _write(url: str, data: bytes, retries: int, backoff: float) -> None:
    retry_call(lambda: storage.write_bytes_atomic(url, data), url, retries=retries, backoff=backoff)


def latest(out_dir: str) -> str | None:
    """URL of the newest checkpoint in ``out_dir``, or None when there is none."""
    pointer = storage.join(out_dir, LATEST)
    if not storage.exists(pointer):
        return None
    try:
        name = json.loads(storage.read_text(pointer))["checkpoint"]
    except (json.JSONDecodeError, TypeError, KeyError) as e:
        raise CheckpointError(f"{pointer}: not a checkpoint pointer ({type(e).__name__}: {e})") from None
    # The pointer names a file of this run folder; anything else would load a file from elsewhere.
    if not isinstance(name, str) or storage.leaves_folder(name):
        raise CheckpointError(f"{pointer}: checkpoint {name!r} leaves the run folder {out_dir}")
    return storage.join(out_dir, name)


def load(url: str, map_location="cpu") -> dict:
    """A checkpoint dict; a missing or corrupt file is a one-line CheckpointError naming it."""
    try:
        data = storage.read_bytes(url)
    except FileNotFoundError:
        raise CheckpointError(f"{url}: checkpoint not found") from None
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:  # torch.load does not check the members' CRCs
            damaged = archive.testzip()
    except zipfile.BadZipFile:
        damaged = None  # torch.load says what it is not
    if damaged is not None:
        raise CheckpointError(f"{url}: damaged checkpoint (member {damaged} fails its CRC check)")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{url}: not a readable checkpoint ({first})") from None
    if not isinstance(state, dict) or "model" not in state or "meta" not in state:
        raise CheckpointError(f"{url}: not a trainer checkpoint (no model/meta entries)")
    return state


def check_compatible(state: dict, meta: dict, url: str) -> None:
    """A checkpoint must match the model it is loaded into; say which setting differs."""
    saved = state["meta"]
    for key in ("model", "in_channels", "n_classes", "classes"):  # same count, other classes: other meaning
        if saved.get(key) != meta[key]:
            raise CheckpointError(f"{url}: checkpoint has {key}={saved.get(key)!r}, this run has {key}={meta[key]!r}")
