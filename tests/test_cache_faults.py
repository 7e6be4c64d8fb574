"""The cache job under real faults, injected from outside: a SIGKILLed worker, a SIGKILLed driver, a stopped
node, a full disk, an S3 server that restarts, two jobs on one store at once; the worker plan; the dry run.

Every fault test ends with the data checked: the store equals an uninterrupted run's, array by array, or
`pipeline verify` passes. The CLI runs as a separate process (its own Ray driver, on the session's two-node
cluster with `--address`), as a user would run it.
"""
import os
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

from jobs.cache_plan import ClusterResourceError, plan_workers
from jobs.nodes import NodeResources
from pipeline.cli import main
from services import S3Server, free_port, service_env, start_ray_cluster

TEACHER = "test_resnet,img_size=64,batch_size=8"
OTHER = "test_vit,img_size=32,batch_size=8,features=false"
ARGS = ["--views", "2", "--topk", "3", "--seed", "1", "--random-init", "--no-progress"]
NUM_SHARDS, PER_SHARD = 6, 16


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    """Six shards of 16 JPEGs, with a manifest (made by `pipeline make-shards` from an image folder)."""
    root = tmp_path_factory.mktemp("faults")
    rng = np.random.default_rng(0)
    for c in range(3):
        (root / "images" / f"c{c}").mkdir(parents=True)
        for i in range(NUM_SHARDS * PER_SHARD // 3):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / "images" / f"c{c}" / f"{i}.jpg")
    result = CliRunner().invoke(main, ["make-shards", "--from-folder", str(root / "images"), "--out",
                                       str(root / "shards"), "--samples-per-shard", str(PER_SHARD), "--num-workers", "1"])
    assert result.exit_code == 0, result.output
    return str(root / "shards" / "train.json")


def cache_args(manifest, store, *teachers):
    args = ["cache-teachers", "--shards", manifest, "--store", str(store)]
    for teacher in teachers or (TEACHER,):
        args += ["--teacher", teacher]
    return [*args, *ARGS]


@pytest.fixture(scope="module")
def reference(manifest, tmp_path_factory, ray_local):
    """An uninterrupted run with both teachers, in this process's embedded Ray."""
    path = tmp_path_factory.mktemp("ref") / "cache.zarr"
    result = CliRunner().invoke(main, cache_args(manifest, path, TEACHER, OTHER))
    assert result.exit_code == 0, result.output
    return path


def arrays(path, teachers=("test_resnet",), **storage):
    root = zarr.open_group(str(path), mode="r", **storage)
    names = ["samples/key", "samples/label", "samples/valid", "samples/done", "views/box", "views/flip"]
    for tid in teachers:
        names += [f"teachers/{tid}/{a}" for a in ("topk_logprob", "topk_index", "log_leftover", "features", "done")
                  if a in root[f"teachers/{tid}"]]
    return {name: root[name][:] for name in names}


def assert_same_store(path, reference, teachers=("test_resnet",)):
    got, want = arrays(path, teachers), arrays(reference, teachers)
    for name in want:
        assert np.array_equal(got[name], want[name]), name
    assert got["samples/done"].all() and all(got[f"teachers/{t}/done"].all() for t in teachers)


def start_cli(args, env=None):
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *map(str, args)], env=env or service_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def done_shards(path, tid="test_resnet", **storage) -> int:
    try:
        return int(zarr.open_group(str(path), mode="r", **storage)[f"teachers/{tid}/done"][:].sum())
    except Exception:  # not created yet
        return 0


def wait_for(check, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} not seen within {timeout} s")


def summary_counts(out):
    match = re.search(r"shards: (\d+) cached now, (\d+) already complete, (\d+) failed", out)
    assert match, out
    return tuple(map(int, match.groups()))


def shard_worker_pids(dashboard_url) -> list[int]:
    """Pids of the alive ShardWorker actors, from Ray's state API."""
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard_url, filters=[("class_name", "=", "ShardWorker"), ("state", "=", "ALIVE")],
                         raise_on_missing_output=False)
    return [a.pid for a in actors if a.pid]


def running_shard_worker(dashboard_url) -> int | None:
    """The pid of a ShardWorker actor that is processing a shard right now.

    Ray's task list lags behind a shard that takes a fraction of a second, so the actors' pids come from the
    state API and the running one is told by its process title, which Ray sets to `ray::ShardWorker.process`
    while that method runs."""
    import psutil

    for pid in shard_worker_pids(dashboard_url):
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                if "ShardWorker.process" in " ".join(psutil.Process(pid).cmdline()):
                    return pid
            except psutil.Error:
                break
            time.sleep(0.01)
    return None


# ---------------------------------------------------------------------------- the worker plan (no Ray)


def test_plan_uses_nodes_not_the_cluster_total_and_skips_a_head_with_no_cpus():
    nodes = [NodeResources(0, 0, "head"), NodeResources(32, 0, "a"), NodeResources(32, 0, "b")]
    plan = plan_workers(nodes, "auto")
    assert plan.device == "cpu" and plan.count == 8 and plan.threads == 8 and plan.num_cpus == 0.5
    assert plan_workers(nodes, "cpu", num_workers=2).threads == 32  # one worker per node gets its whole node
    gpu = plan_workers([NodeResources(0, 0, "head"), NodeResources(16, 2, "g")], "auto")
    assert (gpu.device, gpu.count, gpu.num_gpus, gpu.threads, gpu.decode_workers) == ("cuda", 2, 1, 8, 7)


@pytest.mark.parametrize("nodes, device, workers, needles", [
    ([NodeResources(2, 0, "head"), NodeResources(4, 0, "w")], "cuda", None,
     ["--device cuda", "head: 2 CPU, 0 GPU", "w: 4 CPU, 0 GPU"]),
    ([NodeResources(8, 1, "g")], "cuda", 3, ["--num-workers 3", "needs 3 GPUs", "g: 8 CPU, 1 GPU"]),
    ([NodeResources(0, 0, "head")], "cpu", None, ["needs 0.5 CPU", "head: 0 CPU, 0 GPU"]),
    ([NodeResources(1, 0, "a"), NodeResources(1, 0, "b")], "cpu", 5, ["--num-workers 5", "hold 4", "a: 1 CPU"]),
])
def test_a_request_no_node_can_satisfy_is_an_error_naming_it_and_the_nodes(nodes, device, workers, needles):
    with pytest.raises(ClusterResourceError) as info:
        plan_workers(nodes, device, num_workers=workers)
    for needle in needles:
        assert needle in str(info.value)


def test_device_cuda_on_a_cluster_without_gpus_fails_in_seconds(ray_cluster, manifest, tmp_path):
    store = tmp_path / "cache.zarr"
    start = time.monotonic()
    code, out, err = finish(start_cli([*cache_args(manifest, store), "--device", "cuda",
                                       "--address", ray_cluster.gcs_address]), timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert code == 1 and len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert "--device cuda" in errors[0] and "1 CPU, 0 GPU" in errors[0], errors[0]
    assert time.monotonic() - start < 60
    assert not store.exists()


# ---------------------------------------------------------------------------- faults on a real cluster


@pytest.mark.slow
def test_cache_worker_sigkilled_mid_shard_is_replaced_and_the_store_is_identical(ray_cluster, manifest, reference,
                                                                               tmp_path):
    """A worker process SIGKILLed while its shard runs: the shard is retried on a new worker; the store equals
    the uninterrupted run's, array by array."""
    store = tmp_path / "cache.zarr"
    proc = start_cli([*cache_args(manifest, store), "--num-workers", "2", "--address", ray_cluster.gcs_address])
    try:
        pid = wait_for(lambda: running_shard_worker(ray_cluster.dashboard_url), 180, "a running shard")
        os.kill(pid, signal.SIGKILL)
        code, out, err = finish(proc)
    finally:
        proc.kill()
    assert code == 0, out + err[-3000:]
    assert summary_counts(out) == (NUM_SHARDS, 0, 0)
    assert re.search(r"^retried train-\d+\.tar: worker died", out, re.M), out
    assert_same_store(store, reference)


@pytest.mark.slow
def test_driver_sigkilled_then_rerun_computes_only_the_missing_shards(ray_cluster, manifest, reference, tmp_path):
    store = tmp_path / "cache.zarr"
    proc = start_cli([*cache_args(manifest, store), "--address", ray_cluster.gcs_address])
    try:
        wait_for(lambda: done_shards(store) >= 1, 180, "a completed shard")
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        proc.kill()
    complete_at_kill = done_shards(store)
    assert complete_at_kill < NUM_SHARDS, "the driver finished before it was killed"
    code, out, err = finish(start_cli([*cache_args(manifest, store), "--address", ray_cluster.gcs_address]))
    assert code == 0, out + err[-3000:]
    cached_now, already, failed = summary_counts(out)
    assert already >= complete_at_kill and cached_now == NUM_SHARDS - already and failed == 0, out
    assert_same_store(store, reference)


@pytest.mark.slow
def test_second_node_stopped_mid_run_the_job_finishes_on_the_head(manifest, reference, tmp_path):
    cluster = start_ray_cluster([1, 1])
    try:
        store = tmp_path / "cache.zarr"
        proc = start_cli([*cache_args(manifest, store), "--num-workers", "2", "--address", cluster.gcs_address])
        try:
            wait_for(lambda: done_shards(store) >= 1, 180, "a completed shard")
            cluster.nodes[1].stop()
            code, out, err = finish(proc)
        finally:
            proc.kill()
        assert code == 0, out + err[-3000:]
        assert summary_counts(out) == (NUM_SHARDS, 0, 0)
        # Ray marks a SIGKILLed node dead only after its health checks time out, possibly after the job ended.
        wait_for(lambda: cluster.alive_node_count() == 1, 120, "the stopped node marked dead")
        assert_same_store(store, reference)
    finally:
        cluster.stop()


@pytest.mark.slow
def test_two_jobs_adding_different_teachers_at_once_both_end_registered(ray_cluster, manifest, reference, tmp_path):
    """Two CLI processes start at the same moment on one new store, one teacher each: both finish, both
    teachers are registered (groups and the root index), and the store equals a joint run of both."""
    store = tmp_path / "cache.zarr"
    procs = [start_cli([*cache_args(manifest, store, spec), "--address", ray_cluster.gcs_address])
             for spec in (TEACHER, OTHER)]
    try:
        results = [finish(p) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for code, out, err in results:
        assert code == 0, out + err[-3000:]
    root = zarr.open_group(str(store), mode="r")
    assert sorted(root["teachers"].group_keys()) == ["test_resnet", "test_vit"]
    assert sorted(root.attrs["teachers"]) == ["test_resnet", "test_vit"]
    assert_same_store(store, reference, teachers=("test_resnet", "test_vit"))


# ---------------------------------------------------------------------------- storage faults


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root; not running as root here")
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)]).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)])


@pytest.mark.slow
def test_full_disk_is_one_line_naming_the_store_and_the_store_resumes_after_making_room(
        small_tmpfs, manifest, ray_local):
    """The store is created on a 256 KiB tmpfs whose space runs out while shards are written: one 'Error:'
    line naming the store; after the tmpfs is grown, the same command finishes the store and verify passes."""
    store = small_tmpfs / "cache.zarr"
    args = [*cache_args(manifest, store), "--views", "48", "--max-retries", "0"]
    result = CliRunner().invoke(main, args)
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert result.exit_code == 1 and len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "No space left on device" in errors[0] and str(store) in errors[0], errors[0]
    before = done_shards(store)
    assert before < NUM_SHARDS
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], check=True)
    rerun = CliRunner().invoke(main, args)
    assert rerun.exit_code == 0, rerun.output
    cached_now, already, _ = summary_counts(rerun.output)
    assert already == before and cached_now == NUM_SHARDS - before
    verify = CliRunner().invoke(main, ["verify", str(store)])
    assert verify.exit_code == 0, verify.output


@pytest.mark.slow
def test_s3_server_restarted_mid_write_fails_clearly_and_a_rerun_verifies(manifest, tmp_path, monkeypatch):
    """moto keeps objects in memory: restarting it mid-run loses the bucket and everything written so far, as
    a wiped bucket would. The run must end (no hang) with a clear failure naming the lost bucket or the
    failed shards, never a traceback or the secret; after the bucket is recreated, the same command rebuilds
    the store and `pipeline verify` passes on it."""
    server = S3Server(free_port())  # private: a restart must not empty the session server's buckets
    server.start()
    try:
        for name, value in server.env().items():
            monkeypatch.setenv(name, value)
        server.create_bucket("faults")
        store = "s3://faults/cache.zarr"
        env = service_env(**server.env())
        proc = start_cli(cache_args(manifest, store), env=env)
        try:
            try:
                wait_for(lambda: proc.poll() is not None
                         or done_shards(store, storage_options={"skip_instance_cache": True}) >= 1, 300,
                         "a completed shard on S3")
            except TimeoutError:
                proc.kill()
                pytest.fail("no shard completed on S3:\n" + "".join(proc.communicate())[-3000:])
            assert proc.poll() is None, "".join(proc.communicate())[-3000:]  # still running when the server restarts
            server.restart()
            code, out, err = finish(proc)
        finally:
            proc.kill()
        assert code == 1, out + err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        failure = [line for line in (out + err).splitlines() if line.startswith(("FAILED", "Error:"))]
        # Each failed shard says why: the bucket is gone, or the endpoint was unreachable while it restarted.
        assert failure and all(re.search(r"bucket|endpoint|connect", line, re.I) for line in failure), out + err
        assert server.secret_key not in out + err
        server.create_bucket("faults")
        code, out, err = finish(start_cli(cache_args(manifest, store), env=env))
        assert code == 0, out + err[-3000:]
        assert summary_counts(out) == (NUM_SHARDS, 0, 0)
        code, out, err = finish(start_cli(["verify", store], env=env))
        assert code == 0, out + err[-3000:]
        assert server.secret_key not in out + err
    finally:
        server.stop()


# ---------------------------------------------------------------------------- the dry run


def test_dry_run_writes_nothing_and_its_numbers_follow_the_flags(manifest, tmp_path):
    store = tmp_path / "cache.zarr"
    result = CliRunner().invoke(main, [*cache_args(manifest, store, TEACHER, OTHER), "--views", "4",
                                       "--feature-views", "1", "--temperatures", "1,4", "--num-workers", "3",
                                       "--dry-run"])
    assert result.exit_code == 0, result.output
    assert not store.exists()
    out = result.output
    images, views = NUM_SHARDS * PER_SHARD, 4
    assert f"images: {images} in {NUM_SHARDS} shard(s) to cache, views per sample: {views}" in out
    # test_resnet: top-3 fp16 + int16 indices + 2 fp32 leftovers = 20 B/view; features 2 x D on 1 view.
    resnet = re.search(r"test_resnet: 1000 classes; 20 B/view top-k \+ leftover \+ (\d+) B/view features on "
                       r"(\d+) views; ([\d,]+) bytes; ([\d.]+) views/s .*: ([\d.]+) h for (\d+) views", out)
    vit = re.search(r"test_vit: 1000 classes; 20 B/view top-k \+ leftover; ([\d,]+) bytes; ([\d.]+) views/s .*: "
                    r"([\d.]+) h for (\d+) views", out)
    assert resnet and vit, out
    feature_bytes, feature_views = int(resnet[1]), int(resnet[2])
    assert feature_views == images and feature_bytes > 0
    assert int(resnet[3].replace(",", "")) == images * views * 20 + feature_views * feature_bytes
    assert int(vit[1].replace(",", "")) == images * views * 20
    assert int(resnet[6]) == int(vit[4]) == images * views
    hours = [int(m[6]) / float(m[4]) / 3600 for m in (resnet,)] + [int(vit[4]) / float(vit[2]) / 3600]
    assert abs(float(resnet[5]) - hours[0]) <= 1e-4 + 0.01 * hours[0]
    assert abs(float(vit[3]) - hours[1]) <= 1e-4 + 0.01 * hours[1]
    total = re.search(r"projected: ([\d.]+) hours .*; ([\d.]+) hours per worker with 3 worker", out)
    assert total and abs(float(total[2]) - float(total[1]) / 3) <= 1e-4, out
