"""Caching one shard: decode each image once, render its views, run every teacher, write the rows.

``ShardCacher`` is the unit of work of the cache job (jobs/cache_teachers.py runs
one per Ray worker). It holds the loaded teachers and writes only the rows (whole
chunks) of the shard it processes, so any number of cachers can run at once.
"""

from __future__ import annotations

import collections
import itertools
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.cache.shard_io import ShardSamples, TeacherOutputs
from pipeline.cache.store import CacheConfig, CacheStore, index_dtype
from pipeline.cache.topk import encode_topk
from pipeline.data.images import decode_jpegs_on_device, decode_sample
from pipeline.data.shards import DatasetError, ImageDecodeError, RawSample, hash_keys, iter_shard
from pipeline.data.views import normalize, render_view, sample_views, stack_views
from teachers import Teacher


@dataclass
class ShardResult:
    """What one processed shard reports back to the driver."""

    shard: int
    num_samples: int
    invalid: int
    teachers: list[str]
    seconds: float
    invalid_reasons: list[str] = field(default_factory=list)  # "key: reason", first few only


class TeacherBatcher:
    """Collects one teacher's views of a shard into batches and keeps its outputs per row and view.

    A full batch is stacked and normalised by the calling thread, then forwarded on ``forwards``
    (one thread shared by a shard's teachers), so the next batch is prepared while this one runs.
    """

    def __init__(self, teacher: Teacher, config: CacheConfig, rows: int, forwards: ThreadPoolExecutor):
        self.teacher = teacher
        self.config = config
        self.forwards = forwards
        views, k = config.views.num_views, config.topk
        self.feature_views = config.num_feature_views if teacher.spec.features else 0
        self.outputs = TeacherOutputs(
            topk_logprob=np.zeros((rows, views, k), np.float16),
            topk_index=np.zeros((rows, views, k), index_dtype(teacher.num_classes)),
            log_leftover=np.zeros((rows, views, len(config.temperatures)), np.float32),
            features=(np.zeros((rows, self.feature_views, teacher.feature_dim), np.float16)
                      if self.feature_views else None),
        )
        self._crops: list[torch.Tensor] = []
        self._slots: list[tuple[int, int]] = []
        self._running: Future | None = None

    def add(self, row: int, view: int, crop: torch.Tensor) -> None:
        self._crops.append(crop)
        self._slots.append((row, view))
        if len(self._crops) >= self.teacher.spec.batch_size:
            self.flush()

    def flush(self) -> None:
        """Send the views collected so far to the teacher (after its previous batch is done)."""
        if not self._crops:
            return
        pre = self.teacher.preprocessing
        batch = normalize(stack_views(self._crops), pre.mean, pre.std)
        rows = np.array([r for r, _ in self._slots])
        views = np.array([v for _, v in self._slots])
        self._crops, self._slots = [], []
        self.wait()
        self._running = self.forwards.submit(self._forward, batch, rows, views)

    def wait(self) -> None:
        """Block until the batch in flight is forwarded and stored (re-raising its error)."""
        if self._running is not None:
            running, self._running = self._running, None
            running.result()

    def _forward(self, batch: torch.Tensor, rows: np.ndarray, views: np.ndarray) -> None:
        logits, features = self.teacher(batch)
        encoded = encode_topk(logits, self.config.topk, self.config.temperatures)  # on the teacher's device
        out = self.outputs
        out.topk_logprob[rows, views] = encoded.logprob.cpu().numpy()
        out.topk_index[rows, views] = encoded.index.cpu().numpy().astype(out.topk_index.dtype)
        out.log_leftover[rows, views] = encoded.log_leftover.cpu().numpy()
        if out.features is not None:
            keep = views < self.feature_views
            out.features[rows[keep], views[keep]] = features.float().cpu().numpy()[keep].astype(np.float16)


def _empty_samples(rows: int, views: int) -> ShardSamples:
    return ShardSamples(keys=np.full(rows, "", dtype=object), labels=np.full(rows, -1, np.int32),
                        valid=np.zeros(rows, bool), boxes=np.zeros((rows, views, 4), np.float32),
                        flips=np.zeros((rows, views), bool))


RenderKey = tuple[tuple[int, int], str]  # (input size, interpolation) shared by some teachers


@dataclass
class PreparedSample:
    """One sample, decoded and rendered, ready for the teachers (made in a decode thread)."""

    position: int
    raw: RawSample
    reason: str | None = None  # why the sample is unusable; None when it is usable
    boxes: np.ndarray | None = None  # [V, 4], drawn here for a shard whose views are not stored yet
    flips: np.ndarray | None = None  # [V]
    crops: dict[RenderKey, list[torch.Tensor]] = field(default_factory=dict)  # per render key, one per view


class ShardCacher:
    """Runs a set of loaded teachers over whole shards and writes their rows to a store.

    Decoding and rendering run on ``decode_workers`` threads (torchvision's JPEG decoder and
    uint8 resize release the GIL) while the calling thread runs the teachers, so a worker runs
    at about min(forward rate, decode_workers x decode rate). On CUDA, JPEGs are batch-decoded
    with nvjpeg and rendered on the device instead.
    """

    def __init__(self, store: CacheStore, teachers: dict[str, Teacher], device: torch.device | str = "cpu",
                 decode_workers: int = 1):
        if decode_workers < 1:
            raise ValueError(f"decode_workers must be >= 1, got {decode_workers}")
        self.store = store
        self.teachers = teachers
        self.device = torch.device(device)
        self.config = store.config
        self.decode_workers = decode_workers

    def process(self, shard: int, url: str, teacher_ids: list[str], keys_sha256: str | None = None
                ) -> ShardResult:
        """Cache ``teacher_ids`` on one shard; ``keys_sha256`` (from the dataset index) is checked."""
        start = time.perf_counter()
        rows, views = self.store.rows_per_shard, self.config.views.num_views
        expected = self.store.shard_num_samples(shard)
        have_samples = bool(self.store.group["samples/done"][shard])
        samples = self.store.read_samples(shard) if have_samples else _empty_samples(rows, views)
        reasons: list[str] = []
        count = 0
        stored = samples if have_samples else None
        with ThreadPoolExecutor(self.decode_workers, thread_name_prefix="decode") as pool, \
                ThreadPoolExecutor(1, thread_name_prefix="forward") as forwards:
            batchers = {tid: TeacherBatcher(self.teachers[tid], self.config, rows, forwards) for tid in teacher_ids}
            # Teachers with the same input size and interpolation share each rendered crop.
            render_groups: dict[RenderKey, list[TeacherBatcher]] = {}
            for batcher in batchers.values():
                pre = batcher.teacher.preprocessing
                render_groups.setdefault((tuple(pre.input_size), pre.interpolation), []).append(batcher)
            prepared = self._prepared(pool, self._checked_raws(url, expected, stored), stored, list(render_groups))
            for item in prepared:
                count += 1
                self._take(item, samples, have_samples, render_groups, reasons, url)
            for batcher in batchers.values():
                batcher.flush()
                batcher.wait()
        if count != expected:
            raise DatasetError(f"shard {url} has {count} samples, the store expects {expected}; "
                               "the shard changed since the store was built")
        if keys_sha256 is not None and hash_keys(list(samples.keys[:expected])) != keys_sha256:
            raise DatasetError(f"the keys in shard {url} differ from its manifest/index (keys_sha256); "
                               "the shard changed since it was indexed")

        if not have_samples:
            self.store.write_samples(shard, samples)
        for tid, batcher in batchers.items():
            self.store.write_teacher(tid, shard, batcher.outputs)
        return ShardResult(shard=shard, num_samples=expected, invalid=len(reasons), teachers=list(teacher_ids),
                           seconds=time.perf_counter() - start, invalid_reasons=reasons[:5])

    def _take(self, item: PreparedSample, samples: ShardSamples, have_samples: bool,
              render_groups: dict[RenderKey, list[TeacherBatcher]], reasons: list[str], url: str) -> None:
        """Record one prepared sample and hand its crops to the teachers' batchers."""
        if not have_samples:
            self._fill_sample(samples, item)
        if not samples.valid[item.position]:
            reasons.append(f"{item.raw.key}: {item.reason or 'recorded as invalid in the store'}")
            return
        if item.reason is not None:
            raise DatasetError(f"shard {url}: sample '{item.raw.key}' is valid in the store but cannot be "
                               f"decoded now ({item.reason})")
        for render_key, group in render_groups.items():
            for view, crop in enumerate(item.crops[render_key]):
                for batcher in group:
                    batcher.add(item.position, view, crop)

    # ----- reading and preparing samples -------------------------------------------

    @staticmethod
    def _checked_raws(url: str, expected: int, stored: ShardSamples | None) -> Iterator[tuple[int, RawSample]]:
        """(position, raw sample) in tar order, refusing a shard that no longer matches the store."""
        for position, raw in enumerate(iter_shard(url)):
            if position >= expected or (stored is not None and stored.keys[position] != raw.key):
                raise DatasetError(f"shard {url} changed since the store was built: sample {position} "
                                   f"is '{raw.key}', the store expects a different sample")
            yield position, raw

    def _prepared(self, pool: ThreadPoolExecutor, raws: Iterator[tuple[int, RawSample]],
                  stored: ShardSamples | None, render_keys: list[RenderKey]) -> Iterator[PreparedSample]:
        """Prepared samples in tar order, decoded ahead on the pool (a bounded number in flight)."""
        if self.device.type == "cuda":
            yield from self._prepared_on_device(raws, stored, render_keys)
            return
        in_flight: collections.deque[Future] = collections.deque()
        limit = 4 * self.decode_workers
        for position, raw in raws:
            in_flight.append(pool.submit(self._prepare, position, raw, stored, render_keys))
            if len(in_flight) >= limit:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()

    def _prepare(self, position: int, raw: RawSample, stored: ShardSamples | None, render_keys: list[RenderKey],
                 image: torch.Tensor | None = None) -> PreparedSample:
        """Decode (unless ``image`` is given), draw or read the views, render every crop."""
        item = PreparedSample(position, raw)
        if stored is not None and not stored.valid[position]:
            return item  # recorded as invalid: nothing to decode
        if raw.label is None and stored is None:
            item.reason = "no cls member"  # a sample without a class cannot be trained on
        try:
            image = decode_sample(raw).to(self.device) if image is None else image
        except ImageDecodeError as e:
            item.reason = str(e)
        if item.reason is not None:
            return item
        if stored is None:
            height, width = image.shape[-2:]
            item.boxes, item.flips = sample_views(self.config.views, raw.key, width, height)
            boxes, flips = item.boxes, item.flips
        else:
            boxes, flips = stored.boxes[position], stored.flips[position]
        for size, interpolation in render_keys:
            item.crops[(size, interpolation)] = [render_view(image, boxes[v], bool(flips[v]), size, interpolation)
                                                 for v in range(len(boxes))]
        return item

    def _prepared_on_device(self, raws: Iterator[tuple[int, RawSample]], stored: ShardSamples | None,
                            render_keys: list[RenderKey], group_size: int = 64) -> Iterator[PreparedSample]:
        """CUDA: nvjpeg batch decode of ``group_size`` samples at a time, rendering on the device.

        Written for GPU workers; not run in this project's CPU-only tests.
        """
        while group := list(itertools.islice(raws, group_size)):
            datas = [raw.image_bytes or b"" for _, raw in group]
            images = decode_jpegs_on_device(datas, self.device)
            for (position, raw), image in zip(group, images):
                yield self._prepare(position, raw, stored, render_keys, image)

    @staticmethod
    def _fill_sample(samples: ShardSamples, item: PreparedSample) -> None:
        """Record a sample's key and label, and its views when it is usable."""
        position, raw = item.position, item.raw
        samples.keys[position] = raw.key
        samples.labels[position] = -1 if raw.label is None else raw.label
        if item.reason is None:
            samples.boxes[position], samples.flips[position] = item.boxes, item.flips
            samples.valid[position] = True
