"""A real Dask cluster for tests, started with the ``dask`` CLI as a user would on other machines: one
``dask scheduler`` and single-threaded ``dask worker`` processes, all bound to 127.0.0.1 on free ports.

Workers run without a nanny and without a memory limit, so a SIGKILL of a worker is a lost worker (not a
restart) and no memory heuristic can pause or restart one mid-test. Every process is started in its own process
group and SIGKILLed at `kill()`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

READY_TIMEOUT_S = 120.0  # the shared test machine may be slow to import distributed in a fresh process
LOG_TAIL_CHARS = 3000


def dask_cli() -> str:
    beside = Path(sys.executable).parent / "dask"
    return str(beside) if beside.is_file() else "dask"


class DaskCluster:
    def __init__(self, base_dir: Path, env: dict[str, str]):
        self.base_dir = Path(base_dir)
        self.env = env
        self.address = ""
        self.scheduler: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self._logs: list[Path] = []

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.base_dir / f"{name}.log"
        self._logs.append(log)
        with open(log, "wb") as f:
            return subprocess.Popen([dask_cli(), *args], env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)  # fmt: skip

    def start(self, workers: int = 2) -> None:
        sched_file = self.base_dir / "scheduler.json"
        # --idle-timeout and the workers' --death-timeout end a cluster orphaned by a killed test session.
        self.scheduler = self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", "0",
                                                   "--no-dashboard", "--scheduler-file", str(sched_file),
                                                   "--idle-timeout", "300s"])  # fmt: skip
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.address:
            if self.scheduler.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"dask scheduler did not start:\n{self.log_tail()}")
            try:
                self.address = json.loads(sched_file.read_text())["address"]
            except (OSError, ValueError, KeyError):
                time.sleep(0.1)
        self.ensure_workers(workers)

    def start_worker(self) -> None:
        args = ["worker", self.address, "--host", "127.0.0.1", "--nthreads", "1", "--no-nanny",
                "--memory-limit", "0", "--no-dashboard", "--death-timeout", "120"]  # fmt: skip
        self.workers.append(self._spawn(f"worker{len(self.workers)}", args))

    def alive_workers(self) -> list[subprocess.Popen]:
        return [w for w in self.workers if w.poll() is None]

    def ensure_workers(self, n: int) -> None:
        """Start workers until ``n`` run, and wait until the scheduler lists exactly those."""
        from distributed import Client

        while len(self.alive_workers()) < n:
            self.start_worker()
        deadline = time.monotonic() + READY_TIMEOUT_S
        with Client(self.address, timeout="60s") as client:
            while len(client.nthreads()) != n:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the scheduler does not list {n} workers:\n{self.log_tail()}")
                time.sleep(0.1)

    def kill_worker(self, k: int = 0) -> None:
        worker = self.alive_workers()[k]
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()

    def kill(self) -> None:
        for proc in [*self.workers, self.scheduler]:
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()

    def log_tail(self) -> str:
        parts = []
        for log in self._logs:
            text = log.read_text(errors="replace") if log.exists() else ""
            parts.append(f"--- {log.name}\n{text[-LOG_TAIL_CHARS:]}")
        return "\n".join(parts)
