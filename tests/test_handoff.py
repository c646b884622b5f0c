"""How a local build's pool hands scans to the writing process: shared-memory slots (shardgen.handoff) and the
dispatch order that ends a build with its smallest scans (shardgen.distribute)."""

from __future__ import annotations

import multiprocessing as mp
import random
from types import SimpleNamespace

from shardgen.distribute import _dispatch_order, _in_order
from shardgen.handoff import Handoff, Slot

_handoff: Handoff | None = None  # a pool worker's, as shardgen.distribute sets it: inherited through fork


def _set(handoff: Handoff) -> None:
    global _handoff
    _handoff = handoff


def _put(payload: bytes):
    return _handoff.put(payload)


def _put_in_child(handoff: Handoff, payloads: list[bytes]) -> list:
    """What ``put`` returned for each payload, in a forked worker (the slots' bytes stay in shared memory)."""
    with mp.get_context("fork").Pool(1, initializer=_set, initargs=(handoff,)) as pool:
        return [pool.apply(_put, (p,)) for p in payloads]


def test_bytes_cross_from_a_forked_worker_and_their_slot_is_reused():
    handoff = Handoff(slots=2, capacity=1000)
    payloads = [bytes(random.Random(k).randbytes(300 + k)) for k in range(2)]
    items = _put_in_child(handoff, payloads)
    assert [type(i) for i in items] == [Slot, Slot] and {i.index for i in items} == {0, 1}
    assert [handoff.take(i) for i in items] == payloads
    (again,) = _put_in_child(handoff, [b"x" * 1000])  # both slots free again: the first is taken
    assert again == Slot(0, 1000) and handoff.take(again) == b"x" * 1000


def test_what_does_not_fit_travels_as_bytes():
    handoff = Handoff(slots=1, capacity=10)
    big, first, second = b"b" * 11, b"first", b"second"
    items = _put_in_child(handoff, [big, first, second])
    assert items[0] == big  # larger than a slot
    assert isinstance(items[1], Slot) and items[2] == second  # the only slot was still taken
    assert [handoff.take(i) for i in items] == [big, first, second]


def _job(side: int):
    return (SimpleNamespace(ann=SimpleNamespace(width=side, height=side)), None)


def test_a_build_ends_with_its_smallest_scans_and_is_written_in_build_order():
    sides = [random.Random(k).randrange(1000, 1500) for k in range(20)]
    todo = [_job(s) for s in sides]
    order = _dispatch_order(todo, workers=2)
    assert order[:12] == list(range(12))  # only the last 4 x workers move
    assert sorted(order[12:]) == list(range(12, 20))
    assert [sides[i] for i in order[12:]] == sorted(sides[12:], reverse=True)
    assert _dispatch_order(todo[:3], workers=2) == sorted(range(3), key=lambda i: -sides[i])
    results = [{"scan": i} for i in order]  # what the pool returns, in dispatch order
    assert [r["scan"] for r in _in_order(results, order)] == list(range(20))
