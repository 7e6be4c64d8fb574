"""What each training worker asks Ray for, planned from the resources of the cluster's nodes.

A Ray Train worker must fit on one node, so a cluster's total says little: one worker
on two 32-CPU nodes can get 32 CPUs, not 64. ``plan_worker_resources`` takes every alive
node's CPUs and GPUs and either returns a request that the nodes can place (all workers
at once) or raises ``PlacementError`` naming the request and what the nodes have, so that
an impossible request fails in seconds instead of waiting forever for resources.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from jobs.nodes import NodeResources, describe_nodes, workers_that_fit
from pipeline.train.train_config import ConfigError


class PlacementError(ConfigError):
    """No set of alive nodes can ever hold the requested training workers."""


@dataclass(frozen=True)
class WorkerResources:
    """One worker's request: CPUs (torch threads follow) and 0 or 1 GPU."""

    cpus: float
    gpus: int = 0

    def ray_resources(self) -> dict[str, float]:
        return {"CPU": self.cpus} | ({"GPU": float(self.gpus)} if self.gpus else {})

    @property
    def threads(self) -> int:
        return max(1, math.floor(self.cpus))


def plan_worker_resources(nodes: Sequence[NodeResources], num_workers: int, cpus_per_worker: float | None = None,
                          device: str = "auto") -> WorkerResources:
    """The request every worker makes; raises ``PlacementError`` if the nodes can never place them all.

    GPUs: one per worker with ``device="cuda"``; with ``"auto"``, one per worker when the
    nodes can place every worker with a GPU, else CPUs only. CPUs: ``cpus_per_worker`` if
    given, else the largest whole number of CPUs that every worker can have at once.
    """
    gpus = 0
    if device == "cuda" or (device == "auto" and _fits_with_gpus(nodes, num_workers, cpus_per_worker)):
        gpus = 1
    if cpus_per_worker is not None:
        request = WorkerResources(cpus_per_worker, gpus)
        _check_fits(nodes, num_workers, request, device)
        return request
    most = max((math.floor(n.cpus) for n in nodes), default=0)
    for cpus in range(most, 0, -1):
        if workers_that_fit(nodes, cpus, gpus) >= num_workers:
            return WorkerResources(float(cpus), gpus)
    _check_fits(nodes, num_workers, WorkerResources(1.0, gpus), device)  # raises: not even 1 CPU each fits
    raise AssertionError("unreachable")


def _fits_with_gpus(nodes: Sequence[NodeResources], num_workers: int, cpus_per_worker: float | None) -> bool:
    return workers_that_fit(nodes, cpus_per_worker or 1.0, 1) >= num_workers


def _check_fits(nodes: Sequence[NodeResources], num_workers: int, request: WorkerResources, device: str) -> None:
    fit = workers_that_fit(nodes, request.cpus, request.gpus)
    if fit >= num_workers:
        return
    wanted = f"{request.cpus:g} CPU" + (f" + {request.gpus} GPU" if request.gpus else "")
    flags = f"--num-workers {num_workers} --cpus-per-worker {request.cpus:g}" + (
        " --device cuda" if device == "cuda" else "")
    raise PlacementError(f"{flags}: {num_workers} training worker(s) of {wanted} each cannot be placed; the "
                         f"cluster has {describe_nodes(nodes)}, which hold {fit} such worker(s) at once")
