"""Student training data: stream the shards, replay each sample's cached views, join the teachers' targets.

Data flow. Each epoch a rank follows an ``EpochPlan`` (pipeline/train/epoch_plan.py): its shards,
``shards_in_flight`` at a time, their examples interleaved, then a shuffle buffer, so a batch
mixes many shards. The examples are rendered by chunk tasks (pipeline/train/loader.py: a few
consecutive samples of one shard, read from its open tar stream, keys checked against the
store, views replayed, teacher targets joined) that run in the training process
(``loader_workers=0``) or on spawned loader processes. Rendered examples wait in a ``SlotPool``
until the plan hands them out, so memory holds the shuffle buffer and the chunks in flight,
never a whole rendered shard.

Determinism and resume. Every random choice comes from a counter-based generator keyed by what
it decides: the epoch's shard order by (seed, epoch), the interleaving and the buffer by (seed,
epoch, rank), a sample's view permutation by (seed, key). The batches are therefore a pure
function of (seed, epoch, rank, world_size, dataset, store, config), whatever ``loader_workers``
and timing, and ``iter_epoch(e, start_step=k)`` yields exactly batches k, k+1, ... of the
uninterrupted epoch, reading only the chunks that hold examples of those batches. Without a
store, an image that fails to decode shows only when decoded: a resumed stream first decodes
(without rendering) the samples before its start to learn which examples it gave.

Distributed training. Rank r takes shards r, r + W, ... of the epoch's shuffled shard list.
DDP needs the same step count on every rank, so ``steps_per_epoch`` is floor(E / batch_size)
with E the examples of the floor(S / W) smallest shards: a bound that holds on every rank in
every epoch, whichever shards it gets (the ranks' surplus examples of an epoch are dropped, and
differ from epoch to epoch). Without a store the counts are the index's, and images that fail
to decode make a stream shorter: a rank that runs out wraps around to its epoch start and
repeats its examples until it has its steps.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from pipeline.cache.compat import MAX_LISTED, listed
from pipeline.cache.store import CacheStore
from pipeline.data.shards import DatasetError, DatasetIndex
from pipeline.data.views import ViewPolicy
from pipeline.train.batches import SizeKey, SlotPool, StudentBatch
from pipeline.train.epoch_plan import EpochPlan, epoch_shards, make_plan, philox
from pipeline.train.loader import ChunkRenderer, ChunkResult, ChunkTask, LocalRunner, ProcessRunner, RenderSpec


@dataclass(frozen=True)
class StudentInput:
    """How the student sees images: input size and resize filter, normalisation, eval crop."""

    size: tuple[int, int]  # (height, width)
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    crop_pct: float = 0.875  # eval centre crop side / shorter image side

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) < 1:
            raise ValueError(f"size must be (height, width) >= 1, got {self.size}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")

    @classmethod
    def from_model(cls, model: torch.nn.Module, img_size: int | None = None) -> StudentInput:
        """From a timm model's ``pretrained_cfg`` (timm fills what it lacks); ``img_size`` overrides the size."""
        from timm.data import resolve_data_config

        cfg = resolve_data_config(model=model)
        _, height, width = cfg["input_size"]
        return cls(size=(img_size, img_size) if img_size else (int(height), int(width)),
                   interpolation=str(cfg["interpolation"]), mean=tuple(float(m) for m in cfg["mean"]),
                   std=tuple(float(s) for s in cfg["std"]), crop_pct=float(cfg["crop_pct"]))


@dataclass(frozen=True)
class StreamConfig:
    """What a stream produces; with the dataset, store, rank and world size it fixes every batch."""

    batch_size: int
    seed: int = 0
    crops_per_image: int = 1  # views per decoded image per epoch (1 in eval mode)
    loader_workers: int = 0  # spawned loader processes; 0 = in-process
    shards_in_flight: int = 16  # shards read at once, their examples interleaved
    shuffle_buffer: int = 2048  # examples; the memory of rendered examples waiting to be batched
    chunk_size: int = 16  # samples per loader task
    num_classes: int | None = None  # label range; None = the dataset's class names, if any
    teacher_ids: tuple[str, ...] = ()  # cached teachers to join (empty = labels only)
    features: bool = True  # also join cached features where the teacher has them
    extra_sizes: tuple[SizeKey, ...] = ()  # each view also rendered at these (height, width, interpolation)
    view_policy: ViewPolicy | None = None  # views without a store; default RandomResizedCrop, seeded by seed

    def __post_init__(self) -> None:
        for name in ("batch_size", "crops_per_image", "shards_in_flight", "shuffle_buffer", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {self.loader_workers}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        object.__setattr__(self, "teacher_ids", tuple(self.teacher_ids))
        object.__setattr__(self, "extra_sizes", tuple((int(h), int(w), str(i)) for h, w, i in self.extra_sizes))


@dataclass
class StreamStats:
    """Counts over the stream's life."""

    chunks_read: int = 0  # loader tasks run (render or probe)
    samples_read: int = 0  # samples the loader passed in the tars (decoded or not)
    examples: int = 0  # examples yielded in batches
    skipped_invalid: int = 0  # samples the store marks invalid, per pass over a rank's shards
    undecodable: int = 0  # images that failed to decode (streams without a store)
    wraps: int = 0  # times a rank's stream wrapped around to its epoch start
    wait_seconds: float = 0.0  # time the stream waited for the loader
    undecodable_samples: list[str] = field(default_factory=list)  # "key: reason", the first few


@dataclass
class _Chunks:
    """A plan's examples grouped into loader tasks of ``size`` consecutive usable samples of a shard."""

    of_read: np.ndarray  # [E] chunk id of each read index (chunk ids in order of first read)
    shard: np.ndarray  # [n] dataset shard index
    index: np.ndarray  # [n] chunk number within its shard
    last: np.ndarray  # [n] bool: the shard's last chunk
    reads: np.ndarray  # [n, size, crops] read index of each (sample in chunk, crop); -1 if not needed


class StudentStream:
    """Batches for one rank: interleaved shards, a shuffle buffer, replayed cached views, joined targets.

    With ``store_path`` None it trains on labels only, with fresh views from a ViewPolicy each
    epoch. ``eval_mode`` gives every sample once, centre-cropped, in dataset order, without a
    store and without dropping the last batch.
    """

    def __init__(self, dataset: DatasetIndex, store_path: str | None, student: StudentInput,
                 config: StreamConfig, rank: int = 0, world_size: int = 1, eval_mode: bool = False):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        if eval_mode and store_path is not None:
            raise ValueError("evaluation streams use the centre crop, not cached views: pass store_path=None")
        if config.teacher_ids and store_path is None:
            raise ValueError(f"teachers {config.teacher_ids} need a store")
        self.dataset, self.store_path, self.student, self.config = dataset, store_path, student, config
        self.rank, self.world_size, self.eval_mode = rank, world_size, eval_mode
        self.stats = StreamStats()
        self.crops = 1 if eval_mode else config.crops_per_image
        self.temperatures: tuple[float, ...] = ()
        self._teacher_info: dict[str, dict] = {}
        num_views = 0
        if store_path is not None:
            num_views, valid = self._read_store(store_path)
            self._usable = {s: np.flatnonzero(valid[s]) for s in range(len(dataset.shards))}
        else:
            self._usable = {s: np.arange(info.num_samples) for s, info in enumerate(dataset.shards)}
        self._shards = [s for s, positions in self._usable.items() if len(positions)]
        if len(self._shards) < world_size and not eval_mode:  # an eval rank may have nothing to do
            raise ValueError(f"{len(self._shards)} shard(s) with samples cannot feed {world_size} ranks")
        num_classes = config.num_classes or (len(dataset.class_names) if dataset.class_names else None)
        spec = RenderSpec(sizes=tuple(dict.fromkeys([(*student.size, student.interpolation), *config.extra_sizes])),
                          extra_sizes=config.extra_sizes,
                          crop_pct=student.crop_pct, crops=self.crops, num_views=num_views,
                          policy=config.view_policy or ViewPolicy(num_views=1, seed=config.seed), seed=config.seed,
                          num_classes=num_classes, teacher_ids=config.teacher_ids, features=config.features,
                          eval_mode=eval_mode)
        self._renderer = ChunkRenderer(dataset, store_path, spec, max_open_shards=2 * config.shards_in_flight)
        self._runner: LocalRunner | ProcessRunner | None = None
        self._pool = SlotPool(config.shuffle_buffer + 4 * config.batch_size)
        self._next_task_id = 0
        # Without a store: which positions were decoded, and which failed (learned as the stream goes).
        self._seen: dict[int, np.ndarray] = {}  # shard -> bool [C]
        self._failed: dict[int, set[int]] = {}
        self._steps = self._count_steps()

    def _read_store(self, path: str) -> tuple[int, np.ndarray]:
        store = CacheStore.open(path)
        store.check_ready(self.dataset, self.config.teacher_ids)
        num_views = store.config.views.num_views
        if self.config.crops_per_image > num_views:
            raise ValueError(f"crops_per_image {self.config.crops_per_image} exceeds the store's {num_views} views")
        self.temperatures = store.config.temperatures
        for tid in self.config.teacher_ids:
            record = store.teacher_record(tid)
            has_features = self.config.features and "features" in store.teacher(tid)
            self._teacher_info[tid] = {
                "num_classes": int(record["num_classes"]),
                "feature_dim": int(record["feature_dim"]) if has_features else None,
                "feature_views": store.config.num_feature_views if has_features else 0,
                "topk": store.config.topk,
                "preprocessing": record.get("preprocessing"),
            }
        valid = store.group["samples/valid"][:].reshape(store.num_shards, store.rows_per_shard)
        return num_views, valid

    # ----- what the trainer asks -------------------------------------------------

    def teacher_info(self) -> dict[str, dict]:
        """Per joined teacher: num_classes, feature_dim (None without joined features), feature_views, topk."""
        return {tid: dict(info) for tid, info in self._teacher_info.items()}

    def epoch_shards(self, epoch: int) -> list[int]:
        """This rank's shards for ``epoch``, in the order they are opened."""
        return epoch_shards(self._shards, self.config.seed, epoch, self.rank, self.world_size,
                            shuffle=not self.eval_mode)

    def steps_per_epoch(self) -> int:
        """Train mode: the same on every rank and epoch. Eval mode: this rank's batches (an upper bound
        without a store when images fail to decode)."""
        return self._steps

    def _count_steps(self) -> int:
        batch = self.config.batch_size
        counts = {s: len(self._usable[s]) * self.crops for s in self._shards}
        if self.eval_mode:
            return math.ceil(sum(counts[s] for s in self.epoch_shards(0)) / batch)
        per_rank = len(self._shards) // self.world_size
        fewest = sum(sorted(counts.values())[:per_rank])
        if fewest < batch:
            raise ValueError(f"batch_size {batch} exceeds the {fewest} examples a rank is sure to get per epoch")
        return fewest // batch

    def plan(self, epoch: int) -> EpochPlan:
        """The order of this rank's examples in ``epoch`` (evaluation: dataset order)."""
        rng = None if self.eval_mode else philox("plan", self.config.seed, epoch, self.rank)
        return make_plan(self.epoch_shards(epoch), self._usable, self.crops, self.config.shards_in_flight,
                         self.config.shuffle_buffer, rng)

    # ----- batches ---------------------------------------------------------------

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[StudentBatch]:
        """Batches ``start_step, start_step + 1, ...`` of ``epoch``, exactly as an uninterrupted epoch gives them."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        batch = self.config.batch_size
        total = None if self.eval_mode else (self._steps - start_step) * batch
        if total is not None and total <= 0:
            return
        plan = self.plan(epoch)
        start, wraps = self._locate(epoch, plan, start_step * batch)
        self.stats.wraps += wraps
        slots = self._slots(epoch, plan, start)
        pending: list[int] = []
        emitted = 0
        try:
            for slot in slots:
                pending.append(slot)
                if len(pending) == batch or (total is not None and emitted + len(pending) == total):
                    emitted += len(pending)
                    yield self._take(pending)
                    if total is not None and emitted >= total:
                        return
            if pending:
                yield self._take(pending)
        finally:
            self._pool.release(pending)
            slots.close()

    def _take(self, slots: list[int]) -> StudentBatch:
        """The examples in ``slots`` as a batch; empties ``slots`` (their slots are free again)."""
        self.stats.examples += len(slots)
        batch = self._pool.take(list(slots))
        slots.clear()
        return batch

    def _slots(self, epoch: int, plan: EpochPlan, start: int) -> Iterator[int]:
        """Pool slots of the rank's examples from hand-out index ``start`` on, wrapping around in train mode."""
        while True:
            produced = 0
            for slot in self._pass(epoch, plan, start):
                produced += 1
                yield slot
            if self.eval_mode:
                return
            if start == 0 and produced == 0:
                raise DatasetError(f"rank {self.rank}: no sample of its shards gives an example "
                                   f"({listed([self.dataset.shards[s].name for s in self.epoch_shards(epoch)])})")
            start = 0
            self.stats.wraps += 1

    def _pass(self, epoch: int, plan: EpochPlan, start: int) -> Iterator[int]:
        """One pass over the plan from hand-out index ``start``: render chunks ahead, hand out slots in plan order."""
        chunks = self._chunks(plan, start)
        runner = self._ensure_runner()
        limit = 4 * runner.workers  # loader tasks in flight
        slot_of: dict[int, int] = {}
        arrived = np.zeros(len(chunks.shard), bool)
        in_flight: dict[int, int] = {}  # task id -> chunk id
        worker_of: dict[int, int] = {}  # shard -> the loader process holding its stream
        self._count_invalid(plan)
        next_chunk = 0
        chunk_of_read = chunks.of_read.tolist()  # Python ints: this loop runs once per example
        try:
            for read in plan.emit[start:].tolist():
                chunk = chunk_of_read[read]
                while not arrived[chunk]:
                    while next_chunk < len(arrived) and (next_chunk <= chunk or len(in_flight) < limit):
                        if not self._dispatch(epoch, chunks, next_chunk, in_flight, worker_of, runner):
                            arrived[next_chunk] = True  # nothing of it is needed
                        next_chunk += 1
                    if not arrived[chunk]:
                        done = self._receive(chunks, in_flight, slot_of, runner)
                        if done is not None:
                            arrived[done] = True
                slot = slot_of.pop(read, None)
                if slot is None:
                    shard, position = int(plan.shard[read]), int(plan.position[read])
                    if position not in self._failed.get(shard, ()):  # only an undecodable image may drop out
                        raise RuntimeError(f"shard {shard} position {position}: its chunk came back without it")
                    continue
                yield slot
        finally:
            self._pool.release(list(slot_of.values()))
            runner.discard(list(in_flight))  # an abandoned pass's results must not be taken for a later one's

    def _dispatch(self, epoch: int, chunks: _Chunks, chunk: int, in_flight: dict[int, int],
                  worker_of: dict[int, int], runner) -> bool:
        """Send a chunk's task to the process holding its shard's stream; False if none of it is needed."""
        needed = (chunks.reads[chunk] >= 0).any(axis=-1)
        if not needed.any():
            return False
        shard, index = int(chunks.shard[chunk]), int(chunks.index[chunk])
        positions = self._usable[shard][index * self.config.chunk_size:(index + 1) * self.config.chunk_size]
        task = ChunkTask(epoch=epoch, shard=shard, positions=tuple(positions[needed[:len(positions)]].tolist()),
                         last=bool(chunks.last[chunk]))
        if shard not in worker_of:
            load = [sum(1 for w in worker_of.values() if w == i) for i in range(runner.workers)]
            worker_of[shard] = int(np.argmin(load))
        task_id = self._next_task_id
        self._next_task_id += 1
        runner.submit(task_id, task, worker_of[shard])
        in_flight[task_id] = chunk
        if task.last:
            del worker_of[shard]
        return True

    def _receive(self, chunks: _Chunks, in_flight: dict[int, int], slot_of: dict[int, int], runner) -> int | None:
        """Take one loader result into the pool; returns its chunk id (None for a stale result)."""
        started = time.perf_counter()
        task_id, result = runner.get()
        self.stats.wait_seconds += time.perf_counter() - started
        chunk = in_flight.pop(task_id, None)
        if chunk is None:
            return None
        self._record(result)
        index = int(chunks.index[chunk])
        rows = result.positions if len(result.positions) else np.zeros(0, np.int64)
        usable = self._usable[result.shard]
        within = np.searchsorted(usable, rows) - index * self.config.chunk_size
        reads = chunks.reads[chunk][within].reshape(-1)  # examples come as (sample, crop), crops adjacent
        keep = reads >= 0
        if keep.any():
            examples = result.examples
            if not keep.all():
                examples = examples.select(torch.from_numpy(np.flatnonzero(keep)))
            for read, slot in zip(reads[keep].tolist(), self._pool.put(examples)):
                slot_of[read] = slot
        return chunk

    def _record(self, result: ChunkResult) -> None:
        stats = self.stats
        stats.chunks_read += 1
        stats.samples_read += result.samples_read
        seen = self._seen.setdefault(result.shard, np.zeros(self.dataset.rows_per_shard, bool))
        seen[result.positions] = True
        if result.undecodable:
            failed = self._failed.setdefault(result.shard, set())
            new = [(p, reason) for p, reason in result.undecodable if p not in failed]
            seen[[p for p, _ in result.undecodable]] = True
            failed.update(p for p, _ in result.undecodable)
            stats.undecodable += len(result.undecodable)
            stats.undecodable_samples.extend(
                reason for _, reason in new[:max(0, MAX_LISTED - len(stats.undecodable_samples))])

    def _count_invalid(self, plan: EpochPlan) -> None:
        if self.store_path is not None:
            shards = np.unique(plan.shard)
            self.stats.skipped_invalid += int(sum(self.dataset.shards[s].num_samples - len(self._usable[s])
                                                  for s in shards.tolist()))

    def _chunks(self, plan: EpochPlan, start: int) -> _Chunks:
        """Group the plan's reads into loader tasks; reads handed out before ``start`` are not needed."""
        size, crops = self.config.chunk_size, self.crops
        shards = np.unique(plan.shard)
        # rank[r]: index of read r's sample among its shard's usable samples, from a [shards, C] table.
        table = np.zeros((len(shards), self.dataset.rows_per_shard), np.int64)
        for i, shard in enumerate(shards.tolist()):
            table[i, self._usable[shard]] = np.arange(len(self._usable[shard]))
        rank = table[np.searchsorted(shards, plan.shard), plan.position]
        within = rank // size
        code = plan.shard * (int(within.max(initial=0)) + 1) + within
        keys, first, inverse = np.unique(code, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")
        chunk_of_key = np.empty(len(keys), np.int64)
        chunk_of_key[order] = np.arange(len(keys))
        of_read = chunk_of_key[inverse]
        shard, index = plan.shard[first[order]], within[first[order]]
        chunks_per_shard = np.array([(len(self._usable[s]) + size - 1) // size for s in shards.tolist()], np.int64)
        last = index == chunks_per_shard[np.searchsorted(shards, shard)] - 1
        reads = np.full((len(keys), size, crops), -1, np.int64)
        needed = plan.emit[start:]
        reads[of_read[needed], rank[needed] - within[needed] * size, plan.crop[needed]] = needed
        return _Chunks(of_read=of_read, shard=shard, index=index, last=last, reads=reads)

    def _locate(self, epoch: int, plan: EpochPlan, skip: int) -> tuple[int, int]:
        """(hand-out index of example ``skip`` of the epoch, passes wrapped before it).

        With a store every planned example exists. Without one, images that fail to decode drop
        out, so the samples handed out before ``skip`` are first decoded to find them.
        """
        if skip == 0 or self.store_path is not None:
            return skip, 0
        wraps = 0
        while True:
            good = 0
            for t, read in enumerate(plan.emit.tolist()):
                shard, position = int(plan.shard[read]), int(plan.position[read])
                if shard not in self._seen or not self._seen[shard][position]:
                    self._probe(epoch, shard, position)
                if position in self._failed.get(shard, ()):
                    continue
                if good == skip:
                    return t, wraps
                good += 1
            if good == 0 or self.eval_mode:
                return len(plan.emit), wraps
            wraps, skip = wraps + skip // good, skip % good

    def _probe(self, epoch: int, shard: int, position: int) -> None:
        """Decode (without rendering) the chunk of samples around ``position`` to learn which fail."""
        size = self.config.chunk_size
        index = int(np.searchsorted(self._usable[shard], position)) // size
        positions = self._usable[shard][index * size:(index + 1) * size]
        runner = self._ensure_runner()
        task_id = self._next_task_id
        self._next_task_id += 1
        runner.submit(task_id, ChunkTask(epoch, shard, tuple(positions.tolist()), probe=True), 0)
        while True:
            got, result = runner.get()
            if got == task_id:
                self._record(result)
                return

    def _ensure_runner(self) -> LocalRunner | ProcessRunner:
        if self._runner is None:
            workers = self.config.loader_workers
            self._runner = ProcessRunner(self._renderer, workers) if workers else LocalRunner(self._renderer)
        return self._runner

    # ----- lifetime --------------------------------------------------------------

    def close(self) -> None:
        """Stop the loader processes (a later epoch starts new ones)."""
        if self._runner is not None:
            self._runner.close()
            self._runner = None

    def __enter__(self) -> StudentStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

