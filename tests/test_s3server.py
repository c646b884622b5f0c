"""``python tests/s3server.py -- COMMAND`` (what ``make s3-demo`` runs): a throw-away S3 for one command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs under the server: the bucket exists, AWS_* point at it, and an endpoint override of the caller is gone.
CHECK = """
import os, sys
from shardgen import storage
assert "AWS_ENDPOINT_URL_S3" not in os.environ
storage.write_bytes_atomic("s3://made/x.txt", b"hello")
print("ENDPOINT", os.environ["AWS_ENDPOINT_URL"], storage.read_text("s3://made/x.txt"))
sys.exit(7)
"""


def test_runs_a_command_against_a_fresh_server_and_kills_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    proc = subprocess.run([sys.executable, "tests/s3server.py", "--dir", str(tmp_path / "s3"), "--bucket", "made",
                           "--", sys.executable, "-c", CHECK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert proc.returncode == 7, proc.stderr[-3000:]  # the command's own status
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith("ENDPOINT")]
    endpoint, text = line.split()[1:]
    assert text == "hello"
    assert f"s3server: server at {endpoint} stopped (SIGKILL)" in proc.stderr
    port = int(endpoint.rsplit(":", 1)[1])
    with socket.socket() as s:  # nothing listens there any more
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert (tmp_path / "s3" / "weed.log").exists()  # --dir keeps the data and the log
    (identity,) = json.loads((tmp_path / "s3" / "identities.json").read_text())["identities"]
    assert identity["credentials"][0]["secretKey"] not in proc.stdout + proc.stderr  # never printed
