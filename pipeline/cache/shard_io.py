"""Reading and writing one shard's block of rows: its samples and views, and one teacher's outputs.

A shard's rows are whole chunks of every array (see ``store.py``), so each function here
touches only chunks that the shard owns. The ``done`` flags are not set here: the store
sets them after the data is written.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import zarr

# The arrays of one shard's samples: (group path, ShardSamples field).
SAMPLE_ARRAYS = (("samples/key", "keys"), ("samples/label", "labels"), ("samples/valid", "valid"),
                 ("views/box", "boxes"), ("views/flip", "flips"))


@dataclass
class ShardSamples:
    """One shard's sample rows (length C; rows past the shard's end are padding)."""

    keys: np.ndarray  # [C] str
    labels: np.ndarray  # [C] int32, -1 where unknown
    valid: np.ndarray  # [C] bool
    boxes: np.ndarray  # [C, V, 4] float32
    flips: np.ndarray  # [C, V] bool


@dataclass
class TeacherOutputs:
    """One shard's outputs for one teacher, rows in shard order (length C); each field is the array of that name."""

    topk_logprob: np.ndarray  # [C, V, k] float16, log_softmax(logits) of the top-k classes (see topk.py)
    topk_index: np.ndarray  # [C, V, k] int16 or int32
    log_leftover: np.ndarray  # [C, V, T] float32, log of the other classes' mass at each temperature
    features: np.ndarray | None  # [C, V_f, D] float16; None for a teacher without cached features


def write_samples(root: zarr.Group, rows: slice, samples: ShardSamples) -> None:
    for name, field in SAMPLE_ARRAYS:
        root[name][rows] = getattr(samples, field)


def read_samples(root: zarr.Group, rows: slice) -> ShardSamples:
    return ShardSamples(**{field: root[name][rows] for name, field in SAMPLE_ARRAYS})


def write_teacher(group: zarr.Group, rows: slice, outputs: TeacherOutputs) -> None:
    """Write a teacher's outputs into its group; features only where the teacher caches them."""
    for f in fields(TeacherOutputs):
        value = getattr(outputs, f.name)
        if value is not None and f.name in group:
            group[f.name][rows] = value


def read_teacher(group: zarr.Group, rows: slice, features: bool = True) -> TeacherOutputs:
    """A teacher's outputs on ``rows``; ``features=False`` skips reading them (the largest array)."""
    def read(name: str) -> np.ndarray | None:
        return group[name][rows] if name in group and (features or name != "features") else None

    return TeacherOutputs(**{f.name: read(f.name) for f in fields(TeacherOutputs)})
