"""The cache job: run every teacher over every shard once, on Ray, and fill the store.

The driver indexes the shards and starts the ``ShardWorker`` actors, which import
torch and load their teachers while the driver loads each teacher once to validate
it and record its fingerprint and creates (or checks) the store; then it hands out
one shard at a time to the workers. A shard whose task fails is retried a bounded number of
times; a worker that dies (or its node) is replaced where there is room and its shard retried.
No wait is unbounded: a shard in flight longer than ``shard_timeout`` has its worker killed and
replaced and is retried; a worker that cannot start within ``worker_start_timeout`` is reported.
The workers are planned from the alive nodes' resources (``cache_plan.py``), so a request no
node can satisfy fails at once. Completed shards are skipped on a rerun, so rerunning the same
command resumes an interrupted run. The same code runs on an embedded local Ray and on a
cluster (``address``).
"""

from __future__ import annotations

import collections
import errno
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from jobs.cache_plan import WorkerPlan, plan_workers
from jobs.nodes import alive_nodes, describe_nodes
from pipeline.cache.compat import StoreError
from pipeline.cache.report import store_report
from pipeline.cache.shard_cacher import ShardCacher, ShardResult
from pipeline.cache.store import CacheConfig, CacheStore
from pipeline.data import storage
from pipeline.data.shards import DatasetIndex, index_dataset, shard_spec_entries
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
    shard_timeout: float = 3600.0  # seconds one shard may stay in flight before its worker is replaced
    worker_start_timeout: float = 600.0  # seconds a worker may take to be scheduled and load its teachers

    def __post_init__(self) -> None:
        # Locations are recorded in the store and printed: none may carry a secret.
        storage.check_location(self.store)
        for entry in [self.shards] if isinstance(self.shards, str) else self.shards:
            shard_spec_entries(entry)  # splits each entry's comma list; refuses a URL with credentials


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
    retried: dict[str, str] = field(default_factory=dict)  # shard name -> why its first try did not finish
    shards_per_node: dict[str, int] = field(default_factory=dict)  # node -> shards cached there in this run
    worker_problems: list[str] = field(default_factory=list)  # workers that could not start
    store_error: str | None = None  # the store could not be finished or read back after the run

    @property
    def ok(self) -> bool:
        return not self.failed and self.store_error is None

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
        if self.shards_per_node:
            out.append("shards per node: " + ", ".join(f"{n}: {c}" for n, c in sorted(self.shards_per_node.items())))
        out += [f"retried {name}: {reason}" for name, reason in self.retried.items()]
        out += [f"worker not started: {problem}" for problem in self.worker_problems]
        out += [f"FAILED {name}: {error}" for name, error in self.failed.items()]
        if self.store_error:
            out.append(f"FAILED finishing the store: {self.store_error}")
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
                 threads: int, decode_workers: int):
        import torch

        torch.set_num_threads(threads)
        self.store_path = store_path
        self.device, self.decode_workers = device, decode_workers
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

    def ready(self) -> str:
        """The node this worker runs on (answered once its teachers are loaded)."""
        import ray

        return ray.get_runtime_context().get_node_id()

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

    def process(self, shard: int, url: str, keys_sha256: str, teacher_ids: list[str]) -> ShardResult:
        teachers = {tid: self._teacher(tid) for tid in teacher_ids}
        cacher = ShardCacher(self.store, teachers, self.device, self.decode_workers)
        return cacher.process(shard, url, teacher_ids, keys_sha256)


def _plan(job: CacheJob) -> WorkerPlan:
    return plan_workers(alive_nodes(), job.device, job.num_workers, job.decode_workers)


def _start_workers(job: CacheJob, plan: WorkerPlan, specs: list[TeacherSpec]) -> Callable[[], object]:
    """A function that starts one worker actor holding ``specs`` (its imports and teacher loading
    overlap the driver's store preparation)."""
    import ray

    remote_worker = ray.remote(ShardWorker).options(num_cpus=plan.num_cpus, num_gpus=plan.num_gpus,
                                                    scheduling_strategy="SPREAD", max_restarts=0)
    spec_dicts = [spec.to_dict() for spec in specs]

    def new_worker():
        return remote_worker.remote(job.store, spec_dicts, job.random_init, job.config.views.seed, plan.device,
                                    plan.threads, plan.decode_workers)

    return new_worker


@dataclass
class _Task:
    worker: object
    node: str
    shard: int
    teachers: list[str]
    attempt: int
    started: float


def _error_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__


class _Dispatcher:
    """Hands shards to workers, one at a time each, with every wait bounded.

    Workers are ``starting`` (their ``ready`` call not answered yet), ``idle`` or busy with a task
    ``in_flight``. A worker that dies (or whose node dies) is replaced; one past its start bound is
    killed and reported; one whose shard is past the shard bound is killed and replaced, and the
    shard retried.
    """

    POLL_SECONDS = 5.0  # longest single wait: deadlines are checked at least this often

    def __init__(self, job: CacheJob, plan: WorkerPlan, dataset: DatasetIndex, new_worker: Callable[[], object]):
        self.job, self.plan, self.dataset, self.new_worker = job, plan, dataset, new_worker
        self.starting: dict = {}  # ready ref -> (worker, start time)
        self.idle: list[tuple[object, str]] = []  # (worker, node id)
        self.in_flight: dict = {}  # process ref -> _Task
        self.queue: collections.deque = collections.deque()
        self.results: list[ShardResult] = []
        self.failed: dict[int, str] = {}
        self.retried: dict[int, str] = {}
        self.node_of_result: list[str] = []
        self.worker_problems: list[str] = []
        self.starts_left = 0

    def start(self, count: int, shards: int) -> None:
        # Each start beyond the first ones replaces a lost worker: bounded by the retries there can be.
        self.starts_left = count + shards * (self.job.max_retries + 1)
        for _ in range(count):
            self._start_one()

    def _start_one(self) -> None:
        if self.starts_left <= 0:
            return
        self.starts_left -= 1
        worker = self.new_worker()
        self.starting[worker.ready.remote()] = (worker, time.monotonic())

    def run(self, work: list[tuple[int, list[str]]], progress: bool) -> None:
        import ray
        from tqdm import tqdm

        self.queue.extend((shard, tids, 0) for shard, tids in work)
        total = sum(self.dataset.shards[shard].num_samples for shard, _ in work)
        with tqdm(total=total, unit="img", desc="cache-teachers", disable=not progress, dynamic_ncols=True) as bar:
            while self.queue or self.in_flight:
                self._hand_out()
                if not self.in_flight and not self.starting and not self.idle:
                    self._start_one()
                    if not self.starting:  # no worker left and none may be started
                        self._fail_queued()
                        break
                ready, _ = ray.wait([*self.starting, *self.in_flight], num_returns=1, timeout=self._wait_seconds())
                for ref in ready:
                    if ref in self.starting:
                        self._started(ref)
                    else:
                        self._finished(ref, bar)
                self._enforce_deadlines()
        for worker, _ in self.idle:
            ray.kill(worker)
        for worker, _ in self.starting.values():
            ray.kill(worker)

    def _hand_out(self) -> None:
        while self.queue and self.idle:
            shard, tids, attempt = self.queue.popleft()
            worker, node = self.idle.pop()
            info = self.dataset.shards[shard]
            ref = worker.process.remote(shard, info.url, info.keys_sha256, tids)
            self.in_flight[ref] = _Task(worker, node, shard, tids, attempt, time.monotonic())

    def _wait_seconds(self) -> float:
        now = time.monotonic()
        deadlines = [t.started + self.job.shard_timeout for t in self.in_flight.values()]
        deadlines += [t0 + self.job.worker_start_timeout for _, t0 in self.starting.values()]
        return max(0.05, min([self.POLL_SECONDS, *(d - now for d in deadlines)]))

    def _started(self, ref) -> None:
        import ray

        worker, _ = self.starting.pop(ref)
        try:
            node = ray.get(ref)
        except ray.exceptions.RayError as e:  # died while starting (its node lost, out of memory, ...)
            self.worker_problems.append(f"worker died while starting: {_error_line(e)}")
            self._start_one()
            return
        self.idle.append((worker, node))

    def _finished(self, ref, bar) -> None:
        import ray

        task = self.in_flight.pop(ref)
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as e:
            self._start_one()  # the worker (or its node) died: replace it where there is room
            self._retry(task, f"worker died: {_error_line(e)}")
        except ray.exceptions.RayTaskError as e:
            self.idle.append((task.worker, task.node))
            cause = e.cause if e.cause is not None else e
            if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
                self.stop_all()
                raise StoreError(f"No space left on device writing store {self.job.store} "
                                 f"(shard {self.dataset.shards[task.shard].name}): free space or move the store, "
                                 "then rerun the same command to resume (completed shards are kept)") from None
            if isinstance(cause, KeyError):  # zarr's answer for an array that existed when the store was prepared
                self._retry(task, f"the store has no array {cause} any more: {self.job.store} or its bucket was "
                                  "removed during the run")
            else:
                self._retry(task, _error_line(cause))
        else:
            self.idle.append((task.worker, task.node))
            self.results.append(result)
            self.node_of_result.append(task.node)
            bar.update(result.num_samples)

    def _retry(self, task: _Task, error: str) -> None:
        self.retried.setdefault(task.shard, error)
        if task.attempt < self.job.max_retries:
            self.queue.append((task.shard, task.teachers, task.attempt + 1))
        else:
            self.failed[task.shard] = error

    def _enforce_deadlines(self) -> None:
        import ray

        now = time.monotonic()
        for ref, task in list(self.in_flight.items()):
            if now - task.started > self.job.shard_timeout:
                del self.in_flight[ref]
                ray.kill(task.worker, no_restart=True)
                self._start_one()
                self._retry(task, f"timed out after {self.job.shard_timeout:g} s (--shard-timeout); "
                                  f"its worker was replaced")
        for ref, (worker, t0) in list(self.starting.items()):
            if now - t0 > self.job.worker_start_timeout:
                del self.starting[ref]
                ray.kill(worker, no_restart=True)
                self.worker_problems.append(
                    f"a worker ({self.plan.num_cpus:g} CPU, {self.plan.num_gpus:g} GPU) was not scheduled and ready "
                    f"within {self.job.worker_start_timeout:g} s (--worker-start-timeout); "
                    f"the cluster has {describe_nodes(alive_nodes())}")

    def _fail_queued(self) -> None:
        reason = self.worker_problems[-1] if self.worker_problems else "no worker could be started"
        while self.queue:
            shard, _, _ = self.queue.popleft()
            self.failed[shard] = f"not cached: {reason}"

    def stop_all(self) -> None:
        import ray

        for worker in [w for w, _ in self.idle] + [w for w, _ in self.starting.values()] + \
                [t.worker for t in self.in_flight.values()]:
            ray.kill(worker, no_restart=True)
        self.idle, self.starting, self.in_flight = [], {}, {}


def _summarize(job: CacheJob, store: CacheStore, dataset: DatasetIndex, run: _Dispatcher | None,
               seconds: float, store_error: str | None = None) -> CacheSummary:
    teachers = [spec.teacher_id for spec in job.teachers]
    try:
        report = store_report(store.path)
    except Exception as e:  # e.g. the object store lost the bucket mid-run: report it with the shards' outcome
        store_error = store_error or _store_lost(job.store, "reading it back", e)
        report = {"dataset": {"invalid_samples": 0}, "bytes": 0,
                  "teachers": {tid: {"bytes_per_view": 0.0, "feature_bytes_per_view": 0.0} for tid in teachers}}
    results = run.results if run else []
    failed = run.failed if run else {}
    images = sum(r.num_samples for r in results)
    worker_seconds = sum(r.seconds for r in results)
    name = {i: info.name for i, info in enumerate(dataset.shards)}
    return CacheSummary(
        store=job.store, num_shards=store.num_shards, shards_done=len(results),
        shards_skipped=len(dataset.shards) - len(results) - len(failed),
        failed={name[s]: e for s, e in sorted(failed.items())},
        samples=dataset.num_samples, invalid=report["dataset"]["invalid_samples"],
        views=store.config.views.num_views, teachers=teachers, bytes_on_disk=report["bytes"],
        bytes_per_view={tid: report["teachers"][tid]["bytes_per_view"] for tid in teachers},
        feature_bytes_per_view={tid: report["teachers"][tid]["feature_bytes_per_view"] for tid in teachers},
        seconds=seconds, images_per_second=images / seconds if seconds > 0 else 0.0,
        worker_images_per_second=images / worker_seconds if worker_seconds > 0 else 0.0,
        retried={name[s]: e for s, e in sorted(run.retried.items())} if run else {},
        shards_per_node=dict(collections.Counter(node[:NODE_ID_CHARS] for node in run.node_of_result)) if run else {},
        worker_problems=list(run.worker_problems) if run else [], store_error=store_error)


NODE_ID_CHARS = 12  # node ids are shown by their first characters (as `ray status` does)


def run_cache_job(job: CacheJob, progress: bool = True) -> CacheSummary:
    """Cache every teacher of ``job`` over every shard not cached yet; return the summary."""
    from jobs.ray_env import ray_session

    start = time.perf_counter()
    dataset = check_inputs(job)
    run, store_error = None, None
    if teachers_to_run := teachers_with_work(job):
        with ray_session(job.address):
            plan = _plan(job)  # fails at once when no node can host a worker
            run = _Dispatcher(job, plan, dataset, _start_workers(job, plan, teachers_to_run))
            run.start(min(plan.count, len(dataset.shards)), len(dataset.shards))
            try:
                store = prepare_store(job, dataset)
            except BaseException:
                run.stop_all()
                raise
            run.run(pending_work(job, store), progress)
            try:
                store.write_teacher_index()  # the index again, with any teacher another job added meanwhile
            except Exception as e:
                store_error = _store_lost(job.store, "writing its teacher index", e)
    else:
        store = prepare_store(job, dataset)
    return _summarize(job, store, dataset, run, seconds=time.perf_counter() - start, store_error=store_error)


def check_inputs(job: CacheJob) -> DatasetIndex:
    """The checks that need no Ray, in seconds: teachers given, shards indexed, and an existing store
    made from these shards with these view settings. Returns the shards' index."""
    if not job.teachers:
        raise TeacherSpecError("no teacher given: pass --teacher SPEC (one or more) or --teachers-file")
    dataset = index_dataset(job.shards)
    try:
        store = CacheStore.open(job.store)
    except StoreError:
        return dataset  # none yet (or not a store): the job creates it, or refuses the path, later
    store.check_compatible(dataset, job.config)
    return dataset


def _store_lost(path: str, step: str, error: Exception) -> str:
    """One line for a store that vanished or became unreachable during the run (a deleted folder or bucket)."""
    return (f"{step} failed ({type(error).__name__}: {_error_line(error)}); the store {path} or its bucket may have "
            f"been removed or unreachable during the run: rerun the same command to finish it")


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
