"""Real services on loopback for tests: a Ray cluster of several nodes, and an S3 API server (moto).

Each service is started as real processes and stopped by its own pids: a Ray node's
processes are found by its own ``--temp-dir`` (every process of a node carries it on its
command line), never by a machine-wide ``ray stop`` or a name pattern.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

NODE_START_ATTEMPTS = 3
BIN = Path(sys.executable).parent  # the venv's bin: ray, pipeline and python of this test session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def service_env(**extra: str) -> dict[str, str]:
    """The environment for a service and the CLI: offline, no telemetry, no Ray auth, this venv first."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **extra}
    env.pop("RAY_ADDRESS", None)
    return env


def _wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise TimeoutError(f"{what} not ready after {timeout:.0f} s")


def _terminate(processes: list[psutil.Process], timeout: float = 5.0) -> None:
    for p in processes:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=timeout)


def kill_process_tree(pid: int) -> list[int]:
    """SIGKILL a process and all its descendants (say a CLI and the embedded Ray it started); return their pids."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    for p in processes:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=10)
    return [p.pid for p in processes]


@dataclass
class RayNode:
    """One ``ray start`` node: its temp dir marks every process it owns."""

    temp_dir: Path
    num_cpus: int
    resources: dict[str, float] = field(default_factory=dict)
    head: bool = False

    def processes(self) -> list[psutil.Process]:
        """The node's processes: those started with its temp dir, and their children (workers and
        agents retitle themselves, ``ray::IDLE``, so only their parent shows the temp dir)."""
        marker = str(self.temp_dir)
        found: dict[int, psutil.Process] = {}
        for p in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in p.info["cmdline"] or ()):
                    found.update({c.pid: c for c in [p, *p.children(recursive=True)]})
            except psutil.Error:
                continue
        return list(found.values())

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Stop the node abruptly (SIGKILL by default), as a lost machine would."""
        processes = self.processes()
        for p in processes:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _terminate(processes)


@dataclass
class RayCluster:
    """A head (dashboard and Jobs API on 127.0.0.1) and worker nodes, all on this machine."""

    gcs_address: str
    dashboard_url: str
    nodes: list[RayNode]
    root: Path

    @property
    def head(self) -> RayNode:
        return self.nodes[0]

    def alive_node_count(self) -> int:
        return _alive_node_count(self.dashboard_url)

    def stop(self) -> None:
        for node in reversed(self.nodes):
            _terminate(node.processes())
        shutil.rmtree(self.root, ignore_errors=True)


def finish_ok(process: subprocess.Popen, timeout: float) -> str:
    """The combined output of a CLI process that must exit 0 within ``timeout`` s; its process tree is
    killed afterwards either way (nothing it started outlives the test)."""
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        kill_process_tree(process.pid)
    assert process.returncode == 0, output[-4000:]
    return output


def _ray_start(args: list[str], env: dict[str, str]) -> None:
    result = subprocess.run([str(BIN / "ray"), "start", "--disable-usage-stats", *args], env=env,
                            capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RuntimeError(f"ray start failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")


def _node_ports() -> list[str]:
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]


def start_ray_cluster(node_cpus: list[int], node_resources: list[dict[str, float]] | None = None,
                      object_store_bytes: int = 200 * 1024 ** 2) -> RayCluster:
    """Start a head with ``node_cpus[0]`` CPUs and one worker node per further entry; wait until all are alive."""
    node_resources = node_resources or [{} for _ in node_cpus]
    root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths must stay < 108 bytes
    # A stopped node is declared dead after 3 missed health checks 1 s apart (Ray's default: 5, 3 s apart).
    env = service_env(RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3")
    gcs_port, dashboard_port = free_port(), free_port()
    gcs_address = f"127.0.0.1:{gcs_port}"
    cluster = RayCluster(gcs_address, f"http://127.0.0.1:{dashboard_port}", [], root)
    try:
        for i, (cpus, resources) in enumerate(zip(node_cpus, node_resources)):
            node = RayNode(root / f"n{i}", cpus, resources, head=i == 0)
            for attempt in range(NODE_START_ATTEMPTS):
                common = [f"--num-cpus={cpus}", "--num-gpus=0", f"--temp-dir={node.temp_dir}",
                          f"--object-store-memory={object_store_bytes}", *_node_ports()]
                if resources:
                    common.append(f"--resources={json.dumps(resources)}")
                try:
                    if node.head:
                        _ray_start(["--head", "--node-ip-address=127.0.0.1", f"--port={gcs_port}",
                                    "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                    f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={free_port()}",
                                    *common], env)
                    else:
                        _ray_start([f"--address={gcs_address}", "--node-ip-address=127.0.0.1", *common], env)
                    break
                except RuntimeError:
                    # `ray start` gives a raylet 30 s (fixed in Ray) to register; a loaded machine can miss it.
                    _terminate(node.processes())
                    if attempt == NODE_START_ATTEMPTS - 1:
                        raise
            cluster.nodes.append(node)
        _wait_until(lambda: _jobs_api_up(cluster.dashboard_url), 60, "Ray Jobs API")
        _wait_until(lambda: _alive_node_count(cluster.dashboard_url) == len(node_cpus), 60,
                    f"{len(node_cpus)} Ray nodes")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _jobs_api_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/version", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _alive_node_count(url: str) -> int:
    import ray.util.state

    try:
        return sum(n.state == "ALIVE" for n in ray.util.state.list_nodes(address=url, raise_on_missing_output=False))
    except Exception:
        return 0


@dataclass
class S3Server:
    """moto's standalone S3 API server on 127.0.0.1, with the environment that points s3fs and zarr at it."""

    port: int
    process: subprocess.Popen | None = None
    access_key: str = "test-access-key-id"
    secret_key: str = "test-secret-do-not-log-7f3a9c"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        env=service_env())
        _wait_until(self._up, 30, "moto S3 server")

    def _up(self) -> bool:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"moto server exited with {self.process.returncode}")
        try:
            with urllib.request.urlopen(f"{self.endpoint}/moto-api/", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
                     aws_secret_access_key=self.secret_key, region_name="us-east-1").create_bucket(Bucket=name)
