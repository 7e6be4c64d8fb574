"""The cost of a cache job before running it: store size and worker-hours, writing nothing.

Reads the shard index (a manifest, or the tars' member headers), loads each teacher on this
machine's device and times one batch of its views, then projects: bytes = samples x views x
the bytes each teacher stores per view; hours = views / measured rate, per teacher, summed.
The forward alone is timed: decoding and rendering (about 600 images/s per core for
ImageNet-shaped JPEGs, docs/benchmarks.md) run beside it on the worker's other threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from jobs.cache_teachers import CacheJob
from pipeline.cache.compat import StoreError
from pipeline.cache.store import CacheStore, index_dtype
from pipeline.data.shards import DatasetIndex, index_dataset
from teachers import Teacher, TeacherSpec, TeacherSpecError, load_teacher

# Raw bytes per sample of the sample and view arrays (key strings aside): label int32, valid bool,
# and per view a float32 box of 4 and a bool flip.
SAMPLE_BYTES, VIEW_BYTES = 4 + 1, 4 * 4 + 1


@dataclass
class TeacherEstimate:
    teacher_id: str
    num_classes: int
    feature_dim: int
    topk_bytes_per_view: int  # top-k log-probabilities + indices + leftovers, raw
    feature_bytes_per_view: int  # 0 without features
    views: int  # views this job would forward for this teacher
    feature_views: int  # views whose features it would store
    views_per_second: float  # measured on one batch
    device: str
    batch: int

    @property
    def bytes(self) -> int:
        return self.views * self.topk_bytes_per_view + self.feature_views * self.feature_bytes_per_view

    @property
    def hours(self) -> float:
        return self.views / self.views_per_second / 3600


@dataclass
class CacheEstimate:
    store: str
    store_exists: bool
    images: int  # samples in the shards this job would process
    shards: int
    views_per_sample: int
    sample_bytes: int
    teachers: list[TeacherEstimate]
    workers: int

    @property
    def total_bytes(self) -> int:
        return self.sample_bytes + sum(t.bytes for t in self.teachers)

    @property
    def hours(self) -> float:
        return sum(t.hours for t in self.teachers)

    def lines(self) -> list[str]:
        out = [f"dry run: nothing written; store {self.store} ({'exists' if self.store_exists else 'new'})",
               f"images: {self.images} in {self.shards} shard(s) to cache, views per sample: {self.views_per_sample}"]
        for t in self.teachers:
            features = (f" + {t.feature_bytes_per_view} B/view features on {t.feature_views} views"
                        if t.feature_views else "")
            out.append(f"  {t.teacher_id}: {t.num_classes} classes; {t.topk_bytes_per_view} B/view top-k + leftover"
                       f"{features}; {t.bytes:,} bytes; {t.views_per_second:.1f} views/s measured on {t.device} "
                       f"(batch {t.batch}): {t.hours:.4f} h for {t.views} views")
        out.append(f"store size: {self.total_bytes:,} bytes uncompressed ({self.sample_bytes:,} samples and views); "
                   "compressed top-k arrays took 0.5-0.75 of their raw size and features about 1.0 "
                   "(docs/benchmarks.md)")
        out.append(f"projected: {self.hours:.4f} hours of teacher forward on one worker like this machine; "
                   f"{self.hours / self.workers:.4f} hours per worker with {self.workers} worker(s)")
        return out


def _device(requested: str) -> str:
    import torch

    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise TeacherSpecError("--dry-run with --device cuda times the teachers on this machine, which has no GPU; "
                                   "use --device cpu or run it on a GPU node")
        return "cuda"
    return "cpu"


def time_one_batch(teacher: Teacher, device: str, batch: int) -> float:
    """Views per second of ``teacher``'s forward on one batch (after one warm-up batch)."""
    import torch

    height, width = teacher.preprocessing.input_size
    x = torch.randn(batch, 3, height, width, device=device)
    teacher(x)  # warm-up: lazy initialisation, kernel selection
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    teacher(x)
    if device == "cuda":
        torch.cuda.synchronize()
    return batch / max(time.perf_counter() - start, 1e-9)


def _work(job: CacheJob, dataset: DatasetIndex) -> tuple[bool, dict[str, list[int]]]:
    """Whether the store exists, and per teacher the shards still to cache."""
    every = list(range(len(dataset.shards)))
    try:
        store = CacheStore.open(job.store)
    except StoreError:
        return False, {spec.teacher_id: every for spec in job.teachers}
    store.check_compatible(dataset, job.config)
    known = set(store.teacher_ids)
    shards = {}
    for spec in job.teachers:
        done = store.teacher_done(spec.teacher_id) if spec.teacher_id in known else np.zeros(len(every), bool)
        shards[spec.teacher_id] = [s for s in every if not done[s]]
    return True, shards


def estimate_cache_job(job: CacheJob) -> CacheEstimate:
    """Size and hours of ``job`` on this machine's device; reads the index and the store (if any) only."""
    if not job.teachers:
        raise TeacherSpecError("no teacher given: pass --teacher SPEC (one or more) or --teachers-file")
    dataset = index_dataset(job.shards)
    exists, shards_of = _work(job, dataset)
    device = _device(job.device)
    config = job.config
    views = config.views.num_views
    counts = [info.num_samples for info in dataset.shards]
    all_shards = sorted({s for shards in shards_of.values() for s in shards})
    teachers = []
    for spec in job.teachers:
        images = sum(counts[s] for s in shards_of.get(spec.teacher_id, []))
        teachers.append(_teacher_estimate(spec, job, device, images * views,
                                          images * config.num_feature_views if spec.features else 0))
    sample_bytes = 0 if exists else dataset.num_samples * (SAMPLE_BYTES + views * VIEW_BYTES)
    return CacheEstimate(store=job.store, store_exists=exists, images=sum(counts[s] for s in all_shards),
                         shards=len(all_shards), views_per_sample=views, sample_bytes=sample_bytes,
                         teachers=teachers, workers=job.num_workers or 1)


def _teacher_estimate(spec: TeacherSpec, job: CacheJob, device: str, views: int, feature_views: int
                      ) -> TeacherEstimate:
    config = job.config
    teacher = load_teacher(spec, device, random_init=job.random_init, seed=config.views.seed)
    k, temps = config.topk, len(config.temperatures)
    topk_bytes = k * 2 + k * index_dtype(teacher.num_classes).itemsize + temps * np.dtype(np.float32).itemsize
    batch = min(spec.batch_size, 32)
    rate = time_one_batch(teacher, device, batch)
    return TeacherEstimate(teacher_id=spec.teacher_id, num_classes=teacher.num_classes,
                           feature_dim=teacher.feature_dim, topk_bytes_per_view=topk_bytes,
                           feature_bytes_per_view=2 * teacher.feature_dim if spec.features else 0,
                           views=views, feature_views=feature_views if spec.features else 0,
                           views_per_second=rate, device=device, batch=batch)
