"""Shared fixtures: a real S3 server (SeaweedFS) for the whole session and a fresh bucket per test."""

from __future__ import annotations

import itertools
import uuid

import pytest
from s3server import SHADOWING_AWS_VARS, S3Server

from shardgen import storage

_bucket_numbers = itertools.count()


def pytest_configure(config):
    config.addinivalue_line("markers", "s3: test talks to the real S3 server of the s3_server fixture")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A running SeaweedFS S3 server; fails (never skips) with the server log tail if it cannot start."""
    server = S3Server(tmp_path_factory.mktemp("s3"))
    try:
        server.start()
    except RuntimeError as exc:
        pytest.fail(f"S3 test server did not start: {exc}", pytrace=False)
    try:
        yield server
    finally:
        server.kill()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point AWS_* at the test server, create a fresh bucket and yield its ``s3://bucket`` URL.

    Credentials travel only through the environment, as in production. storage caches clients by a
    digest of that environment, so a test that changes a variable gets a fresh client; tests that
    restart the server reuse pooled clients, which botocore reconnects like after a real outage.
    """
    for name in SHADOWING_AWS_VARS:
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"test-{next(_bucket_numbers)}-{uuid.uuid4().hex[:8]}"
    fs, _ = storage.fs_for(f"s3://{bucket}")
    fs.mkdir(bucket)
    return f"s3://{bucket}"


@pytest.fixture(scope="module")
def one_torch_thread():
    """The test machine's few cores are shared; more torch threads than cores only adds contention."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
