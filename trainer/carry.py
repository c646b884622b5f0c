"""Errors out of DataLoader workers, delivered as data (used by the trainer's loaders and evaluate's).

torch re-raises an exception from a worker in the main process as a RuntimeError wrapping the worker's
traceback: its type and its one-line message are lost, and with them the one-line error a user should see.
So a worker's stream catches the errors the caller knows how to report (``carry``) and yields them as a
``Carried`` item; the main process raises them again, type and message intact (``uncarry``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator


class Carried:
    """An error from a worker, travelling as an item of its stream (exceptions pickle with their args)."""

    def __init__(self, error: Exception):
        self.error = error


def carry(items: Iterable, errors: type[Exception] | tuple[type[Exception], ...]) -> Iterator:
    """``items``, ending with a ``Carried`` item instead of raising one of ``errors``."""
    try:
        yield from items
    except errors as e:
        yield Carried(e)


def uncarry(item):
    """``item``, or the error it carries raised."""
    if isinstance(item, Carried):
        raise item.error
    return item
