"""The cache job: run every teacher over every shard once, on Ray, and fill the store.

The driver indexes the shards and starts the ``ShardWorker`` actors, which import
torch and load their teachers while the driver loads each teacher once to validate
it and record its fingerprint and creates (or checks) the store; then it hands out
one shard at a time to the workers. A shard whose task fails is retried a bounded number of
times; a worker that dies is replaced and its shard retried. Completed shards are
skipped on a rerun, so rerunning the same command resumes an interrupted run.
The same code runs on an embedded local Ray and on a cluster (``address``).
"""

from __future__ import annotations

import collections
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.cache.compat import StoreError
from pipeline.cache.report import store_report
from pipeline.cache.shard_cacher import ShardCacher, ShardResult
from pipeline.cache.store import CacheConfig, CacheStore
from pipeline.data.shards import DatasetIndex, index_dataset
from teachers import Teacher, TeacherSpec, TeacherSpecError, load_teacher


@dataclass
class CacheJob:
    """Everything ``pipeline cache-teachers`` asks for."""

    shards: str | list[str]
    store: str
    teachers: list[TeacherSpec]
    config: CacheConfig
    random_init: bool = False
    num_workers: int | None = None  # default: one per GPU, else one CPU worker per 8 CPUs (at least one)
    address: str | None = None
    max_retries: int = 2
    device: str = "auto"  # "auto" (GPU when the cluster has one), "cpu" or "cuda"
    decode_workers: int | None = None  # decode threads per worker; default from the CPUs per worker
    # Testing hook: {shard: (kind, attempts)} makes the first `attempts` tries of that shard
    # fail, by raising ("raise") or by killing the worker process ("exit").
    faults: dict[int, tuple[str, int]] = field(default_factory=dict)


@dataclass
class CacheSummary:
    store: str
    num_shards: int
    shards_done: int  # processed in this run
    shards_skipped: int  # already complete before this run
    failed: dict[str, str]  # shard name -> last error
    samples: int
    invalid: int
    views: int
    teachers: list[str]
    bytes_on_disk: int
    bytes_per_view: dict[str, float]  # teacher -> top-k log-probabilities + indices + leftover bytes per view
    feature_bytes_per_view: dict[str, float]
    seconds: float
    images_per_second: float  # end to end, start-up included
    worker_images_per_second: float  # while workers process shards (steady state, summed over workers)

    def lines(self) -> list[str]:
        out = [f"store: {self.store}",
               f"shards: {self.shards_done} cached now, {self.shards_skipped} already complete, "
               f"{len(self.failed)} failed (of {self.num_shards})",
               f"samples: {self.samples} ({self.invalid} invalid, skipped), views per sample: {self.views}",
               f"teachers: {', '.join(self.teachers)}",
               f"bytes on disk: {self.bytes_on_disk:,}"]
        for tid in self.teachers:
            line = f"  {tid}: {self.bytes_per_view[tid]:.1f} B/view (top-k + leftover)"
            if self.feature_bytes_per_view.get(tid):
                line += f", {self.feature_bytes_per_view[tid]:.1f} B/view (features)"
            out.append(line)
        out.append(f"throughput: {self.images_per_second:.1f} images/s over {self.seconds:.1f} s "
                   f"({self.worker_images_per_second:.1f} images/s per worker while caching)")
        out += [f"FAILED {name}: {error}" for name, error in self.failed.items()]
        return out


def teacher_record(teacher: Teacher, random_init: bool) -> dict:
    return {**teacher.record(), "random_init": bool(random_init)}


def prepare_store(job: CacheJob, dataset: DatasetIndex) -> CacheStore:
    """Load each teacher once (to fail early and fingerprint it), then open or create the store."""
    ids = [spec.teacher_id for spec in job.teachers]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise TeacherSpecError(f"teacher id(s) {', '.join(duplicates)} given twice; "
                               "give each teacher its own id with ',id=NAME'")
    records = []
    for spec in job.teachers:
        teacher = load_teacher(spec, "cpu", random_init=job.random_init, seed=job.config.views.seed)
        records.append((spec, teacher_record(teacher, job.random_init), teacher.num_classes, teacher.feature_dim))
        del teacher
    store = CacheStore.open_or_create(job.store, dataset, job.config)
    for spec, record, num_classes, feature_dim in records:
        store.add_teacher(spec.teacher_id, record, num_classes, feature_dim, spec.features)
    return store


class ShardWorker:
    """A Ray actor: loads its teachers as it starts, then caches one shard per call."""

    def __init__(self, store_path: str, specs: list[dict], random_init: bool, seed: int, device: str,
                 threads: int, decode_workers: int, faults: dict[int, tuple[str, int]]):
        import torch

        torch.set_num_threads(threads)
        self.store_path = store_path
        self.device, self.decode_workers, self.faults = device, decode_workers, faults
        self._store: CacheStore | None = None
        # Loaded now, while the driver is still preparing the store. A teacher that fails to load
        # here fails each shard that needs it, with its own error.
        self.teachers: dict[str, Teacher] = {}
        self.load_errors: dict[str, str] = {}
        for spec in map(TeacherSpec.from_dict, specs):
            try:
                self.teachers[spec.teacher_id] = load_teacher(spec, device, random_init=random_init, seed=seed)
            except Exception as e:
                self.load_errors[spec.teacher_id] = f"{type(e).__name__}: {e}"
        self._checked: set[str] = set()

    @property
    def store(self) -> CacheStore:
        if self._store is None:  # opened on first use: the driver creates the store after starting workers
            self._store = CacheStore.open(self.store_path, mode="r+")
        return self._store

    def _teacher(self, teacher_id: str) -> Teacher:
        if teacher_id in self.load_errors:
            raise TeacherSpecError(f"teacher '{teacher_id}' failed to load on this worker: "
                                   f"{self.load_errors[teacher_id]}")
        teacher = self.teachers[teacher_id]
        if teacher_id not in self._checked:
            expected = self.store.teacher_record(teacher_id)["weights_sha256"]
            if teacher.weights_sha256 != expected:
                raise TeacherSpecError(f"teacher '{teacher_id}' loaded on this worker has weights sha256 "
                                       f"{teacher.weights_sha256}, the store recorded {expected}: the weights "
                                       "changed, or this node sees another file")
            self._checked.add(teacher_id)
        return teacher

    def process(self, shard: int, url: str, keys_sha256: str, teacher_ids: list[str], attempt: int) -> ShardResult:
        kind, attempts = self.faults.get(shard, ("", 0))
        if attempt < attempts:
            if kind == "exit":
                os._exit(1)
            raise RuntimeError(f"injected fault on shard {shard}, attempt {attempt}")
        teachers = {tid: self._teacher(tid) for tid in teacher_ids}
        cacher = ShardCacher(self.store, teachers, self.device, self.decode_workers)
        return cacher.process(shard, url, teacher_ids, keys_sha256)


@dataclass
class _WorkerPlan:
    count: int
    device: str
    threads: int  # torch threads for the teachers' forward
    decode_workers: int  # decode threads beside the forward
    num_cpus: float
    num_gpus: float


def _plan_workers(job: CacheJob) -> _WorkerPlan:
    import ray

    gpus = int(ray.cluster_resources().get("GPU", 0))
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = min(int(n["Resources"].get("CPU", 1)) for n in nodes) if nodes else (os.cpu_count() or 1)
    if job.device == "cuda" or (job.device == "auto" and gpus > 0):
        count = job.num_workers or max(gpus, 1)
        cpus = max(1, node_cpus // max(1, gpus))
        # A GPU worker's CPUs decode (nvjpeg does the JPEGs; the rest and fallbacks use the threads).
        return _WorkerPlan(count, "cuda", threads=cpus, decode_workers=job.decode_workers or max(1, cpus - 1),
                           num_cpus=1, num_gpus=1)
    total_cpus = int(ray.cluster_resources().get("CPU", node_cpus))
    count = job.num_workers or max(1, total_cpus // 8)
    per_node = math.ceil(count / max(1, len(nodes)))
    threads = max(1, node_cpus // per_node)
    # A small fixed CPU reservation: workers always get scheduled, even on 2 cores, and the
    # real parallelism is set by the threads each worker uses. On a CPU the forward and the
    # decoding share the cores and a teacher forwards far fewer images than a core decodes:
    # one decode thread per two cores (docs/benchmarks.md, cache throughput).
    return _WorkerPlan(count, "cpu", threads=threads, decode_workers=job.decode_workers or max(1, threads // 2),
                       num_cpus=0.5, num_gpus=0)


def _start_workers(job: CacheJob, specs: list[TeacherSpec], count: int) -> tuple[list, Callable[[], object]]:
    """Start ``count`` worker actors holding ``specs``; their imports and teacher loading overlap
    the driver's store preparation."""
    import ray

    plan = _plan_workers(job)
    remote_worker = ray.remote(ShardWorker).options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                                                    scheduling_strategy="SPREAD", max_restarts=0)
    spec_dicts = [spec.to_dict() for spec in specs]

    def new_worker():
        return remote_worker.remote(job.store, spec_dicts, job.random_init, job.config.views.seed, plan.device,
                                    plan.threads, plan.decode_workers, job.faults)

    return [new_worker() for _ in range(min(plan.count, count))], new_worker


def _run_on_ray(job: CacheJob, dataset: DatasetIndex, work: list[tuple[int, list[str]]], idle: list,
                new_worker: Callable[[], object], progress: bool) -> tuple[list[ShardResult], dict[int, str]]:
    """Hand out shards to the workers until each is done or out of retries."""
    import ray
    from tqdm import tqdm

    queue = collections.deque((shard, tids, 0) for shard, tids in work)
    in_flight: dict = {}
    results: list[ShardResult] = []
    failed: dict[int, str] = {}
    total = sum(dataset.shards[shard].num_samples for shard, _ in work)
    with tqdm(total=total, unit="img", desc="cache-teachers", disable=not progress, dynamic_ncols=True) as bar:
        while queue or in_flight:
            while queue and idle:
                shard, tids, attempt = queue.popleft()
                worker = idle.pop()
                info = dataset.shards[shard]
                ref = worker.process.remote(shard, info.url, info.keys_sha256, tids, attempt)
                in_flight[ref] = (worker, shard, tids, attempt)
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            worker, shard, tids, attempt = in_flight.pop(ref)
            try:
                result = ray.get(ref)
            except ray.exceptions.RayActorError as e:
                idle.append(new_worker())  # the worker died: replace it
                error = f"worker died: {e}"
            except ray.exceptions.RayTaskError as e:
                idle.append(worker)
                error = str(e.cause if e.cause is not None else e).strip().splitlines()[-1]
            else:
                idle.append(worker)
                results.append(result)
                bar.update(result.num_samples)
                continue
            if attempt < job.max_retries:
                queue.append((shard, tids, attempt + 1))
            else:
                failed[shard] = error
                bar.set_postfix(failed=len(failed))
    for worker in idle:
        ray.kill(worker)
    return results, failed


def _summarize(job: CacheJob, store: CacheStore, dataset: DatasetIndex, results: list[ShardResult],
               failed: dict[int, str], skipped: int, seconds: float) -> CacheSummary:
    report = store_report(store.path)
    teachers = [spec.teacher_id for spec in job.teachers]
    images = sum(r.num_samples for r in results)
    worker_seconds = sum(r.seconds for r in results)
    return CacheSummary(
        store=job.store, num_shards=store.num_shards, shards_done=len(results), shards_skipped=skipped,
        failed={dataset.shards[s].name: e for s, e in sorted(failed.items())},
        samples=dataset.num_samples, invalid=report["dataset"]["invalid_samples"],
        views=store.config.views.num_views, teachers=teachers, bytes_on_disk=report["bytes"],
        bytes_per_view={tid: report["teachers"][tid]["bytes_per_view"] for tid in teachers},
        feature_bytes_per_view={tid: report["teachers"][tid]["feature_bytes_per_view"] for tid in teachers},
        seconds=seconds, images_per_second=images / seconds if seconds > 0 else 0.0,
        worker_images_per_second=images / worker_seconds if worker_seconds > 0 else 0.0)


def run_cache_job(job: CacheJob, progress: bool = True) -> CacheSummary:
    """Cache every teacher of ``job`` over every shard not cached yet; return the summary."""
    from jobs.ray_env import ray_session

    if not job.teachers:
        raise TeacherSpecError("no teacher given: pass --teacher SPEC (one or more) or --teachers-file")
    start = time.perf_counter()
    dataset = index_dataset(job.shards)
    results: list[ShardResult] = []
    failed: dict[int, str] = {}
    if teachers_to_run := teachers_with_work(job):
        with ray_session(job.address):
            workers, new_worker = _start_workers(job, teachers_to_run, len(dataset.shards))
            store = prepare_store(job, dataset)
            work = pending_work(job, store)
            results, failed = _run_on_ray(job, dataset, work, workers, new_worker, progress)
    else:
        store = prepare_store(job, dataset)
    return _summarize(job, store, dataset, results, failed, skipped=len(dataset.shards) - len(results) - len(failed),
                      seconds=time.perf_counter() - start)


def teachers_with_work(job: CacheJob) -> list[TeacherSpec]:
    """The requested teachers that the store does not hold on every shard (all of them for a new store)."""
    try:
        store = CacheStore.open(job.store)
    except StoreError:
        return list(job.teachers)
    return [spec for spec in job.teachers
            if spec.teacher_id not in store.teacher_ids or not store.teacher_done(spec.teacher_id).all()]


def pending_work(job: CacheJob, store: CacheStore) -> list[tuple[int, list[str]]]:
    """(shard, teachers still missing on it) for every shard that is not complete."""
    done = {spec.teacher_id: store.teacher_done(spec.teacher_id) for spec in job.teachers}
    return [(shard, pending) for shard in range(store.num_shards)
            if (pending := [tid for tid, flags in done.items() if not flags[shard]])]
