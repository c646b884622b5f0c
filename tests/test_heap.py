"""shardgen.heap.roomy_heap: glibc's thresholds raised for a Dask shard task and the worker's own put back."""

from __future__ import annotations

import pytest

from shardgen import heap


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append(("mallopt", param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("malloc_trim", pad))
        return 1


@pytest.fixture
def libc(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(heap, "_libc", lambda: fake)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    return fake


def test_a_dask_worker_gets_a_roomy_heap_and_then_its_own_settings_back(libc, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")  # what Dask's nanny sets
    with heap.roomy_heap():
        assert libc.calls == [("mallopt", heap.M_MMAP_THRESHOLD, heap.ROOMY_MMAP_THRESHOLD),
                              ("mallopt", heap.M_TRIM_THRESHOLD, heap.ROOMY_TRIM_THRESHOLD)]  # fmt: skip
    assert libc.calls[2:] == [("mallopt", heap.M_MMAP_THRESHOLD, heap.GLIBC_MMAP_THRESHOLD),
                              ("mallopt", heap.M_TRIM_THRESHOLD, 65536), ("malloc_trim", 0)]  # fmt: skip


def test_the_settings_come_back_when_the_task_fails_and_an_mmap_threshold_is_kept(libc, monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1000")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "500000")
    with pytest.raises(RuntimeError), heap.roomy_heap():
        raise RuntimeError("a scan failed")
    assert libc.calls[2:] == [("mallopt", heap.M_MMAP_THRESHOLD, 500000), ("mallopt", heap.M_TRIM_THRESHOLD, 1000),
                              ("malloc_trim", 0)]  # fmt: skip


@pytest.mark.parametrize("value", [None, "not a number"])
def test_nothing_changes_without_dasks_variable(libc, monkeypatch, value):
    if value is None:
        monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    else:
        monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", value)
    with heap.roomy_heap():
        pass
    assert libc.calls == []


def test_the_real_c_library_takes_the_settings(monkeypatch):
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    with heap.roomy_heap():
        assert bytearray(8 << 20)[-1] == 0  # allocations work under the roomy settings


def test_overlapping_tasks_raise_once_and_the_last_one_out_restores(libc, monkeypatch):
    """A Dask worker with several task threads: the thresholds are the process's, so a task that ends while
    another still runs must leave them raised."""
    import threading

    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with heap.roomy_heap():
            first_in.set()
            second_in.wait(5)
        first_out.set()

    thread = threading.Thread(target=first)
    thread.start()
    first_in.wait(5)
    with heap.roomy_heap():
        second_in.set()
        first_out.wait(5)
        assert libc.calls == [("mallopt", heap.M_MMAP_THRESHOLD, heap.ROOMY_MMAP_THRESHOLD),
                              ("mallopt", heap.M_TRIM_THRESHOLD, heap.ROOMY_TRIM_THRESHOLD)]  # fmt: skip
    thread.join()
    assert libc.calls[2:] == [("mallopt", heap.M_MMAP_THRESHOLD, heap.GLIBC_MMAP_THRESHOLD),
                              ("mallopt", heap.M_TRIM_THRESHOLD, 65536), ("malloc_trim", 0)]  # fmt: skip


@pytest.mark.timeout(120)
def test_under_a_dask_nanny_two_task_threads_share_one_roomy_heap():
    """A real nanny (it sets MALLOC_TRIM_THRESHOLD_ for its worker) and a worker with 2 task threads: two
    overlapping tasks raise the thresholds once, and only the second one out restores them."""
    from distributed import Client, LocalCluster

    def setup():
        import os
        import threading

        import shardgen.heap as h

        class Recorder:
            calls = []

            def mallopt(self, param, value):
                self.calls.append(("mallopt", param, value))

            def malloc_trim(self, pad):
                self.calls.append(("malloc_trim", pad))

        recorder = Recorder()
        h._libc = lambda: recorder
        h._test_events = {k: threading.Event() for k in ("a_in", "b_in", "a_out")}
        return os.environ.get("MALLOC_TRIM_THRESHOLD_")

    def first():
        import shardgen.heap as h

        ev = h._test_events
        with h.roomy_heap():
            ev["a_in"].set()
            ev["b_in"].wait(30)
        ev["a_out"].set()

    def second():
        import shardgen.heap as h

        ev = h._test_events
        ev["a_in"].wait(30)
        with h.roomy_heap():
            ev["b_in"].set()
            ev["a_out"].wait(30)
            return list(h._libc().calls)

    with LocalCluster(n_workers=1, threads_per_worker=2, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:  # fmt: skip
        (trim,) = client.run(setup).values()
        assert trim is not None and trim.isdigit()  # the nanny's setting, which roomy_heap acts on
        a, b = client.submit(first, pure=False), client.submit(second, pure=False)
        inside = b.result(timeout=60)
        a.result(timeout=60)
        (calls,) = client.run(lambda: list(__import__("shardgen.heap").heap._libc().calls)).values()
    raised = [("mallopt", heap.M_MMAP_THRESHOLD, heap.ROOMY_MMAP_THRESHOLD),
              ("mallopt", heap.M_TRIM_THRESHOLD, heap.ROOMY_TRIM_THRESHOLD)]  # fmt: skip
    assert inside == raised  # the first task had ended, the thresholds stayed raised for the second
    assert calls[:2] == raised and calls[2:] == [("mallopt", heap.M_MMAP_THRESHOLD, heap.GLIBC_MMAP_THRESHOLD),
                                                 ("mallopt", heap.M_TRIM_THRESHOLD, int(trim)), ("malloc_trim", 0)]
