"""trainer.data.read_ahead: a helper thread's items arrive in order, errors at their place, and closing
the consumer stops the producer."""

from __future__ import annotations

import threading
import time

import pytest

from trainer.data import read_ahead


def test_items_arrive_in_order():
    assert list(read_ahead(iter(range(1000)), 4)) == list(range(1000))
    assert list(read_ahead(iter([]), 4)) == []


def test_an_error_is_raised_after_the_items_before_it():
    def items():
        yield from range(5)
        raise ValueError("broken at 5")

    got = []
    with pytest.raises(ValueError, match="broken at 5"):
        for item in read_ahead(items(), 2):
            got.append(item)
    assert got == list(range(5))


def test_closing_the_consumer_stops_the_producer_and_closes_its_source():
    closed = threading.Event()

    def items():
        try:
            n = 0
            while True:
                yield n
                n += 1
        finally:
            closed.set()

    before = threading.active_count()
    stream = read_ahead(items(), 3)
    assert [next(stream) for _ in range(10)] == list(range(10))
    stream.close()
    assert closed.wait(5)
    deadline = time.monotonic() + 5
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threading.active_count() == before
