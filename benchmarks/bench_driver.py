"""The driver's work at ImageNet scale: seconds and peak memory of each step, for 1.28M samples in 1024 shards.

The dataset is described by a manifest alone (1,281,167 samples in 1024 shards, ImageNet-1k's
train split, with 1000 class names); its shard files exist but are empty, since none of these
steps reads a tar. Each step runs in a fresh process, whose peak resident memory (VmHWM) is
reported beside that of a process that only imports the same modules (the seconds exclude the
imports):

- index:        read the manifest into the dataset index;
- create_store: ``prepare_store`` of the cache job: load two 1000-class teachers (tiny, random),
                create the store (8 views, top-10, features of 2 views at D=768... as the
                teachers have them) and register them;
- plan_cache:   reopen the store, find the teachers and shards with work left;
- inspect:      ``store_report`` + ``format_report`` (``pipeline inspect``);
- train_checks: ``plan_run`` of train-student (model name, shards against the store, every
                teacher complete, class counts, run directory), on a store marked complete;
- rank_plan:    not a driver step: a training rank's start of epoch (its stream and its epoch
                plan over every sample, world size 1 and 8), with the distinct shards in each
                batch of 256 that the plan gives (16 shards in flight, a 2048-example buffer).

    python benchmarks/bench_driver.py          # ~1.5 min
    python benchmarks/bench_driver.py --quick  # the same steps forked from one process that imported once
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import multiprocessing
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

RESULTS = os.path.join(os.path.dirname(__file__), "results")
SAMPLES, SHARDS, CLASSES = 1_281_167, 1024, 1000
IMPORTED = ["jobs.cache_teachers", "jobs.train_student", "pipeline.cache.report", "pipeline.train.student_data"]
TEACHERS = ["test_vit,num_classes=1000,id=vit", "test_resnet,num_classes=1000,id=resnet"]


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def write_manifest(root: str) -> str:
    """An ImageNet-sized manifest; the shard files it names exist and are empty."""
    from pipeline.data.shards import ShardInfo, write_manifest as write

    os.makedirs(root, exist_ok=True)
    base, extra = divmod(SAMPLES, SHARDS)
    shards = []
    for i in range(SHARDS):
        name = f"train-{i:06d}.tar"
        open(os.path.join(root, name), "wb").close()
        shards.append(ShardInfo(url=os.path.join(root, name), name=name, num_samples=base + (i < extra),
                                keys_sha256=hashlib.sha256(name.encode()).hexdigest()))
    path = os.path.join(root, "train.json")
    write(path, "train", shards, [f"n{c:08d}" for c in range(CLASSES)])
    return path


def _job(manifest: str, store: str):
    from jobs.cache_teachers import CacheJob
    from pipeline.cache.store import CacheConfig
    from pipeline.data.views import ViewPolicy
    from teachers import parse_teacher_spec

    return CacheJob(shards=manifest, store=store, teachers=[parse_teacher_spec(t) for t in TEACHERS],
                    config=CacheConfig(views=ViewPolicy(num_views=8), topk=10, feature_views=2), random_init=True)


def _import_only(manifest: str, store: str, work: str) -> None:
    for module in IMPORTED:
        importlib.import_module(module)


def step_index(manifest: str, store: str, work: str) -> None:
    from pipeline.data.shards import index_dataset

    assert index_dataset(manifest).num_samples == SAMPLES


def step_create_store(manifest: str, store: str, work: str) -> None:
    from jobs.cache_teachers import prepare_store
    from pipeline.data.shards import index_dataset

    prepare_store(_job(manifest, store), index_dataset(manifest))


def step_plan_cache(manifest: str, store: str, work: str) -> None:
    from jobs.cache_teachers import pending_work, teachers_with_work
    from pipeline.cache.store import CacheStore
    from pipeline.data.shards import index_dataset

    job = _job(manifest, store)
    index_dataset(manifest)
    assert len(teachers_with_work(job)) == 2
    assert len(pending_work(job, CacheStore.open(store))) == SHARDS


def step_inspect(manifest: str, store: str, work: str) -> None:
    from pipeline.cache.report import format_report, store_report

    format_report(store_report(store))


def mark_complete(store: str) -> None:
    """Set every done flag and every sample valid, as a finished cache job leaves them."""
    import zarr

    import numpy as np

    root = zarr.open_group(store, mode="r+")
    counts = np.array(root.attrs["dataset"]["fingerprint"]["counts"])
    rows = root.attrs["dataset"]["rows_per_shard"]
    root["samples/done"][:] = True
    root["samples/valid"][:] = (np.arange(rows)[None, :] < counts[:, None]).reshape(-1)  # padding rows stay invalid
    for tid in root["teachers"]:
        root[f"teachers/{tid}/done"][:] = True


def step_train_checks(manifest: str, store: str, work: str) -> None:
    from jobs.train_student import plan_run
    from pipeline.train.train_config import TrainConfig

    plan = plan_run(TrainConfig(shards=[manifest], store=store, out=os.path.join(work, "run"), model="regla_t"))
    assert plan["num_classes"] == CLASSES


def _rank_plan(manifest: str, store: str, world_size: int) -> dict:
    import numpy as np

    from pipeline.data.shards import index_dataset
    from pipeline.train.student_data import StreamConfig, StudentInput, StudentStream

    stream = StudentStream(index_dataset(manifest), store, StudentInput(size=(224, 224)),
                           StreamConfig(batch_size=256, teacher_ids=("vit", "resnet")), world_size=world_size)
    plan = stream.plan(0)
    stream._chunks(plan, 0)  # what the first pass builds before its first chunk task
    shards = plan.shard[plan.emit][:stream.steps_per_epoch() * 256].reshape(-1, 256)
    distinct = [len(np.unique(batch)) for batch in shards]
    return {"examples": len(plan), "shards_per_batch_mean": float(np.mean(distinct)),
            "shards_per_batch_min": int(min(distinct))}


def step_rank_plan_1(manifest: str, store: str, work: str) -> dict:
    return _rank_plan(manifest, store, 1)


def step_rank_plan_8(manifest: str, store: str, work: str) -> dict:
    return _rank_plan(manifest, store, 8)


def _measure(step, manifest: str, store: str, work: str, queue) -> None:
    _import_only(manifest, store, work)  # imports are not the step's time (their memory is import_only's)
    start = time.perf_counter()
    extra = step(manifest, store, work) or {}
    queue.put({"seconds": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(), **extra})


def process_context(quick: bool) -> multiprocessing.context.BaseContext:
    """spawn: each step imports everything afresh, so its peak RSS is what a driver process has.
    --quick forks each step from a server that imported the modules once: the same steps and
    seconds, minutes sooner, but a forked process's peak RSS counts only the pages it touches."""
    if not quick:
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(IMPORTED)
    return context


def run(step, manifest: str, store: str, work: str, context: multiprocessing.context.BaseContext) -> dict:
    queue = context.Queue()
    process = context.Process(target=_measure, args=(step, manifest, store, work, queue))
    process.start()
    result = queue.get()
    process.join()
    if process.exitcode:
        raise RuntimeError(f"{step.__name__} failed (exit code {process.exitcode})")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(RESULTS, "driver-scale.json"))
    parser.add_argument("--quick", action="store_true",
                        help="fork the steps from a process that has the imports (peak RSS not comparable)")
    args = parser.parse_args()
    context = process_context(args.quick)
    work = tempfile.mkdtemp(prefix="bench_driver_")
    manifest = write_manifest(os.path.join(work, "shards"))
    store = os.path.join(work, "cache.zarr")
    steps = {"import_only": _import_only, "index": step_index, "create_store": step_create_store,
             "plan_cache": step_plan_cache, "inspect": step_inspect, "train_checks": step_train_checks,
             "rank_plan_world_1": step_rank_plan_1, "rank_plan_world_8": step_rank_plan_8}
    results = {}
    for name, step in steps.items():
        if name == "train_checks":
            mark_complete(store)
        results[name] = run(step, manifest, store, work, context)
        results[name]["above_imports_mb"] = results[name]["peak_rss_mb"] - results["import_only"]["peak_rss_mb"]
        extra = {k: v for k, v in results[name].items() if k not in ("seconds", "peak_rss_mb", "above_imports_mb")}
        print(f"{name:>18}: {results[name]['seconds']:6.2f} s, peak RSS {results[name]['peak_rss_mb']:5.0f} MB "
              f"({results[name]['above_imports_mb']:+.0f} MB over the imports) {extra or ''}", flush=True)
    out = {"benchmark": "driver at ImageNet scale", "processes": "forked" if args.quick else "spawned",
           "samples": SAMPLES, "shards": SHARDS, "classes": CLASSES, "teachers": TEACHERS,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0]},
           "steps": results}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
