"""The order in which one rank sees its examples in one epoch: a pure function of counts and the seed.

An example is one crop of one sample: (shard, position in the shard, crop j). A rank reads its
shards ``shards_in_flight`` at a time, taking the examples of each shard in tar order and the
shards' examples in a random interleaving (every shard of the window advances at the same
average rate), then passes them through a shuffle buffer of ``buffer_size`` examples. So each
batch mixes many shards, while the loader only ever holds a window of open tar streams and a
buffer of rendered examples, never a whole rendered shard.

Nothing here looks at pixels: the plan depends only on which samples are usable, the seed, the
epoch and the rank. Two runs, or a run and its resumption, therefore see the same examples in
the same order, whatever the number of loader processes or their timing.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


def philox(*parts: object) -> np.random.Generator:
    """A Philox generator keyed by ``parts``: the same draws in any process, in any order."""
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))


def epoch_shards(shards: list[int], seed: int, epoch: int, rank: int, world_size: int, shuffle: bool) -> list[int]:
    """A rank's shards for an epoch: every ``world_size``-th of the epoch's shuffled (or given) order."""
    if shuffle:
        shards = [shards[i] for i in philox("shards", seed, epoch).permutation(len(shards))]
    return shards[rank::world_size]


@dataclass(frozen=True)
class EpochPlan:
    """Examples in read order (arrays [E]) and the order they are handed out in (``emit``)."""

    shard: np.ndarray  # int64 dataset shard index
    position: np.ndarray  # int64 sample position in its shard (tar order)
    crop: np.ndarray  # int64 crop index j (0 .. crops_per_image - 1)
    emit: np.ndarray  # int64 [E]: emit[t] is the read index of the t-th example handed out

    def __len__(self) -> int:
        return len(self.emit)


def interleave(shards: list[int], positions: dict[int, np.ndarray], crops: int, window: int,
               rng: np.random.Generator | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(shard, position, crop) in read order: shards ``window`` at a time, randomly interleaved.

    Within a window, the sequence of which shard gives the next example is a uniform shuffle of
    the window's examples' shard labels, so every shard advances through its own examples (tar
    order, crops adjacent) at the same average rate. ``rng`` None keeps the shards one after the
    other (evaluation).
    """
    parts = []
    for start in range(0, len(shards), window):
        group = shards[start:start + window]
        counts = np.array([len(positions[s]) * crops for s in group], np.int64)
        labels = np.repeat(np.arange(len(group)), counts)
        if rng is not None:
            labels = rng.permutation(labels)
        # The k-th appearance of a shard's label takes that shard's k-th example.
        nth = np.empty(len(labels), np.int64)
        order = np.argsort(labels, kind="stable")
        nth[order] = np.arange(len(labels)) - np.repeat(np.cumsum(counts) - counts, counts)
        shard_of = np.array(group, np.int64)[labels]
        position = np.empty(len(labels), np.int64)
        for i, s in enumerate(group):
            mine = labels == i
            position[mine] = positions[s][nth[mine] // crops]
        parts.append((shard_of, position, nth % crops))
    if not parts:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    return tuple(np.concatenate(p) for p in zip(*parts))  # type: ignore[return-value]


def shuffle_buffer(count: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Hand-out order of ``count`` items read in order through a shuffle buffer of ``size``.

    The buffer fills with the first ``size`` items; then each new item replaces a random one,
    which is handed out; at the end the rest leave in random order. The t-th item handed out
    was read before item t + size: a reader never runs more than ``size`` items ahead.
    """
    size = max(1, min(size, count))
    emit = np.empty(count, np.int64)
    buffer = np.arange(size, dtype=np.int64)
    picks = rng.integers(0, size, count - size)
    for t, (incoming, pick) in enumerate(zip(range(size, count), picks.tolist())):
        emit[t] = buffer[pick]
        buffer[pick] = incoming
    emit[count - size:] = buffer[rng.permutation(size)]
    return emit


def make_plan(shards: list[int], positions: dict[int, np.ndarray], crops: int, window: int, buffer_size: int,
              rng: np.random.Generator | None) -> EpochPlan:
    """The plan of one rank's epoch; ``rng`` None gives evaluation order (no interleaving, no buffer)."""
    shard, position, crop = interleave(shards, positions, crops, window, rng)
    emit = np.arange(len(shard), dtype=np.int64) if rng is None else shuffle_buffer(len(shard), buffer_size, rng)
    return EpochPlan(shard=shard, position=position, crop=crop, emit=emit)
