"""Student training data: stream the shards, replay each sample's cached views, join the teachers' targets.

Data flow. The unit of loader work is one tar shard: the task "render shard s for epoch e"
reads the shard's tar once and, with a store, the shard's cache rows once (its chunk of each
array). It checks every sample key against the store's, skips samples the store marks invalid,
decodes each image once and renders ``crops_per_image`` views of it with ``render_view`` (the
function the cache used, so a replayed view is the cached view, at any resolution), and gathers
every teacher's targets at those (row, view) pairs. A shard's examples come back in a fixed
permuted order; the main process consumes shards in the epoch's order and cuts batches across
shard boundaries. Tasks run in-process (``loader_workers=0``) or on spawned loader processes
(zarr and fsspec run event-loop threads that forked children can deadlock on, and the trainer
runs inside Ray workers), which open the store and the shards lazily.

Determinism and resume. Every random choice comes from a counter-based generator keyed by what
it decides: the epoch's shard order by (seed, epoch), a shard's example order by (seed, epoch,
shard), a sample's view permutation by (seed, key). The batches are therefore a pure function of
(seed, epoch, rank, world_size, dataset, store, config), whatever ``loader_workers`` and timing,
and ``iter_epoch(e, start_step=k)`` yields exactly batches k, k+1, ... of the uninterrupted epoch.
Shards wholly before batch k are skipped unread when their example counts are known (from the
store's valid flags, or learned from an earlier read in this process); without a store they are
first counted (decoded, not rendered), since an image that fails to decode shows only then.

Distributed training. Rank r takes shards r, r + W, ... of the epoch's shuffled shard list.
DDP needs the same step count on every rank, so ``steps_per_epoch`` is floor(E / batch_size)
with E the examples of the floor(S / W) smallest shards: a bound that holds on every rank in
every epoch, whichever shards it gets (the ranks' surplus examples of an epoch are dropped, and
differ from epoch to epoch). Without a store the counts are the index's, and images that fail
to decode make a stream shorter: a rank that runs out wraps around to its epoch start and
repeats its examples until it has its steps.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field, fields
from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline.cache.compat import MAX_LISTED, listed
from pipeline.cache.shard_io import ShardSamples, TeacherOutputs
from pipeline.cache.store import CacheStore
from pipeline.data.shards import DatasetError, DatasetIndex, ImageDecodeError, RawSample, decode_image, hash_keys, \
    iter_shard
from pipeline.data.views import ViewPolicy, center_box, policy_view, render_view

__all__ = ["CachedTeacherBatch", "StreamConfig", "StreamStats", "StudentBatch", "StudentInput", "StudentStream"]

SizeKey = tuple[int, int, str]  # (height, width, interpolation)
EVAL_VIEW = -1  # the view id of the evaluation centre crop


# ---------------------------------------------------------------------------- configuration


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
    prefetch_shards: int = 2  # shards in flight per loader process
    num_classes: int | None = None  # label range; None = the dataset's class names, if any
    teacher_ids: tuple[str, ...] = ()  # cached teachers to join (empty = labels only)
    features: bool = True  # also join cached features where the teacher has them
    extra_sizes: tuple[SizeKey, ...] = ()  # each view also rendered at these (height, width, interpolation)
    view_policy: ViewPolicy | None = None  # views without a store; default RandomResizedCrop, seeded by seed

    def __post_init__(self) -> None:
        for name in ("batch_size", "crops_per_image", "prefetch_shards"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.loader_workers < 0:
            raise ValueError(f"loader_workers must be >= 0, got {self.loader_workers}")
        if self.num_classes is not None and self.num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {self.num_classes}")
        object.__setattr__(self, "teacher_ids", tuple(self.teacher_ids))
        object.__setattr__(self, "extra_sizes", tuple((int(h), int(w), str(i)) for h, w, i in self.extra_sizes))


# ---------------------------------------------------------------------------- batches


def _narrow(value, start: int, stop: int):
    return None if value is None else value[start:stop]


def _cat(values: list):
    return None if values[0] is None else torch.cat(values)


@dataclass
class CachedTeacherBatch:
    """One teacher's cached targets for a batch's (row, view) pairs."""

    topk_logprob: torch.Tensor  # [B, k] float32, log-probabilities at T = 1
    topk_index: torch.Tensor  # [B, k] int64
    log_leftover: torch.Tensor  # [B, T] float32, one column per store temperature
    features: torch.Tensor | None = None  # [B, D] float32, zeros where feature_mask is False
    feature_mask: torch.Tensor | None = None  # [B] bool: the view has cached features (view < V_f)

    def narrow(self, start: int, stop: int) -> CachedTeacherBatch:
        return CachedTeacherBatch(**{f.name: _narrow(getattr(self, f.name), start, stop) for f in fields(self)})

    @classmethod
    def cat(cls, parts: Sequence[CachedTeacherBatch]) -> CachedTeacherBatch:
        return cls(**{f.name: _cat([getattr(p, f.name) for p in parts]) for f in fields(cls)})


@dataclass
class StudentBatch:
    """Rendered uint8 images (normalised on the training device) with their labels and targets."""

    images: torch.Tensor  # [B, 3, H, W] uint8
    labels: torch.Tensor  # [B] int64
    rows: torch.Tensor  # [B] int64, store rows (shard * C + position)
    views: torch.Tensor  # [B] int64: cached view; policy view id without a store; -1 for the eval crop
    teachers: dict[str, CachedTeacherBatch] = field(default_factory=dict)
    extra_images: dict[SizeKey, torch.Tensor] = field(default_factory=dict)  # keyed like extra_sizes

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def narrow(self, start: int, stop: int) -> StudentBatch:
        """Examples ``start:stop``, as views of this batch's tensors."""
        return StudentBatch(images=self.images[start:stop], labels=self.labels[start:stop],
                            rows=self.rows[start:stop], views=self.views[start:stop],
                            teachers={t: b.narrow(start, stop) for t, b in self.teachers.items()},
                            extra_images={k: v[start:stop] for k, v in self.extra_images.items()})

    @classmethod
    def cat(cls, parts: Sequence[StudentBatch]) -> StudentBatch:
        if len(parts) == 1:
            return parts[0]
        first = parts[0]
        return cls(images=torch.cat([p.images for p in parts]), labels=torch.cat([p.labels for p in parts]),
                   rows=torch.cat([p.rows for p in parts]), views=torch.cat([p.views for p in parts]),
                   teachers={t: CachedTeacherBatch.cat([p.teachers[t] for p in parts]) for t in first.teachers},
                   extra_images={k: torch.cat([p.extra_images[k] for p in parts]) for k in first.extra_images})


@dataclass
class StreamStats:
    """Counts over the stream's life (every shard read adds its skipped samples again)."""

    shards_read: int = 0  # shard tasks run: rendered, or counted to resume
    examples: int = 0  # examples yielded in batches
    skipped_invalid: int = 0  # samples the store marks invalid
    undecodable: int = 0  # images that failed to decode (streams without a store)
    wraps: int = 0  # times a rank's stream wrapped around to its epoch start
    undecodable_samples: list[str] = field(default_factory=list)  # "key: reason", the first few


@dataclass
class ShardExamples:
    """What a shard task returns: the shard's examples for one epoch (None for a count task)."""

    shard: int
    images_used: int  # samples that gave examples
    skipped_invalid: int = 0
    undecodable: list[str] = field(default_factory=list)
    examples: StudentBatch | None = None


# ---------------------------------------------------------------------------- randomness and boxes


def _rng(*parts: object) -> np.random.Generator:
    """A Philox generator keyed by ``parts``: the same draws in any process, in any order."""
    digest = hashlib.sha256("\x00".join(str(p) for p in parts).encode()).digest()
    return np.random.Generator(np.random.Philox(key=int.from_bytes(digest[:16], "little")))


def _decode(raw: RawSample) -> torch.Tensor:
    if raw.image_bytes is None:
        raise ImageDecodeError("no image member (jpg/jpeg/png/webp)")
    return torch.from_numpy(np.ascontiguousarray(decode_image(raw.image_bytes).transpose(2, 0, 1)))


# ---------------------------------------------------------------------------- one shard (loader side)


@dataclass
class _Tally:
    skipped_invalid: int = 0
    undecodable: list[str] = field(default_factory=list)


class ShardRenderer(Dataset):
    """Runs shard tasks ``(kind, epoch, shard)``; built in the main process, run in loader processes.

    ``"render"`` returns the shard's examples for the epoch, ``"count"`` only how many images
    give examples. The store is opened on first use in each process.
    """

    def __init__(self, dataset: DatasetIndex, store_path: str | None, student: StudentInput,
                 config: StreamConfig, num_views: int, num_classes: int | None, eval_mode: bool):
        self.dataset = dataset
        self.store_path = store_path
        self.student = student
        self.config = config
        self.num_views = num_views
        self.num_classes = num_classes
        self.eval_mode = eval_mode
        self.crops = 1 if eval_mode else config.crops_per_image
        self.policy = config.view_policy or ViewPolicy(num_views=1, seed=config.seed)
        # The student's size first; a size asked twice is rendered once.
        self.sizes: list[SizeKey] = list(dict.fromkeys([(*student.size, student.interpolation),
                                                        *config.extra_sizes]))
        self._store: CacheStore | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_store": None}  # each process opens its own

    @property
    def store(self) -> CacheStore | None:
        if self._store is None and self.store_path is not None:
            self._store = CacheStore.open(self.store_path)
        return self._store

    def __getitem__(self, task: tuple[str, int, int]) -> ShardExamples:
        kind, epoch, shard = task
        return self.render(epoch, shard) if kind == "render" else self.count(shard)

    def count(self, shard: int) -> ShardExamples:
        samples = self.store.read_samples(shard) if self.store is not None else None
        tally = _Tally()
        used = sum(1 for _ in self._usable_samples(shard, samples, tally))
        return ShardExamples(shard, used, tally.skipped_invalid, tally.undecodable)

    def render(self, epoch: int, shard: int) -> ShardExamples:
        store = self.store
        samples = store.read_samples(shard) if store is not None else None
        targets = {tid: _read_teacher(store, tid, shard, self.config.features) for tid in self.config.teacher_ids}
        crops: dict[SizeKey, list[torch.Tensor]] = {size: [] for size in self.sizes}
        labels, positions, views = [], [], []
        tally, used = _Tally(), 0
        for position, key, label, image in self._usable_samples(shard, samples, tally):
            used += 1
            for view, box, flip in self._views(epoch, key, image, samples, position):
                for size in self.sizes:
                    crops[size].append(render_view(image, box, flip, size[:2], size[2]))
                labels.append(label)
                positions.append(position)
                views.append(view)
        order = np.arange(len(labels)) if self.eval_mode else \
            _rng("order", self.config.seed, epoch, shard).permutation(len(labels))
        positions_, views_ = np.asarray(positions, np.int64)[order], np.asarray(views, np.int64)[order]
        images = {size: _stack(crops.pop(size), order, size) for size in self.sizes}
        examples = StudentBatch(
            images=images[self.sizes[0]],
            labels=torch.from_numpy(np.asarray(labels, np.int64)[order]),
            rows=torch.from_numpy(shard * self.dataset.rows_per_shard + positions_),
            views=torch.from_numpy(views_),
            teachers={tid: _teacher_targets(out, positions_, views_) for tid, out in targets.items()},
            extra_images={size: images[size] for size in self.config.extra_sizes})
        return ShardExamples(shard, used, tally.skipped_invalid, tally.undecodable, examples)

    def _usable_samples(self, shard: int, samples: ShardSamples | None,
                        tally: _Tally) -> Iterator[tuple[int, str, int, torch.Tensor]]:
        """(position, key, label, image) of each sample that gives examples, in tar order."""
        info = self.dataset.shards[shard]
        keys = []
        for position, raw in enumerate(iter_shard(info.url)):
            keys.append(raw.key)
            if position >= info.num_samples:
                break
            if samples is not None and samples.keys[position] != raw.key:
                raise DatasetError(f"shard {info.name}, position {position}: the tar has sample {raw.key!r}, "
                                   f"the store has {str(samples.keys[position])!r}; the shards changed "
                                   "since the store was built")
            if samples is not None and not samples.valid[position]:
                tally.skipped_invalid += 1
                continue
            label = self._checked_label(info.name, raw)
            try:
                image = _decode(raw)
            except ImageDecodeError as e:
                if samples is not None:
                    raise DatasetError(f"shard {info.name}: sample {raw.key!r} is valid in the store but "
                                       f"cannot be decoded now ({e})") from e
                tally.undecodable.append(f"{raw.key}: {e}")
                continue
            yield position, raw.key, label, image
        if len(keys) != info.num_samples or hash_keys(keys) != info.keys_sha256:
            read = f"{len(keys)}{'+' if len(keys) > info.num_samples else ''}"
            raise DatasetError(f"shard {info.name} changed since it was indexed: {read} samples read, "
                               f"{info.num_samples} indexed, or other keys")

    def _checked_label(self, shard_name: str, raw: RawSample) -> int:
        if raw.label is None or (self.num_classes is not None and raw.label >= self.num_classes):
            found = "no class label" if raw.label is None else f"label {raw.label}"
            limit = f"[0, {self.num_classes})" if self.num_classes is not None else "a class index"
            raise DatasetError(f"shard {shard_name}: sample {raw.key!r} has {found}, expected {limit}")
        return raw.label

    def _views(self, epoch: int, key: str, image: torch.Tensor, samples: ShardSamples | None,
               position: int) -> list[tuple[int, np.ndarray, bool]]:
        """(view id, box, flip) of each crop of one image in this epoch."""
        height, width = image.shape[-2:]
        if self.eval_mode:
            return [(EVAL_VIEW, center_box(width, height, self.student.size, self.student.crop_pct), False)]
        ids = [epoch * self.crops + j for j in range(self.crops)]
        if samples is None:  # fresh policy views every epoch
            return [(i, *policy_view(self.policy, key, i, width, height)) for i in ids]
        # Cached views: a per-sample permutation, walked across epochs, covers all V before repeating.
        perm = _rng("views", self.config.seed, key).permutation(self.num_views)
        chosen = [int(perm[i % self.num_views]) for i in ids]
        return [(v, samples.boxes[position, v], bool(samples.flips[position, v])) for v in chosen]


def _stack(crops: list[torch.Tensor], order: np.ndarray, size: SizeKey) -> torch.Tensor:
    if not crops:
        return torch.empty((0, 3, size[0], size[1]), dtype=torch.uint8)
    return torch.stack([crops[i] for i in order])


def _read_teacher(store: CacheStore, teacher_id: str, shard: int, features: bool) -> TeacherOutputs:
    return store.read_teacher(teacher_id, shard, features)


def _teacher_targets(outputs: TeacherOutputs, positions: np.ndarray, views: np.ndarray) -> CachedTeacherBatch:
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


class _TaskList(Sampler):
    """The tasks of the current pass; set before each iteration (the sampler lives in the main process)."""

    def __init__(self) -> None:
        self.tasks: list[tuple[str, int, int]] = []

    def __iter__(self) -> Iterator[tuple[str, int, int]]:
        return iter(list(self.tasks))

    def __len__(self) -> int:
        return len(self.tasks)


def _identity(item: ShardExamples) -> ShardExamples:
    return item


class _TaskRunner:
    """Runs shard tasks and returns their results in task order, whatever the number of processes.

    A DataLoader over shard tasks: each result is one shard, so ``prefetch_shards`` bounds the
    shards in flight per process. Workers persist across epochs and passes.
    """

    def __init__(self, renderer: ShardRenderer, workers: int, prefetch: int):
        self._tasks = _TaskList()
        # A private generator: each new pass draws a base seed from it, which would otherwise come from
        # the global torch RNG and shift the trainer's dropout draws whenever a pass starts (e.g. on resume).
        self._loader = DataLoader(renderer, batch_size=None, sampler=self._tasks, num_workers=workers,
                                  collate_fn=_identity, multiprocessing_context="spawn" if workers else None,
                                  persistent_workers=workers > 0, prefetch_factor=prefetch if workers else None,
                                  generator=torch.Generator())

    def run(self, tasks: list[tuple[str, int, int]]) -> Iterator[ShardExamples]:
        self._tasks.tasks = list(tasks)
        return iter(self._loader)  # a persistent loader drops what an abandoned pass left in flight

    def close(self) -> None:
        iterator = getattr(self._loader, "_iterator", None)
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()
        self._loader._iterator = None


# ---------------------------------------------------------------------------- store checks (main process)


# ---------------------------------------------------------------------------- the stream


class StudentStream:
    """Batches for one rank: shuffled shards, replayed cached views, joined teacher targets.

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
        planned = np.array([s.num_samples for s in dataset.shards], np.int64)
        if store_path is not None:
            num_views, planned = self._read_store(store_path)
        num_classes = config.num_classes or (len(dataset.class_names) if dataset.class_names else None)
        # Images per shard that give examples: exact with a store, an upper bound without.
        self._planned = planned
        self._known: dict[int, int] = {s: int(n) for s, n in enumerate(planned)} if store_path else {}
        self._shards = [s for s, n in enumerate(planned) if n > 0]
        if len(self._shards) < world_size and not eval_mode:  # an eval rank may have nothing to do
            raise ValueError(f"{len(self._shards)} shard(s) with samples cannot feed {world_size} ranks")
        self._renderer = ShardRenderer(dataset, store_path, student, config, num_views, num_classes, eval_mode)
        self._runner: _TaskRunner | None = None
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
        return num_views, valid.sum(axis=1).astype(np.int64)

    # ----- what the trainer asks -------------------------------------------------

    def teacher_info(self) -> dict[str, dict]:
        """Per joined teacher: num_classes, feature_dim (None without joined features), feature_views, topk."""
        return {tid: dict(info) for tid, info in self._teacher_info.items()}

    def epoch_shards(self, epoch: int) -> list[int]:
        """This rank's shards for ``epoch``, in the order they are streamed."""
        order = self._shards
        if not self.eval_mode:
            order = [order[i] for i in _rng("shards", self.config.seed, epoch).permutation(len(order))]
        return order[self.rank::self.world_size]

    def steps_per_epoch(self) -> int:
        """Train mode: the same on every rank and epoch. Eval mode: this rank's batches (an upper bound
        without a store when images fail to decode)."""
        return self._steps

    def _count_steps(self) -> int:
        batch = self.config.batch_size
        if self.eval_mode:
            return math.ceil(sum(int(self._planned[s]) for s in self.epoch_shards(0)) / batch)
        per_rank = len(self._shards) // self.world_size
        fewest = sum(sorted(int(self._planned[s]) * self.crops for s in self._shards)[:per_rank])
        if fewest < batch:
            raise ValueError(f"batch_size {batch} exceeds the {fewest} examples a rank is sure to get per epoch")
        return fewest // batch

    # ----- batches ---------------------------------------------------------------

    def iter_epoch(self, epoch: int, start_step: int = 0) -> Iterator[StudentBatch]:
        """Batches ``start_step, start_step + 1, ...`` of ``epoch``, exactly as an uninterrupted epoch gives them."""
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        batch = self.config.batch_size
        total = None if self.eval_mode else (self._steps - start_step) * batch
        if total is not None and total <= 0:
            return
        pieces = self._pieces(epoch, self.epoch_shards(epoch), start_step * batch)
        try:
            for out in _cut(pieces, batch, total):
                self.stats.examples += len(out)
                yield out
        finally:
            pieces.close()

    def _pieces(self, epoch: int, shards: list[int], skip: int) -> Iterator[StudentBatch]:
        """The rank's examples from example ``skip`` on, shard by shard, wrapping around in train mode."""
        start, offset = 0, 0
        if skip:
            self._learn_counts([s for s in shards if s not in self._known])
            per_pass = sum(self._known[s] * self.crops for s in shards)
            if self.eval_mode and skip >= per_pass:
                return
            skip = skip % per_pass if per_pass else 0  # every pass of an epoch is the same
            while skip >= self._known[shards[start]] * self.crops:
                skip -= self._known[shards[start]] * self.crops
                start += 1
            offset = skip
        while True:
            produced = 0
            for result in self._run([("render", epoch, s) for s in shards[start:]]):
                examples = result.examples
                produced += len(examples)
                if offset:
                    examples, offset = examples.narrow(offset, len(examples)), 0
                if len(examples):
                    yield examples
            if self.eval_mode:
                return
            if start == 0 and produced == 0:
                raise DatasetError(f"rank {self.rank}: no sample of its shards gives an example "
                                   f"({listed([self.dataset.shards[s].name for s in shards])})")
            start = 0
            self.stats.wraps += 1

    def _learn_counts(self, shards: list[int]) -> None:
        for _ in self._run([("count", 0, s) for s in shards]):
            pass

    def _run(self, tasks: list[tuple[str, int, int]]) -> Iterator[ShardExamples]:
        if self._runner is None:
            self._runner = _TaskRunner(self._renderer, self.config.loader_workers, self.config.prefetch_shards)
        for result in self._runner.run(tasks):
            self._record(result)
            yield result

    def _record(self, result: ShardExamples) -> None:
        self._known[result.shard] = result.images_used
        stats = self.stats
        stats.shards_read += 1
        stats.skipped_invalid += result.skipped_invalid
        stats.undecodable += len(result.undecodable)
        stats.undecodable_samples.extend(result.undecodable[:max(0, MAX_LISTED - len(stats.undecodable_samples))])

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


def _cut(pieces: Iterator[StudentBatch], batch_size: int, total: int | None) -> Iterator[StudentBatch]:
    """Batches of ``batch_size`` across piece boundaries; ``total`` examples at most (None: all, last one short)."""
    parts: list[StudentBatch] = []
    have = emitted = 0
    for piece in pieces:
        pos = 0
        while pos < len(piece):
            take = min(batch_size - have, len(piece) - pos)
            if total is not None:
                take = min(take, total - emitted - have)
            parts.append(piece.narrow(pos, pos + take))
            pos, have = pos + take, have + take
            if have == batch_size or (total is not None and emitted + have == total):
                yield StudentBatch.cat(parts)
                emitted, parts, have = emitted + have, [], 0
                if total is not None and emitted >= total:
                    return
    if parts:
        yield StudentBatch.cat(parts)
