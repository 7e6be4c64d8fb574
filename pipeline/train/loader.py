"""Rendering chunks of a shard's samples, in the training process or in spawned loader processes.

A chunk task names one shard and some of its sample positions, in tar order. The renderer
reads the shard's tar forward to them (one open stream per shard, kept between its chunks),
checks each key against the store, decodes each image once, renders its crops at the student's
size (and any extra sizes) with ``render_view`` (the function the cache used, so a replayed
view is the cached view at any resolution), and gathers every joined teacher's cached targets
at those (row, view) pairs. When it reaches a shard's end it checks the shard's sample count
and key hash against the index.

Loader processes are spawned, not forked (zarr and fsspec run event-loop threads that a forked
child can deadlock on, and the trainer runs inside Ray workers), run one torch thread each, and
open the store lazily. A shard's chunks all go to the process that holds its open stream.
"""

from __future__ import annotations

import collections
import os
import pickle
import queue
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.cache.shard_io import ShardSamples, TeacherOutputs
from pipeline.cache.store import CacheStore
from pipeline.data.images import decode_sample
from pipeline.data.shards import DatasetError, DatasetIndex, ImageDecodeError, RawSample, ShardInfo, hash_keys, \
    iter_shard
from pipeline.data.views import ViewPolicy, center_box, policy_view, render_view, stack_views
from pipeline.train.batches import CachedTeacherBatch, SizeKey, StudentBatch
from pipeline.train.epoch_plan import philox

EVAL_VIEW = -1  # the view id of the evaluation centre crop


@dataclass(frozen=True)
class ChunkTask:
    """Render (or, with ``probe``, only decode) some samples of one shard for one epoch."""

    epoch: int
    shard: int
    positions: tuple[int, ...]  # increasing sample positions in the shard
    last: bool = False  # the shard's last chunk of the pass: read on to its end and check it
    probe: bool = False


@dataclass
class ChunkResult:
    """The examples of a chunk: every crop of each rendered position, crops of a position adjacent."""

    shard: int
    positions: np.ndarray  # int64: positions that gave examples, in order
    examples: StudentBatch | None  # None for a probe
    undecodable: list[tuple[int, str]] = field(default_factory=list)  # (position, "key: reason"), without a store
    samples_read: int = 0


@dataclass(frozen=True)
class RenderSpec:
    """What the renderer makes of a sample (everything but the data)."""

    sizes: tuple[SizeKey, ...]  # rendered: the student's (height, width, interpolation) first, then extra ones
    extra_sizes: tuple[SizeKey, ...]  # handed out as extra images (a size asked twice is rendered once)
    crop_pct: float  # evaluation centre crop
    crops: int  # crops per sample per epoch
    num_views: int  # views in the store (0 without a store)
    policy: ViewPolicy  # views without a store
    seed: int
    num_classes: int | None
    teacher_ids: tuple[str, ...]
    features: bool
    eval_mode: bool


class _ShardReader:
    """A forward-only stream over one shard's samples that remembers the keys it passed."""

    def __init__(self, info: ShardInfo):
        self.info = info
        self._samples = iter_shard(info.url)
        self.next_position = 0
        self.keys: list[str] = []

    def read(self, position: int) -> RawSample:
        """The sample at ``position`` (>= next_position), passing over the ones before it."""
        while True:
            raw = next(self._samples, None)
            if raw is not None:
                self.keys.append(raw.key)
            if raw is None or self.next_position >= self.info.num_samples:
                raise self._changed()
            self.next_position += 1
            if self.next_position - 1 == position:
                return raw

    def finish(self) -> None:
        """Read to the end; the shard must still be the indexed one (count and key hash)."""
        self.keys.extend(raw.key for raw in self._samples)
        if len(self.keys) != self.info.num_samples or hash_keys(self.keys) != self.info.keys_sha256:
            raise self._changed()

    def _changed(self) -> DatasetError:
        self.keys.extend(raw.key for raw in self._samples)
        return DatasetError(f"shard {self.info.name} changed since it was indexed: {len(self.keys)} samples "
                            f"read, {self.info.num_samples} indexed, or other keys")


class ChunkRenderer:
    """Runs chunk tasks; built in the main process, run there or in loader processes."""

    def __init__(self, dataset: DatasetIndex, store_path: str | None, spec: RenderSpec, max_open_shards: int):
        self.dataset = dataset
        self.store_path = store_path
        self.spec = spec
        self.max_open_shards = max_open_shards
        self._store: CacheStore | None = None
        self._readers: collections.OrderedDict[int, _ShardReader] = collections.OrderedDict()
        self._rows: collections.OrderedDict[int, tuple[ShardSamples, dict[str, TeacherOutputs]]] = \
            collections.OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None, "_readers": collections.OrderedDict(),
                "_rows": collections.OrderedDict()}  # each process opens its own

    @property
    def store(self) -> CacheStore | None:
        if self._store is None and self.store_path is not None:
            self._store = CacheStore.open(self.store_path)
        return self._store

    def run(self, task: ChunkTask) -> ChunkResult:
        reader = self._reader(task.shard, task.positions[0] if task.positions else 0)
        samples, targets = self._shard_rows(task.shard)
        positions, examples, undecodable = [], [], []
        start = reader.next_position
        for position in task.positions:
            raw = reader.read(position)
            if samples is not None and samples.keys[position] != raw.key:
                raise DatasetError(f"shard {reader.info.name}, position {position}: the tar has sample {raw.key!r}, "
                                   f"the store has {str(samples.keys[position])!r}; the shards changed since the "
                                   "store was built")
            label = self._checked_label(reader.info.name, raw)
            try:
                image = decode_sample(raw)
            except ImageDecodeError as e:
                if samples is not None:
                    raise DatasetError(f"shard {reader.info.name}: sample {raw.key!r} is valid in the store but "
                                       f"cannot be decoded now ({e})") from e
                undecodable.append((position, f"{raw.key}: {e}"))
                continue
            positions.append(position)
            if not task.probe:
                examples.append(self._render(task.epoch, raw.key, label, image, samples, position))
        if task.last:
            reader.finish()
            self._close(task.shard)
        result = ChunkResult(task.shard, np.asarray(positions, np.int64), None, undecodable,
                             samples_read=reader.next_position - start)
        if not task.probe:
            result.examples = self._assemble(task.shard, examples, targets)
        return result

    # ----- one sample ------------------------------------------------------------------

    def _render(self, epoch: int, key: str, label: int, image: torch.Tensor, samples: ShardSamples | None,
                position: int) -> tuple[int, int, list[tuple[int, list[torch.Tensor]]]]:
        """(position, label, [(view id, [crop per size])]) for the sample's crops this epoch."""
        crops = []
        for view, box, flip in self._views(epoch, key, image, samples, position):
            crops.append((view, [render_view(image, box, flip, size[:2], size[2]) for size in self.spec.sizes]))
        return position, label, crops

    def _views(self, epoch: int, key: str, image: torch.Tensor, samples: ShardSamples | None,
               position: int) -> list[tuple[int, np.ndarray, bool]]:
        """(view id, box, flip) of each crop of one image in this epoch."""
        spec = self.spec
        height, width = image.shape[-2:]
        if spec.eval_mode:
            size = spec.sizes[0][:2]
            return [(EVAL_VIEW, center_box(width, height, size, spec.crop_pct), False)]
        ids = [epoch * spec.crops + j for j in range(spec.crops)]
        if samples is None:  # fresh policy views every epoch
            return [(i, *policy_view(spec.policy, key, i, width, height)) for i in ids]
        # Cached views: a per-sample permutation, walked across epochs, covers all V before repeating.
        perm = philox("views", spec.seed, key).permutation(spec.num_views)
        chosen = [int(perm[i % spec.num_views]) for i in ids]
        return [(v, samples.boxes[position, v], bool(samples.flips[position, v])) for v in chosen]

    def _checked_label(self, shard_name: str, raw: RawSample) -> int:
        limit = self.spec.num_classes
        if raw.label is None or (limit is not None and raw.label >= limit):
            found = "no class label" if raw.label is None else f"label {raw.label}"
            expected = f"[0, {limit})" if limit is not None else "a class index"
            raise DatasetError(f"shard {shard_name}: sample {raw.key!r} has {found}, expected {expected}")
        return raw.label

    # ----- one chunk -------------------------------------------------------------------

    def _assemble(self, shard: int, rendered: list, targets: dict[str, TeacherOutputs]) -> StudentBatch:
        positions = np.array([p for p, _, crops in rendered for _ in crops], np.int64)
        views = np.array([v for _, _, crops in rendered for v, _ in crops], np.int64)
        labels = np.array([label for _, label, crops in rendered for _ in crops], np.int64)
        images = [[] for _ in self.spec.sizes]
        for _, _, crops in rendered:
            for _, per_size in crops:
                for i, crop in enumerate(per_size):
                    images[i].append(crop)
        stacked = [stack_views(views_) if views_ else torch.empty((0, 3, h, w), dtype=torch.uint8)
                   for views_, (h, w, _) in zip(images, self.spec.sizes)]
        return StudentBatch(
            images=stacked[0], labels=torch.from_numpy(labels),
            rows=torch.from_numpy(shard * self.dataset.rows_per_shard + positions), views=torch.from_numpy(views),
            teachers={tid: teacher_targets(out, positions, views) for tid, out in targets.items()},
            extra_images={size: stacked[self.spec.sizes.index(size)] for size in self.spec.extra_sizes})

    # ----- per-shard state -------------------------------------------------------------

    def _reader(self, shard: int, first: int) -> _ShardReader:
        reader = self._readers.get(shard)
        if reader is None or reader.next_position > first:  # a new pass, or a chunk asked again
            reader = _ShardReader(self.dataset.shards[shard])
            self._readers[shard] = reader
        self._readers.move_to_end(shard)
        while len(self._readers) > self.max_open_shards:  # abandoned passes leave streams open
            self._close(next(iter(self._readers)))
        return reader

    def _shard_rows(self, shard: int) -> tuple[ShardSamples | None, dict[str, TeacherOutputs]]:
        if self.store is None:
            return None, {}
        if shard not in self._rows:
            store = self.store
            self._rows[shard] = (store.read_samples(shard),
                                 {tid: store.read_teacher(tid, shard, self.spec.features)
                                  for tid in self.spec.teacher_ids})
            while len(self._rows) > self.max_open_shards:
                self._rows.popitem(last=False)
        return self._rows[shard]

    def _close(self, shard: int) -> None:
        self._readers.pop(shard, None)
        self._rows.pop(shard, None)


def teacher_targets(outputs: TeacherOutputs, positions: np.ndarray, views: np.ndarray) -> CachedTeacherBatch:
    """One teacher's cached targets at (position, view) pairs of a shard's rows."""
    features = mask = None
    if outputs.features is not None:
        mask = views < outputs.features.shape[1]
        dense = np.zeros((len(views), outputs.features.shape[2]), np.float32)
        dense[mask] = outputs.features[positions[mask], views[mask]]
        features, mask = torch.from_numpy(dense), torch.from_numpy(mask)
    return CachedTeacherBatch(
        topk_logprob=torch.from_numpy(outputs.topk_logprob[positions, views].astype(np.float32)),
        topk_index=torch.from_numpy(outputs.topk_index[positions, views].astype(np.int64)),
        log_leftover=torch.from_numpy(outputs.log_leftover[positions, views].astype(np.float32)),
        features=features, feature_mask=mask)


# ---------------------------------------------------------------------------- running tasks


class LocalRunner:
    """Runs tasks in the calling process, when their results are asked for."""

    def __init__(self, renderer: ChunkRenderer):
        self.renderer = renderer
        self._pending: collections.deque[tuple[int, ChunkTask]] = collections.deque()
        self.workers = 1

    def submit(self, task_id: int, task: ChunkTask, worker: int) -> None:
        self._pending.append((task_id, task))

    def get(self) -> tuple[int, ChunkResult]:
        task_id, task = self._pending.popleft()
        return task_id, self.renderer.run(task)

    def discard(self, task_ids: list[int]) -> None:
        dropped = set(task_ids)
        self._pending = collections.deque(item for item in self._pending if item[0] not in dropped)

    def close(self) -> None:
        self._pending.clear()


def _loader_main(renderer: ChunkRenderer, tasks, results, parent: int) -> None:
    """A loader process: run tasks until told to stop (None); errors go back as results.

    It also stops when its training process is gone: a SIGKILLed Ray Train worker cannot
    tell it to, and Ray restarts the worker in a new process that spawns its own loaders."""
    torch.set_num_threads(1)
    while True:
        try:
            item = tasks.get(timeout=2.0)
        except queue.Empty:
            if os.getppid() != parent:
                return
            continue
        if item is None:
            return
        task_id, task = item
        try:
            results.put((task_id, renderer.run(task), None))
        except Exception as e:  # noqa: BLE001 - every error is the main process's to raise
            results.put((task_id, None, _picklable(e)))


def _picklable(error: Exception) -> Exception:
    try:
        pickle.dumps(error)
        return error
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(error).__name__}: {error}")


class ProcessRunner:
    """Runs tasks on spawned loader processes, one task queue each, results in arrival order."""

    def __init__(self, renderer: ChunkRenderer, workers: int):
        context = torch.multiprocessing.get_context("spawn")
        self.workers = workers
        self._results = context.Queue()
        self._queues = [context.Queue() for _ in range(workers)]
        self._discarded: set[int] = set()
        self._processes = [context.Process(target=_loader_main, args=(renderer, q, self._results, os.getpid()),
                                           daemon=True,
                                           name=f"loader-{i}") for i, q in enumerate(self._queues)]
        for process in self._processes:
            process.start()

    def submit(self, task_id: int, task: ChunkTask, worker: int) -> None:
        self._queues[worker].put((task_id, task))

    def get(self) -> tuple[int, ChunkResult]:
        while True:
            try:
                task_id, result, error = self._results.get(timeout=5.0)
            except queue.Empty:
                dead = [p for p in self._processes if not p.is_alive()]
                if dead:
                    raise RuntimeError(f"loader process {dead[0].name} died (exit code {dead[0].exitcode})") from None
                continue
            if task_id in self._discarded:
                self._discarded.discard(task_id)
                continue
            if error is not None:
                raise error
            return task_id, result

    def discard(self, task_ids: list[int]) -> None:
        """Drop these tasks' results when they arrive."""
        self._discarded.update(task_ids)

    def close(self) -> None:
        for q in self._queues:
            q.put(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
        self._processes = []
