"""Planning the cache job's workers from the resources of the cluster's alive nodes.

Pure functions of the nodes' resources (no Ray call), so that a request no node can ever
satisfy fails in seconds, naming the request and what the nodes have, instead of leaving
actors pending forever.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from jobs.nodes import NodeResources, describe_nodes, workers_that_fit

# A CPU worker reserves half a CPU: workers always get scheduled, even on 2 cores, and their
# real parallelism is set by the torch and decode threads they use.
CPU_WORKER_CPUS = 0.5
# A GPU worker reserves one GPU and one CPU; the node's other CPUs decode for it.
GPU_WORKER_CPUS = 1.0
CPUS_PER_DEFAULT_CPU_WORKER = 8  # default: one CPU worker per 8 CPUs


class ClusterResourceError(ValueError):
    """A request for workers that the cluster's nodes cannot satisfy."""


@dataclass(frozen=True)
class WorkerPlan:
    count: int
    device: str  # "cpu" or "cuda"
    threads: int  # torch threads for the teachers' forward
    decode_workers: int  # decode threads beside the forward
    num_cpus: float  # Ray reservation per worker
    num_gpus: float

    def describe(self) -> str:
        gpus = f", {self.num_gpus:g} GPU" if self.num_gpus else ""
        return f"{self.count} {self.device} worker(s) of {self.num_cpus:g} CPU{gpus} each"


def plan_workers(nodes: Sequence[NodeResources], device: str = "auto", num_workers: int | None = None,
                 decode_workers: int | None = None) -> WorkerPlan:
    """Workers for ``device`` ("auto", "cpu" or "cuda") on the alive ``nodes``.

    "auto" uses GPUs when a node has one. Threads per worker come from the nodes that can
    host a worker (a head with 0 CPUs hosts none), not from the cluster's total.
    """
    gpu_nodes = [n for n in nodes if n.gpus >= 1 and n.cpus >= GPU_WORKER_CPUS]
    if device == "cuda" or (device == "auto" and gpu_nodes):
        if not gpu_nodes:
            raise ClusterResourceError(
                f"--device cuda needs a node with 1 GPU and {GPU_WORKER_CPUS:g} CPU per cache worker; "
                f"the cluster has {describe_nodes(nodes)}")
        slots = workers_that_fit(gpu_nodes, GPU_WORKER_CPUS, 1)
        count = num_workers or slots
        if count > slots:
            raise ClusterResourceError(
                f"--num-workers {count} with --device cuda needs {count} GPUs (1 per worker); the nodes hold "
                f"{slots} such workers; the cluster has {describe_nodes(nodes)}")
        cpus = max(1, min(int(n.cpus // max(1, n.gpus)) for n in gpu_nodes))
        # A GPU worker's CPUs decode (nvjpeg does the JPEGs; the rest and fallbacks use the threads).
        return WorkerPlan(count, "cuda", threads=cpus, decode_workers=decode_workers or max(1, cpus - 1),
                          num_cpus=GPU_WORKER_CPUS, num_gpus=1)
    if device not in ("auto", "cpu"):
        raise ClusterResourceError(f"--device must be auto, cpu or cuda, got {device!r}")
    cpu_nodes = [n for n in nodes if n.cpus >= CPU_WORKER_CPUS]
    slots = workers_that_fit(cpu_nodes, CPU_WORKER_CPUS)
    if not cpu_nodes:
        raise ClusterResourceError(
            f"a CPU cache worker needs {CPU_WORKER_CPUS:g} CPU on one node; the cluster has "
            f"{describe_nodes(nodes)}")
    total_cpus = sum(n.cpus for n in cpu_nodes)
    count = num_workers or max(1, int(total_cpus // CPUS_PER_DEFAULT_CPU_WORKER))
    if count > slots:
        raise ClusterResourceError(
            f"--num-workers {count} CPU workers need {count * CPU_WORKER_CPUS:g} CPUs ({CPU_WORKER_CPUS:g} each); "
            f"the nodes hold {slots} such workers; the cluster has {describe_nodes(nodes)}")
    per_node = math.ceil(count / len(cpu_nodes))  # workers are spread over the nodes
    threads = max(1, int(min(n.cpus for n in cpu_nodes) // per_node))
    # On a CPU the forward and the decoding share the cores and a teacher forwards far fewer
    # images than a core decodes: one decode thread per two cores (docs/benchmarks.md).
    return WorkerPlan(count, "cpu", threads=threads, decode_workers=decode_workers or max(1, threads // 2),
                      num_cpus=CPU_WORKER_CPUS, num_gpus=0)
