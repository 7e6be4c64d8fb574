"""What the student data stream yields: rendered images with their labels and cached teacher targets.

Both batch types are plain dataclasses of tensors with a leading example dimension, so the
stream can select, store and gather them field by field (``StudentBatch.select``, ``SlotPool``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

SizeKey = tuple[int, int, str]  # (height, width, interpolation)


@dataclass
class CachedTeacherBatch:
    """One teacher's cached targets for a batch's (row, view) pairs."""

    topk_logprob: torch.Tensor  # [B, k] float32, log-probabilities at T = 1
    topk_index: torch.Tensor  # [B, k] int64
    log_leftover: torch.Tensor  # [B, T] float32, one column per store temperature
    features: torch.Tensor | None = None  # [B, D] float32, zeros where feature_mask is False
    feature_mask: torch.Tensor | None = None  # [B] bool: the view has cached features (view < V_f)


@dataclass
class StudentBatch:
    """Rendered uint8 images (normalised on the training device) with their labels and targets."""

    images: torch.Tensor  # [B, 3, H, W] uint8, channels-last
    labels: torch.Tensor  # [B] int64
    rows: torch.Tensor  # [B] int64, store rows (shard * C + position)
    views: torch.Tensor  # [B] int64: cached view; policy view id without a store; -1 for the eval crop
    teachers: dict[str, CachedTeacherBatch] = field(default_factory=dict)
    extra_images: dict[SizeKey, torch.Tensor] = field(default_factory=dict)  # keyed like extra_sizes

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def select(self, index: torch.Tensor) -> StudentBatch:
        """The examples at ``index`` (a new batch)."""
        return _batch(self, {name: tensor[index] for name, tensor in _tensors(self).items()})


def _tensors(batch: StudentBatch) -> dict[str, torch.Tensor]:
    """Every tensor of a batch under a flat name (None fields left out)."""
    flat = {"images": batch.images, "labels": batch.labels, "rows": batch.rows, "views": batch.views}
    flat.update({f"extra/{i}": batch.extra_images[size] for i, size in enumerate(batch.extra_images)})
    for tid, targets in batch.teachers.items():
        flat.update({f"teacher/{tid}/{f.name}": getattr(targets, f.name) for f in fields(targets)
                     if getattr(targets, f.name) is not None})
    return flat


def _batch(template: StudentBatch, flat: dict[str, torch.Tensor]) -> StudentBatch:
    """A batch shaped like ``template`` from flat tensors named as ``_tensors`` names them."""
    teachers = {tid: CachedTeacherBatch(**{f.name: flat.get(f"teacher/{tid}/{f.name}") for f in fields(targets)})
                for tid, targets in template.teachers.items()}
    return StudentBatch(images=flat["images"], labels=flat["labels"], rows=flat["rows"], views=flat["views"],
                        teachers=teachers,
                        extra_images={size: flat[f"extra/{i}"] for i, size in enumerate(template.extra_images)})


def _interleaved(tensor: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] as pixel-interleaved [B, H, W, 3] (a view for channels-last input)."""
    return tensor.permute(0, 2, 3, 1) if tensor.dim() == 4 else tensor


class SlotPool:
    """Fixed storage for examples that have been rendered but not yet batched.

    Examples are copied in from the loader's chunks (so a chunk is freed as soon as it arrives,
    whatever order its examples leave in) and gathered out by slot into new batches. The pool
    grows if ever asked for more slots than it has; its size bounds the stream's memory.
    """

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._template: StudentBatch | None = None
        self._storage: dict[str, torch.Tensor] = {}
        self._free: list[int] = list(range(capacity - 1, -1, -1))
        self._used = np.zeros(capacity, bool)
        self.peak = 0  # most examples held at once

    def __len__(self) -> int:
        return self.capacity - len(self._free)

    def put(self, examples: StudentBatch) -> list[int]:
        """Store ``examples``; returns one slot per example."""
        flat = {name: _interleaved(t) for name, t in _tensors(examples).items()}
        if self._template is None:
            self._template = examples.select(torch.zeros(0, dtype=torch.long))
            self._storage = {name: t.new_empty((self.capacity, *t.shape[1:])) for name, t in flat.items()}
        while len(self._free) < len(examples):
            self._grow()
        slots = [self._free.pop() for _ in range(len(examples))]
        self._used[slots] = True
        self.peak = max(self.peak, len(self))
        index = torch.tensor(slots, dtype=torch.long)
        for name, tensor in flat.items():
            storage = self._storage[name]
            if tensor.dim() == 4:  # images: per-example copies beat one index_put on one thread by 10x
                for source, slot in zip(tensor, slots):
                    storage[slot].copy_(source)
            else:
                storage[index] = tensor
        return slots

    def take(self, slots: list[int]) -> StudentBatch:
        """The examples in ``slots``, in that order, as a new batch; the slots become free."""
        index = torch.tensor(slots, dtype=torch.long)
        flat = {name: self._gather(storage, index) for name, storage in self._storage.items()}
        self.release(slots)
        return _batch(self._template, flat)

    def release(self, slots: list[int]) -> None:
        """Free slots whose examples will not be taken."""
        if not self._used[slots].all():
            raise RuntimeError("a pool slot was freed twice")  # two examples would share one slot
        self._used[slots] = False
        self._free.extend(slots)

    @staticmethod
    def _gather(storage: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        gathered = storage.index_select(0, index)
        return gathered.permute(0, 3, 1, 2) if gathered.dim() == 4 else gathered  # images: channels-last

    def _grow(self) -> None:
        extra = max(1, self.capacity)
        for name, storage in self._storage.items():
            grown = storage.new_empty((self.capacity + extra, *storage.shape[1:]))
            grown[:self.capacity] = storage
            self._storage[name] = grown
        self._free.extend(range(self.capacity + extra - 1, self.capacity - 1, -1))
        self._used = np.concatenate([self._used, np.zeros(extra, bool)])
        self.capacity += extra
