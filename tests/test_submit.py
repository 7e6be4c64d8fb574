"""Submitting `pipeline` commands to a Ray cluster through the Jobs API, and `pipeline job ...`.

Everything runs against the session's real two-node loopback cluster (its dashboard is a real
Jobs API on 127.0.0.1); the CLI runs as a subprocess, from the data's directory with relative
paths, as a user would run it. One shard set and one cached store serve every test.
"""
import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from PIL import Image

from pipeline.cli import main
from services import free_port, service_env

TEACHER = "test_resnet,img_size=64,batch_size=8,num_classes=3"
CACHE_ARGS = ["--teacher", TEACHER, "--views", "2", "--topk", "3", "--random-init"]
CLASSES, PER_CLASS, PER_SHARD = 3, 8, 6  # 24 images in 4 shards


def pipeline(*args, cwd, env=None, timeout=240):
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd, env=env or service_env(),
                          capture_output=True, text=True, timeout=timeout)


def start_pipeline(*args, cwd):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], cwd=cwd, env=service_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def last_line(text):
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def job_id_of(text):
    match = re.search(r"Submitted job (\S+) to", text)
    assert match, text
    return match.group(1)


def wait_for_status(url, job_id, wanted, timeout=60):
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = client.get_job_status(job_id).value
        if status in wanted:
            return status
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} still {status} after {timeout} s, not {wanted}")


def shard_worker_nodes(url, submission_id):
    """The nodes on which the cache job ``submission_id`` ran ShardWorker actors (alive or ended), from Ray's state API."""
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import list_actors

    job_id = JobSubmissionClient(url).get_job_info(submission_id).job_id
    actors = list_actors(address=url, filters=[("class_name", "=", "ShardWorker"), ("job_id", "=", job_id)],
                         detail=True, raise_on_missing_output=False)
    return {actor.node_id for actor in actors}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """images/ (3 classes of 8 JPEGs) and shards/ made from it by `pipeline make-shards` (4 shards)."""
    root = tmp_path_factory.mktemp("submit")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / "images" / f"c{c}").mkdir(parents=True)
        for i in range(PER_CLASS):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"c{c}" / f"{i}.jpg")
    result = CliRunner().invoke(main, ["make-shards", "--from-folder", str(root / "images"), "--out",
                                       str(root / "shards"), "--samples-per-shard", str(PER_SHARD),
                                       "--num-workers", "1"])
    assert result.exit_code == 0, result.output
    return root


@pytest.fixture(scope="module")
def cached(root, ray_cluster):
    """cache-teachers submitted to the cluster, with relative paths, two workers."""
    run = pipeline("cache-teachers", "--shards", "shards/train.json", "--store", "cache.zarr", *CACHE_ARGS,
                   "--num-workers", "2", "--address", ray_cluster.dashboard_url, cwd=root)
    return run, root / "cache.zarr"


@pytest.mark.slow
def test_cache_teachers_submitted_as_a_job_fills_the_store_on_both_nodes(cached, ray_cluster):
    run, store = cached
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Submitted job" in run.stderr
    assert "shards: 4 cached now, 0 already complete, 0 failed (of 4)" in run.stdout, run.stdout
    assert re.search(r"shards per node: \w+: \d", run.stdout), run.stdout
    # Its two workers ran one on each node (which one caches more of these tiny shards is a race).
    assert len(shard_worker_nodes(ray_cluster.dashboard_url, job_id_of(run.stderr))) == 2
    group = zarr.open_group(str(store), mode="r")
    assert group["samples/done"][:].all() and group["teachers/test_resnet/done"][:].all()
    assert np.isfinite(group["teachers/test_resnet/topk_logprob"][:]).all()
    assert group.attrs["dataset"]["num_samples"] == CLASSES * PER_CLASS


def test_checks_that_need_no_cluster_fail_before_submission(cached, ray_cluster):
    """An existing store with other view settings is refused here, in seconds, with nothing submitted."""
    _, store = cached
    started = time.monotonic()
    run = pipeline("cache-teachers", "--shards", "shards/train.json", "--store", "cache.zarr", *CACHE_ARGS,
                   "--views", "3", "--address", ray_cluster.dashboard_url, cwd=store.parent)
    assert run.returncode == 1
    assert run.stderr.strip().startswith("Error:") and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "views" in run.stderr and "Submitted" not in run.stderr + run.stdout
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_train_student_submitted_as_a_job_writes_the_run(cached, ray_cluster):
    run, store = cached
    assert run.returncode == 0, run.stdout + run.stderr
    train = pipeline("train-student", "--shards", "shards/train.json", "--val-shards", "shards/train.json",
                     "--store", "cache.zarr", "--model", "test_vit", "--img-size", "32", "--epochs", "1",
                     "--batch-size", "12", "--loader-workers", "0", "--out", "run",
                     "--address", ray_cluster.dashboard_url, cwd=store.parent)
    assert train.returncode == 0, train.stdout + train.stderr
    run_dir = store.parent / "run"
    assert (run_dir / "model.safetensors").exists()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "eval" for r in records) and any(r["kind"] == "train" for r in records)
    assert f"run: {run_dir}" in train.stdout


@pytest.mark.slow
def test_no_wait_then_job_logs_follow_and_status_give_the_outcome(root, ray_cluster, tmp_path):
    """make-shards submitted with --no-wait; `job logs --follow`, `job status` and `job list` (address from
    RAY_ADDRESS) report it."""
    url = ray_cluster.dashboard_url
    submitted = pipeline("make-shards", "--from-folder", "images", "--out", tmp_path / "more",
                         "--samples-per-shard", "10", "--num-workers", "1", "--address", url, "--no-wait", cwd=root)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = job_id_of(submitted.stdout)
    assert f"pipeline job logs {job_id} --address {url} --follow" in submitted.stdout
    assert f"pipeline job stop {job_id} --address {url}" in submitted.stdout

    followed = pipeline("job", "logs", job_id, "--address", url, "--follow", cwd=root)
    assert followed.returncode == 0, followed.stdout + followed.stderr
    assert "train: 24 samples in 3 shards" in followed.stdout
    assert len(list((tmp_path / "more").glob("train-*.tar"))) == 3

    env = service_env() | {"RAY_ADDRESS": url}  # service_env drops RAY_ADDRESS
    status = pipeline("job", "status", job_id, cwd=root, env=env)
    assert status.returncode == 0 and status.stdout.strip() == f"{job_id}: SUCCEEDED", status.stdout + status.stderr
    listed = pipeline("job", "list", cwd=root, env=env)
    assert any(line.startswith(job_id) and "SUCCEEDED" in line and "make-shards" in line
               for line in listed.stdout.splitlines()), listed.stdout


@pytest.mark.slow
def test_a_job_that_fails_on_the_cluster_ends_with_its_one_error_line(root, ray_cluster, tmp_path):
    """--device cuda can only be refused once the cluster's nodes are known: the job fails as its first step."""
    run = pipeline("cache-teachers", "--shards", "shards/train.json", "--store", tmp_path / "cuda.zarr", *CACHE_ARGS,
                   "--device", "cuda", "--address", ray_cluster.dashboard_url, cwd=root)
    assert run.returncode == 1, run.stdout + run.stderr
    error = last_line(run.stderr)
    assert error.startswith("Error:") and "--device cuda" in error and "0 GPU" in error, run.stderr
    assert "Traceback" not in run.stdout + run.stderr
    assert not (tmp_path / "cuda.zarr").exists()


@pytest.mark.slow
def test_ctrl_c_while_following_leaves_the_job_running_until_job_stop(root, ray_cluster, tmp_path):
    url = ray_cluster.dashboard_url
    proc = start_pipeline("cache-teachers", "--shards", "shards/train.json", "--store", tmp_path / "c.zarr",
                          *CACHE_ARGS, "--address", url, cwd=root)
    try:
        job_id = job_id_of(proc.stderr.readline())
        wait_for_status(url, job_id, {"RUNNING"})
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, out + err
    assert f"pipeline job logs {job_id} --address {url} --follow" in err
    assert f"pipeline job stop {job_id} --address {url}" in err
    assert wait_for_status(url, job_id, {"RUNNING", "SUCCEEDED"}, timeout=5) == "RUNNING"

    stopped = pipeline("job", "stop", job_id, "--address", url, cwd=root)
    assert stopped.returncode == 0 and f"Stopping job {job_id}" in stopped.stdout, stopped.stdout + stopped.stderr
    wait_for_status(url, job_id, {"STOPPED"}, timeout=60)
    status = pipeline("job", "status", job_id, "--address", url, cwd=root)
    assert status.returncode == 1 and f"{job_id}: STOPPED" in status.stdout, status.stdout + status.stderr


def test_ray_client_address_is_refused_at_once(root):
    started = time.monotonic()
    run = pipeline("cache-teachers", "--shards", "shards/train.json", "--store", "x.zarr", *CACHE_ARGS,
                   "--address", "ray://127.0.0.1:10001", cwd=root)
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "ray://" in run.stderr and "http://HEAD:8265" in run.stderr and "--address auto" in run.stderr
    assert time.monotonic() - started < 10


def test_unreachable_address_is_one_line_in_seconds(root):
    url = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    run = pipeline("make-shards", "--from-folder", "images", "--out", "nowhere", "--address", url, cwd=root)
    assert run.returncode == 1 and len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert url in run.stderr and "Jobs API" in run.stderr
    assert time.monotonic() - started < 15
    assert not (root / "nowhere").exists()


def test_unknown_job_id_is_one_line(root, ray_cluster):
    run = pipeline("job", "status", "no-such-job", "--address", ray_cluster.dashboard_url, cwd=root)
    assert run.returncode == 1 and run.stderr.strip().splitlines() == [
        f"Error: no job no-such-job at {ray_cluster.dashboard_url} (see `pipeline job list --address "
        f"{ray_cluster.dashboard_url}`)"], run.stderr


def test_the_job_runs_the_flags_given_with_local_paths_made_absolute(tmp_path, monkeypatch):
    """Relative paths (in shard lists, brace patterns, teacher weights) become absolute; URLs, flags not given
    and this process's --address/--no-wait/--progress do not travel; the job is the driver on the head."""
    from jobs.job_command import job_arguments

    monkeypatch.chdir(tmp_path)
    args = ["--shards", "a/t-{0..1}.tar,s3://b/x.tar", "--store", "s3://b/c.zarr", "--teacher",
            "resnet18@w/r.safetensors,img_size=64", "--teacher", "vit_tiny", "--no-center-view", "--views", "2",
            "--address", "http://h:8265", "--no-wait", "--progress"]
    command = main.commands["cache-teachers"]
    with command.make_context("cache-teachers", args) as ctx:
        got = job_arguments(ctx, {"shards": "shards", "store_path": "path", "teacher_specs": "teacher"})
    assert got == ["cache-teachers", "--shards", f"{tmp_path}/a/t-{{0..1}}.tar,s3://b/x.tar", "--store",
                   "s3://b/c.zarr", "--teacher", f"resnet18@{tmp_path}/w/r.safetensors,img_size=64", "--teacher",
                   "vit_tiny", "--views", "2", "--no-center-view", "--address", "auto", "--no-progress"]
