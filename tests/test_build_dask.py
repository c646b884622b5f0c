"""``shardgen build --distributor dask``: a real scheduler and two worker processes started with the ``dask`` CLI
on loopback. Same bytes as the local build, a SIGKILLed worker or client changes nothing, S3 through the
cluster, one-line errors from tasks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from dask_cluster import DaskCluster
from helpers import HAND, UPSCALED_LINE, build_args, cli, content, files, tiny_scan_case, write_scan, write_xml

from shardgen import schema, storage
from shardgen.__main__ import main
from shardgen.synth import write_synthetic

pytestmark = pytest.mark.timeout(420)

REPO = Path(__file__).resolve().parents[1]
N_SYNTH = 12
# One image per shard and 600 px crops: 12 tasks with enough work to kill a process mid-build.
ARGS = ["--image-size", "600", "--tile", "200", "--stride", "100", "--shard-size", "25",
        "--split-ratios", "train=0.5,val=0.25,test=0.25", "--quiet"]  # fmt: skip
_SHADOWING_AWS_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_SESSION_TOKEN", "AWS_PROFILE")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, s3_server):
    """Scheduler + 2 workers. Workers import this checkout (PYTHONPATH, as an editable install would) and get
    the S3 test server's credentials from their environment, as on real machines."""
    env = {k: v for k, v in os.environ.items() if k not in _SHADOWING_AWS_VARS and k != "DASK_SCHEDULER_ADDRESS"}
    env.update(s3_server.env())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    c = DaskCluster(tmp_path_factory.mktemp("dask"), env)
    try:
        c.start(workers=2)
    except (RuntimeError, OSError) as e:
        c.kill()
        pytest.fail(f"Dask test cluster did not start: {e}", pytrace=False)
    try:
        yield c
    finally:
        c.kill()


@pytest.fixture
def two_workers(cluster, monkeypatch) -> DaskCluster:
    """The cluster with exactly 2 live workers (a test before may have killed one)."""
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    cluster.ensure_workers(2)
    return cluster


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("synth")
    write_synthetic(data, N_SYNTH, seed=3, size_range=(180, 230))
    return data


@pytest.fixture(scope="module")
def reference(synth, tmp_path_factory) -> Path:
    """The same dataset built by the local distributor, in this process."""
    out = tmp_path_factory.mktemp("reference") / "ds"
    assert main([str(a) for a in build_args(synth, out, *ARGS)]) == 0
    return out


def dask_args(cluster: DaskCluster) -> list[str]:
    return ["--distributor", "dask", "--scheduler", cluster.address]


def spawn_build(synth: Path, out: Path, cluster: DaskCluster) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "shardgen", *map(str, build_args(synth, out, *ARGS, *dask_args(cluster)))]
    return subprocess.Popen(cmd, cwd=REPO, env=cluster.env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def wait_for_a_record(proc: subprocess.Popen, out: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not list((out / "_build").glob("*.json")):
        assert proc.poll() is None, f"build exited before the kill: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no shard finished in {timeout} s"
        time.sleep(0.005)


def test_cluster_build_is_byte_identical_to_the_local_build(synth, reference, two_workers, tmp_path, capsys):
    out = tmp_path / "ds"
    args = [a for a in ARGS if a != "--quiet"]
    rc, stdout, err = cli(capsys, *build_args(synth, out, *args, *dask_args(two_workers)))
    assert rc == 0, err
    assert f"shards: {N_SYNTH} (0 reused)" in stdout
    assert f"dask: {N_SYNTH} tasks on 2 workers, 0 retried ({two_workers.address})" in stdout
    assert f"{N_SYNTH}/{N_SYNTH}" in err  # the progress bar counts images
    assert files(out) == files(reference)
    assert sorted(p.name for p in (out / "_build").iterdir()) == sorted(f"{n}.json" for n in files(reference)
                                                                        if n.endswith(".tar"))  # fmt: skip


def test_cluster_build_keeps_every_option_warning_and_summary_line_of_a_local_build(two_workers, tmp_path, capsys):
    """Options the tasks must see (--max-pixels, --split-method) and what they report (upscaled scans,
    split shares) are the same through the cluster, on a fresh and on a resumed build."""
    data, tiny = tiny_scan_case(tmp_path)
    extra = [*HAND, "--shard-size", 4, "--split-method", "exact", "--max-pixels", 10_000]
    rc, local_out, local_err = cli(capsys, *build_args(data, tmp_path / "local", *extra))
    assert rc == 0, local_err
    for run in ("fresh", "resumed"):
        rc, out, err = cli(capsys, *build_args(data, tmp_path / "ds", *extra, *dask_args(two_workers)))
        assert rc == 0, err
        assert files(tmp_path / "ds") == files(tmp_path / "local"), run
        assert err == local_err and f"warning: {tiny}: crust crop 20x20 is upscaled 3.2x" in err, run
        assert UPSCALED_LINE in out and "stones per split (exact): train 2 = 100.0%" in out, run
        assert f"shards: 2 ({2 if run == 'resumed' else 0} reused)" in out, run
    manifest = schema.read_manifest(str(tmp_path / "ds"))
    assert manifest["options"]["split_method"] == "exact" and "max_pixels" not in manifest["options"]


def test_sigkill_of_a_worker_mid_build_is_retried_and_ends_byte_identical(synth, reference, two_workers, tmp_path):
    out = tmp_path / "ds"
    proc = spawn_build(synth, out, two_workers)
    try:
        wait_for_a_record(proc, out)
        two_workers.kill_worker(0)  # mid-build: the other 11 shards are still to come
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr
    line = next(line for line in stdout.splitlines() if line.startswith("dask: "))
    retried = int(line.split(", ")[1].split()[0])
    assert retried >= 1, stdout  # the killed worker was running or holding at least one shard's task
    assert files(out) == files(reference)
    assert not list(out.glob("*.partial"))


def test_sigkill_of_the_client_then_a_rerun_reuses_finished_shards(synth, reference, two_workers, tmp_path, capsys):
    out = tmp_path / "ds"
    proc = spawn_build(synth, out, two_workers)
    try:
        wait_for_a_record(proc, out)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the client only: the cluster goes on
        proc.communicate()
    assert not (out / "manifest.json").exists()
    finished = {p.name.removesuffix(".json") for p in (out / "_build").glob("*.json")}
    assert 1 <= len(finished) < N_SYNTH
    before = {n: (out / n).stat() for n in finished}
    rc, stdout, err = cli(capsys, *build_args(synth, out, *ARGS, *dask_args(two_workers)))
    assert rc == 0, err
    # Shards finished before the kill are reused, not rewritten; tasks of the killed client that were still
    # running may have finished more of them meanwhile.
    reused = int(stdout.split(f"shards: {N_SYNTH} (")[1].split()[0])
    assert len(finished) <= reused < N_SYNTH
    for n, st in before.items():
        assert (out / n).stat().st_ino == st.st_ino and (out / n).stat().st_mtime_ns == st.st_mtime_ns
    assert files(out) == files(reference)
    assert not list(out.glob("*.partial"))


@pytest.mark.s3
def test_s3_build_through_the_cluster(synth, reference, two_workers, s3_env, s3_server, capsys):
    url = f"{s3_env}/ds"
    storage.write_bytes_atomic(f"{url}/train-000000.tar.0123abcd.partial", b"left by a killed attempt")
    rc, stdout, err = cli(capsys, *build_args(synth, url, *ARGS, *dask_args(two_workers)))
    assert rc == 0, err
    assert f"dask: {N_SYNTH} tasks on 2 workers" in stdout
    manifest = schema.read_manifest(url)
    names = [s["url"] for info in manifest["splits"].values() for s in info["shards"]]
    assert storage.read_bytes(f"{url}/manifest.json") == (reference / "manifest.json").read_bytes()
    for name in names:
        assert storage.read_bytes(f"{url}/{name}") == (reference / name).read_bytes()
    fs, root = storage.fs_for(url)
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(root, detail=False)) == sorted([*names, "manifest.json",
                                                                                     "_build"])  # fmt: skip
    # ^ no temporary object left behind, not even one of an earlier attempt
    assert s3_server.secret_key not in stdout + err


def test_a_corrupt_scan_in_a_task_is_a_one_line_error_naming_the_file(two_workers, tmp_path, capsys):
    data = tmp_path / "data"
    write_scan(data / "images" / "a.png")
    write_scan(data / "images" / "b.png", content(2))
    write_xml(data / "annotations" / "ann.xml", [("a.png", []), ("b.png", [])])
    bad = data / "images" / "b.png"
    bad.write_bytes(bad.read_bytes()[:200])  # the header still gives the size the plan checks
    rc, _, err = cli(capsys, *build_args(data, tmp_path / "out", *HAND, "--shard-size", 4, *dask_args(two_workers)))
    assert rc == 2
    assert err.startswith(f"shardgen: error: {bad}: ") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_local_cluster_reuses_shards_and_a_bad_scan_is_one_line_on_a_quiet_terminal(synth, reference, tmp_path):
    """Without a scheduler, ``--distributor dask`` starts a LocalCluster whose workers share this terminal: a
    failing task must still end in the one-line error alone, and nothing already written is lost."""
    data = tmp_path / "data"
    shutil.copytree(synth, data)
    names = [s["url"] for info in schema.read_manifest(str(reference))["splits"].values() for s in info["shards"]]
    out = tmp_path / "ds"
    shutil.copytree(reference, out)
    (out / "manifest.json").unlink()
    (out / names[0]).unlink()  # to rebuild
    with tarfile.open(reference / names[-1]) as tar:  # one scan per shard: the last shard's scan goes bad
        image_id = schema.parse_key(tar.getnames()[0].split(".", 1)[0])[0]
    bad = data / "images" / f"{image_id}.png"
    bad.write_bytes(bad.read_bytes()[:3000])  # the header still gives the size the plan checks
    env = {k: v for k, v in os.environ.items() if k != "DASK_SCHEDULER_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    args = build_args(data, out, *ARGS, "--distributor", "dask", "--workers", 2)
    proc = subprocess.run([sys.executable, "-m", "shardgen", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"shardgen: error: {bad}: ") and len(proc.stderr.strip().splitlines()) == 1, (
        proc.stderr
    )
    assert not (out / "manifest.json").exists()
    reference_files = files(reference)
    kept = files(out)
    assert set(names[1:-1]) <= set(kept)  # the reused shards are still there ...
    assert all(kept[n] == reference_files[n] for n in kept)  # ... and nothing written differs


def test_scheduler_options_are_checked(synth, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    rc, _, err = cli(capsys, *build_args(synth, tmp_path / "a", "--scheduler", "tcp://127.0.0.1:8786"))
    assert rc == 2 and err.strip() == "shardgen: error: --scheduler needs --distributor dask"
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", "tcp://127.0.0.1:8786")
    rc, _, err = cli(capsys, *build_args(synth, tmp_path / "b", "--distributor", "dask", "--workers", 2))
    assert rc == 2 and "--workers sizes the local pool or a LocalCluster" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
