"""Training on a Ray cluster: worker resources planned from the nodes, and recovery from lost workers and nodes.

Faults come from outside: a Ray Train worker's process SIGKILLed (its pid from Ray's state
API), a whole node's processes SIGKILLed. Ray Train restarts the workers from the last
reported checkpoint by itself, and the run ends with the weights of an uninterrupted run.
"""
import subprocess
import sys
import time

import psutil
import pytest
import ray.util.state
import torch

from jobs.nodes import NodeResources
from jobs.worker_resources import PlacementError, WorkerResources, plan_worker_resources
from services import finish_ok, kill_process_tree, service_env, start_ray_cluster
from pipeline.data.make_shards import make_mnist_sample
from test_train_student import _cli, _config, _config_file, _start_cli, _weights, wait_for_checkpoint


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """300 MNIST digits (32 px) in 8 shards; these runs train with labels alone."""
    root = tmp_path_factory.mktemp("recovery")
    _, manifest = make_mnist_sample(str(root / "shards"), samples_per_shard=40, val_fraction=0.06, progress=False)
    return {"root": root, "manifest": manifest, "store": None}


# -- planning, without Ray --------------------------------------------------------------------------------


def _nodes(*cpus_gpus) -> list[NodeResources]:
    return [NodeResources(*n) if isinstance(n, tuple) else NodeResources(n) for n in cpus_gpus]


@pytest.mark.parametrize("nodes, workers, expected", [
    (_nodes(32, 32), 1, WorkerResources(32.0)),  # one node's CPUs, not the cluster's 64
    (_nodes(32, 32), 2, WorkerResources(32.0)),
    (_nodes(32, 32), 3, WorkerResources(16.0)),
    (_nodes(0, 8, 8), 3, WorkerResources(4.0)),  # a head with no CPUs takes no worker
    (_nodes(2), 2, WorkerResources(1.0)),
    (_nodes((16, 2), (16, 2)), 4, WorkerResources(8.0, 1)),  # auto: a GPU each when every worker gets one
    (_nodes((16, 1), 16), 2, WorkerResources(16.0)),  # ... else CPUs only
])
def test_default_request_is_the_most_cpus_every_worker_gets(nodes, workers, expected):
    assert plan_worker_resources(nodes, workers) == expected


def test_explicit_requests_that_fit_are_kept():
    assert plan_worker_resources(_nodes(1), 2, cpus_per_worker=0.5) == WorkerResources(0.5)
    assert plan_worker_resources(_nodes((8, 1), (8, 1)), 2, 3, device="cuda") == WorkerResources(3.0, 1)
    assert plan_worker_resources(_nodes((8, 4)), 1, device="cpu") == WorkerResources(8.0)


@pytest.mark.parametrize("nodes, workers, cpus, device, message", [
    (_nodes(32, 32), 1, 64, "auto", "--num-workers 1 --cpus-per-worker 64: 1 training worker(s) of 64 CPU each "
                                    "cannot be placed; the cluster has 2 alive node(s): node 1: 32 CPU, 0 GPU; node 2: "
                                    "32 CPU, 0 GPU, which hold 0 such worker(s) at once"),
    (_nodes(32, 32), 1, None, "cuda", "--device cuda: 1 training worker(s) of 1 CPU + 1 GPU each cannot be placed"),
    (_nodes(1, 1), 3, None, "auto", "node 2: 1 CPU, 0 GPU, which hold 2 such worker(s)"),
    (_nodes(0), 1, None, "auto", "1 alive node(s): node 1: 0 CPU, 0 GPU"),
])
def test_requests_no_node_can_hold_are_refused(nodes, workers, cpus, device, message):
    with pytest.raises(PlacementError) as error:
        plan_worker_resources(nodes, workers, cpus, device)
    assert message in str(error.value)


# -- on a real two-node cluster -----------------------------------------------------------------------------


@pytest.mark.slow
def test_request_the_nodes_cannot_hold_fails_in_seconds(data, tmp_path, ray_cluster):
    config = _config(data, tmp_path / "run", no_distill=True, store=None, cpus_per_worker=2)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "train-student", "--config",
                             _config_file(config, tmp_path / "run.yaml"), "--address", ray_cluster.gcs_address],
                            env=service_env(), capture_output=True, text=True, timeout=120)
    seconds = time.monotonic() - started
    assert result.returncode == 1, result.stdout + result.stderr
    assert ("--num-workers 1 --cpus-per-worker 2: 1 training worker(s) of 2 CPU each cannot be placed; the "
            "cluster has 2 alive node(s): ") in result.stderr
    assert result.stderr.count(": 1 CPU, 0 GPU") == 2
    assert seconds < 60  # Python, torch and a Ray connection start included; nothing waits for resources


def _train_workers(dashboard_url: str, state: str = "ALIVE") -> list:
    return ray.util.state.list_actors(address=dashboard_url, filters=[("class_name", "=", "RayTrainWorker"),
                                                                      ("state", "=", state)],
                                      raise_on_missing_output=False, detail=True)


def _wait_until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        time.sleep(0.2)
    raise TimeoutError(f"{what} after {timeout:.0f} s")


# Both recovery runs: two DDP workers of one CPU, a checkpoint every 2 steps.
RECOVERY = dict(no_distill=True, store=None, epochs=3, num_workers=2, cpus_per_worker=1, checkpoint_every=2,
                log_every=2, progress=True)


@pytest.fixture(scope="module")
def uninterrupted(data, tmp_path_factory, ray_local):
    """The recovery runs' weights without a fault, on the embedded Ray."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = _cli("--config", _config_file(_config(data, out / "run", **RECOVERY), out / "run.yaml"))
    assert result.exit_code == 0, result.output
    return _weights(out / "run")


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_killed_worker_is_restored_by_ray_train(data, tmp_path, ray_cluster, uninterrupted):
    """Two DDP workers, one per node; one SIGKILLed after the first checkpoint; Ray Train restarts both
    from it, and the run ends with the weights of an uninterrupted run."""
    run = _config(data, tmp_path / "run", **RECOVERY)
    process = _start_cli("--config", _config_file(run, tmp_path / "run.yaml"), "--address", ray_cluster.gcs_address,
                         RAY_ADDRESS=ray_cluster.gcs_address)  # for Ray's own processes: other clusters may run here
    try:
        workers = _wait_until(lambda: _train_workers(ray_cluster.dashboard_url) if len(
            _train_workers(ray_cluster.dashboard_url)) == 2 else None, 120, "two training workers")
        assert len({w.node_id for w in workers}) == 2  # one worker on each node
        wait_for_checkpoint(run.run_dir, process)
        psutil.Process(workers[1].pid).kill()
        output = finish_ok(process, 400)
    finally:
        kill_process_tree(process.pid)
    assert "workers restarted; continuing from step" in output
    _assert_same_weights(uninterrupted, _weights(run.run_dir))


BLOCKER = """
import sys, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
ray.init(address=sys.argv[1])
head = next(n["NodeID"] for n in ray.nodes() if n["Alive"] and "node:__internal_head__" in n["Resources"])
@ray.remote(num_cpus=1)
class Blocker:
    def pid(self):
        import os
        return os.getpid()
blocker = Blocker.options(name="blocker", lifetime="detached",
                          scheduling_strategy=NodeAffinitySchedulingStrategy(head, soft=False)).remote()
print(ray.get(blocker.pid.remote()))
"""


@pytest.mark.slow
def test_lost_node_training_finishes_on_the_head(data, tmp_path, uninterrupted):
    """On a head of 2 CPUs and a node of 1, one head CPU is held by another actor so that one of the two
    workers starts on the second node; that node is stopped (all its processes SIGKILLed) and the head's CPU
    freed: both workers restart on the head and the run ends with the uninterrupted run's weights."""
    cluster = start_ray_cluster([2, 1])
    try:
        blocker = subprocess.run([sys.executable, "-c", BLOCKER, cluster.gcs_address], env=service_env(),
                                 capture_output=True, text=True, timeout=120, check=True)
        blocker_pid = int(blocker.stdout.strip().splitlines()[-1])
        run = _config(data, tmp_path / "run", **RECOVERY)
        process = _start_cli("--config", _config_file(run, tmp_path / "run.yaml"), "--address", cluster.gcs_address,
                             RAY_ADDRESS=cluster.gcs_address)
        try:
            workers = _wait_until(lambda: _train_workers(cluster.dashboard_url) if len(
                _train_workers(cluster.dashboard_url)) == 2 else None, 120, "two training workers")
            assert len({w.pid for w in workers} & {p.pid for p in cluster.nodes[1].processes()}) == 1
            wait_for_checkpoint(run.run_dir, process)
            cluster.nodes[1].stop()
            psutil.Process(blocker_pid).kill()
            output = finish_ok(process, 400)
        finally:
            kill_process_tree(process.pid)
        assert "workers restarted; continuing from step" in output
        head_id = next(n.node_id for n in ray.util.state.list_nodes(address=cluster.dashboard_url) if n.is_head_node)
        finished = [w for w in _train_workers(cluster.dashboard_url, state="DEAD") if w.node_id == head_id]
        assert len(finished) >= 2
    finally:
        cluster.stop()
    _assert_same_weights(uninterrupted, _weights(run.run_dir))


LOADER_OWNER = """
import sys, time
from pipeline.train.loader import ChunkRenderer, ProcessRunner
runner = ProcessRunner(ChunkRenderer(None, None, None, 1), workers=1)
print(runner._processes[0].pid, flush=True)
time.sleep(600)
"""


def test_loader_processes_stop_when_their_training_process_is_killed():
    owner = subprocess.Popen([sys.executable, "-c", LOADER_OWNER], env=service_env(), stdout=subprocess.PIPE,
                             text=True)
    try:
        loader = psutil.Process(int(owner.stdout.readline()))
        owner.kill()
        owner.wait()
        loader.wait(timeout=90)  # raises TimeoutExpired if the loader outlives its parent
    finally:
        kill_process_tree(owner.pid)
