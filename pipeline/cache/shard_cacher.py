"""Caching one shard: decode each image once, render its views, run every teacher, write the rows.

``ShardCacher`` is the unit of work of the cache job (jobs/cache_teachers.py runs
one per Ray worker). It holds the loaded teachers and writes only the rows (whole
chunks) of the shard it processes, so any number of cachers can run at once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.cache.shard_io import ShardSamples, TeacherOutputs
from pipeline.cache.store import CacheConfig, CacheStore, index_dtype
from pipeline.cache.topk import encode_topk
from pipeline.data.shards import DatasetError, ImageDecodeError, RawSample, decode_image, hash_keys, iter_shard
from pipeline.data.views import normalize, render_view, sample_views
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
    """Collects one teacher's views of a shard into batches and keeps its outputs per row and view."""

    def __init__(self, teacher: Teacher, config: CacheConfig, rows: int):
        self.teacher = teacher
        self.config = config
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

    def add(self, row: int, view: int, crop: torch.Tensor) -> None:
        self._crops.append(crop)
        self._slots.append((row, view))
        if len(self._crops) >= self.teacher.spec.batch_size:
            self.flush()

    def flush(self) -> None:
        if not self._crops:
            return
        pre = self.teacher.preprocessing
        batch = normalize(torch.stack(self._crops), pre.mean, pre.std)
        logits, features = self.teacher(batch)
        encoded = encode_topk(logits, self.config.topk, self.config.temperatures)  # on the teacher's device
        features = features.float().cpu()
        rows = np.array([r for r, _ in self._slots])
        views = np.array([v for _, v in self._slots])
        out = self.outputs
        out.topk_logprob[rows, views] = encoded.logprob.cpu().numpy()
        out.topk_index[rows, views] = encoded.index.cpu().numpy().astype(out.topk_index.dtype)
        out.log_leftover[rows, views] = encoded.log_leftover.cpu().numpy()
        if out.features is not None:
            keep = views < self.feature_views
            out.features[rows[keep], views[keep]] = features.numpy()[keep].astype(np.float16)
        self._crops.clear()
        self._slots.clear()


def decode_to_tensor(raw: RawSample, device: torch.device) -> torch.Tensor:
    """uint8 [3, H, W] on ``device``; JPEGs decode on the GPU itself when the device is CUDA."""
    if raw.image_bytes is None:
        raise ImageDecodeError("no image member (jpg/jpeg/png/webp)")
    if device.type == "cuda" and raw.image_ext in ("jpg", "jpeg"):
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            data = torch.frombuffer(bytearray(raw.image_bytes), dtype=torch.uint8)
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:
            pass  # CMYK and some progressive JPEGs: the CPU decoder handles them
    array = decode_image(raw.image_bytes)
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1))).to(device)


def _empty_samples(rows: int, views: int) -> ShardSamples:
    return ShardSamples(keys=np.full(rows, "", dtype=object), labels=np.full(rows, -1, np.int32),
                        valid=np.zeros(rows, bool), boxes=np.zeros((rows, views, 4), np.float32),
                        flips=np.zeros((rows, views), bool))


class ShardCacher:
    """Runs a set of loaded teachers over whole shards and writes their rows to a store."""

    def __init__(self, store: CacheStore, teachers: dict[str, Teacher], device: torch.device | str = "cpu"):
        self.store = store
        self.teachers = teachers
        self.device = torch.device(device)
        self.config = store.config

    def process(self, shard: int, url: str, teacher_ids: list[str], keys_sha256: str | None = None
                ) -> ShardResult:
        """Cache ``teacher_ids`` on one shard; ``keys_sha256`` (from the dataset index) is checked."""
        start = time.perf_counter()
        rows, views = self.store.rows_per_shard, self.config.views.num_views
        expected = self.store.shard_num_samples(shard)
        have_samples = bool(self.store.group["samples/done"][shard])
        samples = self.store.read_samples(shard) if have_samples else _empty_samples(rows, views)
        batchers = {tid: TeacherBatcher(self.teachers[tid], self.config, rows) for tid in teacher_ids}
        # Teachers with the same input size and interpolation share each rendered crop.
        render_groups: dict[tuple, list[TeacherBatcher]] = {}
        for batcher in batchers.values():
            pre = batcher.teacher.preprocessing
            render_groups.setdefault((tuple(pre.input_size), pre.interpolation), []).append(batcher)

        reasons: list[str] = []
        position = -1
        for position, raw in enumerate(iter_shard(url)):
            if position >= expected or (have_samples and samples.keys[position] != raw.key):
                raise DatasetError(f"shard {url} changed since the store was built: sample {position} "
                                   f"is '{raw.key}', the store expects a different sample")
            image, reason = self._decode(raw)
            if reason is None and raw.label is None:
                reason = "no cls member"  # a sample without a class cannot be trained on
            if not have_samples:
                self._fill_sample(samples, position, raw, image if reason is None else None)
            if not samples.valid[position]:
                reasons.append(f"{raw.key}: {reason or 'recorded as invalid in the store'}")
                continue
            if image is None:
                raise DatasetError(f"shard {url}: sample '{raw.key}' is valid in the store but cannot be "
                                   f"decoded now ({reason})")
            for (size, interpolation), group in render_groups.items():
                for view in range(views):
                    crop = render_view(image, samples.boxes[position, view], bool(samples.flips[position, view]),
                                       size, interpolation)
                    for batcher in group:
                        batcher.add(position, view, crop)
        if position + 1 != expected:
            raise DatasetError(f"shard {url} has {position + 1} samples, the store expects {expected}; "
                               "the shard changed since the store was built")
        if keys_sha256 is not None and hash_keys(list(samples.keys[:expected])) != keys_sha256:
            raise DatasetError(f"the keys in shard {url} differ from its manifest/index (keys_sha256); "
                               "the shard changed since it was indexed")
        for batcher in batchers.values():
            batcher.flush()

        if not have_samples:
            self.store.write_samples(shard, samples)
        for tid, batcher in batchers.items():
            self.store.write_teacher(tid, shard, batcher.outputs)
        return ShardResult(shard=shard, num_samples=expected, invalid=len(reasons), teachers=list(teacher_ids),
                           seconds=time.perf_counter() - start, invalid_reasons=reasons[:5])

    def _decode(self, raw: RawSample) -> tuple[torch.Tensor | None, str | None]:
        try:
            return decode_to_tensor(raw, self.device), None
        except ImageDecodeError as e:
            return None, str(e)

    def _fill_sample(self, samples: ShardSamples, position: int, raw: RawSample,
                     image: torch.Tensor | None) -> None:
        """Record a sample's key and label, and its views when it is usable (``image`` given)."""
        samples.keys[position] = raw.key
        samples.labels[position] = -1 if raw.label is None else raw.label
        if image is None:
            return
        height, width = image.shape[-2:]
        samples.boxes[position], samples.flips[position] = sample_views(self.config.views, raw.key, width, height)
        samples.valid[position] = True
