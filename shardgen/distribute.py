"""Distributors: ways of running the shard jobs of a build (``shard.py``). The plan fixes every shard's images,
so a shard's bytes do not depend on where or how often its job runs.

``local``: the scans of the unfinished shards are processed by a process pool on this machine, in build order,
and each shard is written by this process as soon as its scans are done (workers never wait for a shard
boundary).

``dask``: one task per shard on a Dask distributed cluster (a scheduler address, or a ``LocalCluster``). Each
task checks whether its shard is already finished, else reads its scans, writes its shard and its completion
record, and returns the record; the scans and the output must be reachable at the same path (or URL) from
every worker. Dask reruns the tasks of a lost worker on the others.
"""

from __future__ import annotations

import collections
import itertools
import logging
import multiprocessing as mp
import os
import signal
from collections.abc import Iterable, Iterator
from concurrent.futures import CancelledError, ProcessPoolExecutor
from concurrent.futures import wait as futures_wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

from .handoff import Handoff
from .heap import roomy_heap
from .plan import BuildOptions, ShardgenError
from .scan import process_image
from .shard import ShardPlan, build_shard, reusable, run_shard
from .tiling import TileGrid

DISTRIBUTORS = ("local", "dask")
SCHEDULER_ENV = "DASK_SCHEDULER_ADDRESS"  # the scheduler used by --distributor dask without --scheduler


@dataclass
class Outcome:
    records: dict[str, dict]  # shard name -> completion record
    reused: int  # shards whose earlier output was reused
    tasks: int = 0  # dask: tasks that ran (one per shard)
    workers: int = 0  # dask: distinct workers that returned a result
    retried: int = 0  # dask: tasks rerun because the worker running or holding them was lost
    scheduler: str = ""  # dask: the scheduler's address


# -------------------------------------------------------------------------------------------------- local


_handoff: Handoff | None = None  # in a pool worker: the build's shared memory for its scans' bytes


def _process(args):
    result = process_image(*args)
    if _handoff is not None:
        result["tar"] = _handoff.put(result["tar"])
    return result


def _received(results: Iterable[dict], handoff: Handoff | None) -> Iterator[dict]:
    for r in results:
        if handoff is not None:
            r["tar"] = handoff.take(r["tar"])
        yield r


def _dispatch_order(todo: list[tuple], workers: int) -> list[int]:
    """Build order, but the last scans largest first (by pixels), so that the build does not end with one
    worker finishing a large scan while the others wait. Only the last ``4 x workers`` move, so the writing process
    holds at most that many results back."""
    tail = max(0, len(todo) - 4 * workers)
    last = sorted(range(tail, len(todo)), key=lambda i: -todo[i][0].ann.width * todo[i][0].ann.height)
    return [*range(tail), *last]


def _in_order(results: Iterable[dict], order: list[int]) -> Iterator[dict]:
    """``results`` (in ``order``) back in build order."""
    held, nxt = {}, 0
    for i, r in zip(order, results, strict=True):
        held[i] = r
        while nxt in held:
            yield held.pop(nxt)
            nxt += 1


def _init_worker(handoff: Handoff) -> None:
    """Pool initializer: the worker's handoff memory (inherited by fork), and SIGKILL when the build process
    dies (Linux), so killing a build never leaves orphans that keep burning CPU."""
    global _handoff
    _handoff = handoff
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the build in its main process, one line
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _counted(results: Iterable[dict], bar) -> Iterator[dict]:
    for r in results:
        bar.update(1)
        yield r


def run_local(out: str, shards: list[ShardPlan], opts: BuildOptions, workers: int, bar) -> Outcome:
    """Reuse the finished shards (checked here), then build the others with ``workers`` processes."""
    records, pending = {}, []
    for shard in shards:
        rec = reusable(out, shard, opts)
        if rec is None:
            pending.append(shard)
        else:
            records[shard.name] = rec
    bar.update(sum(rec["images"] for rec in records.values()))
    todo = [(job, opts) for shard in pending for job in shard.jobs]
    pool = handoff = None
    if workers > 1 and todo:
        handoff = _handoff_for(workers, opts)
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("fork"), initializer=_init_worker,
                                   initargs=(handoff,))  # fmt: skip
    try:
        # One stream of scans over all pending shards, so the pool keeps working while a shard is written.
        if pool:
            order = _dispatch_order(todo, workers)
            results = _in_order(_received(_ordered(pool, [todo[i] for i in order], 4 * workers), handoff), order)
        else:
            results = map(_process, todo)
        for shard in pending:
            shard_results = itertools.islice(results, len(shard.jobs))
            records[shard.name] = build_shard(out, shard, opts, _counted(shard_results, bar))
    finally:
        if pool:
            # Scans still running are not waited for (Python 3.14 has terminate_workers; before it, the
            # executor's own process table, read before shutdown clears it).
            running = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for proc in running:
                proc.terminate()
    return Outcome(records, reused=len(shards) - len(pending))


def _result(future, poll: float = 0.25):
    """``future.result()``, the main thread waking every ``poll`` s to handle a pending Ctrl-C: an untimed wait
    on a lock is interrupted by a signal only in the thread the kernel hands it to, and this process also runs
    the pool's manager and queue feeder threads and tqdm's monitor. ``wait`` then ``result``, so a worker's own
    TimeoutError (a storage read) is raised, not taken for the poll's."""
    while not futures_wait([future], timeout=poll).done:
        pass
    return future.result()


def _ordered(pool: ProcessPoolExecutor, todo: list[tuple], window: int) -> Iterator[dict]:
    """``_process`` of each of ``todo`` on the pool, results in order, at most ``window`` scans in flight (so
    finished scans waiting for the writer never pile up). A worker that dies (the OOM killer, a SIGKILL) breaks
    the pool: the build stops with one line naming the scans it was processing, instead of waiting forever."""
    jobs = iter(todo)
    flight: collections.deque = collections.deque()
    for job in itertools.islice(jobs, window):
        flight.append((job, pool.submit(_process, job)))
    while flight:
        job, future = flight.popleft()
        try:  # a worker that died breaks both: the result waited for, and the next submit
            result = _result(future)
            if (nxt := next(jobs, None)) is not None:
                flight.append((nxt, pool.submit(_process, nxt)))
        except BrokenProcessPool:
            scans = ", ".join(str(j[0].path) for j, _ in [(job, future), *flight][: 2 * window])
            raise ShardgenError(f"a build worker died (killed, or out of memory?) while processing one of: {scans}; "
                                "rerun the same command to resume (finished shards are reused)") from None
        yield result


HANDOFF_MAX_BYTES = 2**31  # address space for the handoff slots of a local build, whatever the worker count


def _handoff_for(workers: int, opts: BuildOptions) -> Handoff | None:
    """Slots for the scans in flight (one being copied in by each worker, two waiting per worker), each
    as large as a scan's tar bytes get in practice: its tiles' raw pixels (PNG at any level stays below
    them but for pure noise) plus tar headers and json; a larger scan goes through the pipe. None (every
    scan through the pipe) where the memory cannot be mapped."""
    grid = TileGrid(opts.image_size, opts.tile, opts.stride)
    capacity = grid.count * ((opts.channels + 1) * opts.tile * opts.tile + 8192)
    slots = min(3 * workers, HANDOFF_MAX_BYTES // capacity)
    try:
        return Handoff(slots, capacity) if slots >= workers else None
    except (OSError, ValueError, OverflowError):
        return None


# --------------------------------------------------------------------------------------------------- dask


def _shard_task(shard: ShardPlan, out: str, opts: BuildOptions) -> tuple[dict, bool, str]:
    """The Dask task of one shard: (record, reused, address of the worker that ran it)."""
    from distributed import get_worker

    with roomy_heap():
        record, reused = run_shard(out, shard, opts)
    return record, reused, get_worker().address


def _retried(client, keys: list[str]) -> int:
    """How many of ``keys`` the scheduler ran more than once: their worker died while running or holding them
    (suspicious), or their result was lost with a worker before this client fetched it (a second run)."""

    # Defined inside, so cloudpickle ships its code by value: it reads only the scheduler's own state.
    def count(keys, dask_scheduler=None):
        keys, runs = set(keys), {}
        # (key, start, finish, ...) tuples; bounded, so the oldest transitions of a huge build may be gone.
        for key, _, finish, *_ in dask_scheduler.transition_log:
            if finish == "processing" and key in keys:
                runs[key] = runs.get(key, 0) + 1
        tasks = dask_scheduler.tasks
        return sum(1 for k in keys if runs.get(k, 0) > 1 or (k in tasks and tasks[k].suspicious > 0))

    return client.run_on_scheduler(count, keys)


def quiet_dask_logs() -> None:
    """Silence Dask's log output in this process for good (the CLI calls it): Dask logs lost connections and
    failed tasks to the terminal with tracebacks, some from its event loop thread after the client has closed,
    while shardgen reports them itself (one-line errors, the retried count)."""
    import distributed  # noqa: F401  (its logging config creates the handlers)

    # Dask's logging config gives several distributed.* loggers a handler of their own (and no propagation).
    for name in list(logging.root.manager.loggerDict):
        if name.split(".")[0] == "distributed":
            for h in logging.getLogger(name).handlers:
                if isinstance(h, logging.StreamHandler):
                    h.setLevel(logging.CRITICAL)


def run_dask(out: str, shards: list[ShardPlan], opts: BuildOptions, workers: int, scheduler: str | None,
             bar) -> Outcome:  # fmt: skip
    """Run one task per shard on the cluster at ``scheduler`` (default ``$DASK_SCHEDULER_ADDRESS``), or on a
    ``LocalCluster`` of ``workers`` single-threaded worker processes when neither is set."""
    import uuid

    from distributed import Client, KilledWorker, LocalCluster, as_completed
    from distributed.comm.core import CommClosedError

    address = scheduler or os.environ.get(SCHEDULER_ENV)
    cluster = None
    if not address:
        # Loopback only, and a free port for the scheduler's HTTP server (the default 8787 may be taken). Its
        # workers share this terminal: quiet them too.
        cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                               dashboard_address="127.0.0.1:0", silence_logs=logging.CRITICAL)  # fmt: skip
    try:
        with Client(cluster if cluster else address) as client:
            # Unique keys per build: a rerun never collides with the tasks of a killed client still running.
            build_id = uuid.uuid4().hex[:8]
            keys = [f"shardgen-{build_id}-{shard.name}" for shard in shards]
            # One graph for all tasks (one message to the scheduler, not one per shard).
            futures = dict(zip(client.map(_shard_task, shards, out=out, opts=opts, key=keys), shards, strict=True))
            records, reused, ran_on = {}, 0, set()
            for future in as_completed(futures):
                shard = futures[future]
                try:
                    record, was_reused, worker = future.result()
                except (CommClosedError, CancelledError) as e:
                    reason = str(e).splitlines()[0] if str(e) else type(e).__name__
                    raise ShardgenError(f"lost the Dask scheduler at {client.scheduler.address} ({reason}); rerun "
                                        "the build to resume") from None  # fmt: skip
                except (ShardgenError, OSError, ValueError):
                    raise  # bad input named by the task, as with the local distributor
                except KilledWorker:
                    raise ShardgenError(f"{shard.name}: every Dask worker that ran its task died; rerun the build "
                                        "to resume") from None  # fmt: skip
                except Exception as e:  # e.g. a scheduler or worker without shardgen: one line, not a remote trace
                    first = (str(e).splitlines() or [""])[0]
                    raise ShardgenError(f"{shard.name}: Dask task failed: {type(e).__name__}: {first}") from e
                records[shard.name] = record
                reused += was_reused
                ran_on.add(worker)
                bar.update(len(shard.jobs))
            retried = _retried(client, [f.key for f in futures])
            address = client.scheduler.address
    finally:
        if cluster:
            cluster.close()
    return Outcome(records, reused, tasks=len(shards), workers=len(ran_on), retried=retried, scheduler=address)
