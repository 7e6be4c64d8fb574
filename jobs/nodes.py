"""The alive nodes of the connected Ray cluster, and how many workers of a given size they hold.

Workers (cache actors, Ray Train workers) each live on one node, so what a cluster can run is
decided node by node, never by its total: one worker on two 32-CPU nodes can get 32 CPUs, not 64.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class NodeResources:
    """What one alive node offers: its total CPUs and GPUs, and a name (its address) for messages."""

    cpus: float
    gpus: float = 0.0
    name: str = ""

    @classmethod
    def from_ray(cls, node: Mapping) -> NodeResources:
        """From one entry of ``ray.nodes()``."""
        resources = node.get("Resources", {})
        return cls(cpus=float(resources.get("CPU", 0)), gpus=float(resources.get("GPU", 0)),
                   name=str(node.get("NodeManagerAddress") or node.get("NodeID", "")))


def alive_nodes() -> list[NodeResources]:
    import ray

    return [NodeResources.from_ray(n) for n in ray.nodes() if n.get("Alive")]


def workers_that_fit(nodes: Sequence[NodeResources], cpus: float, gpus: float = 0) -> int:
    """How many workers of (cpus, gpus) the nodes hold at once, each worker on one node."""
    total = 0
    for node in nodes:
        # A small tolerance: Ray keeps resources in fixed point, so 3 x 1/3 CPU must fit on one CPU.
        by_cpu = math.floor(node.cpus / cpus + 1e-9) if cpus > 0 else math.inf
        by_gpu = math.floor(node.gpus / gpus + 1e-9) if gpus > 0 else math.inf
        fit = min(by_cpu, by_gpu)
        total += 0 if fit == math.inf else max(0, fit)
    return total


def describe_nodes(nodes: Sequence[NodeResources]) -> str:
    """'2 alive node(s): a: 32 CPU, 0 GPU; b: 32 CPU, 1 GPU' (nameless nodes are numbered)."""
    if not nodes:
        return "no alive node"
    listed = "; ".join(f"{n.name or f'node {i + 1}'}: {n.cpus:g} CPU, {n.gpus:g} GPU" for i, n in enumerate(nodes))
    return f"{len(nodes)} alive node(s): {listed}"
