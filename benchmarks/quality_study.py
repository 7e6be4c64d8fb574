"""Distillation quality study: does a ReGLA student learn more from the cache than from labels,
and does the cache lose anything against live teachers?

For each dataset the study makes shards with ``pipeline make-shards`` (as a user would), trains
two teachers of different families on labels, caches them with ``run_cache_job`` (the
``pipeline cache-teachers`` job) once per store variant (views V, top-k), then trains one
student (regla_t) per arm and seed with one shared recipe. Arms differ only in what the arm
names; the labels-only arm replays the same cached views with the KD weight at 0, so the loss
is the only difference between it and the KD arms.

Training runs the Ray Train worker loop itself (``run_worker``: world size 1, one thread), two
runs at a time in spawned processes, instead of a Ray Train job per run: the loop is the same,
and 70 runs would otherwise pay Ray Train's start-up (~40 s each on 2 cores) 70 times.

Every finished run is saved as JSON under ``benchmarks/results/quality/DATASET/`` and is not run
again: an interrupted study continues where it stopped (teachers and stores are rebuilt
bit-identically from their seeds if the work folder is gone; a teacher whose accuracy differs
from its saved result stops the study). ``benchmarks/quality_report.py`` turns the JSON into
docs/quality.md and its plots.

    python benchmarks/quality_study.py --dataset mnist          # about an hour each on 2 cores
    python benchmarks/quality_study.py --dataset patches        # (docs/quality.md: each one's run time)
    python benchmarks/quality_study.py --dataset mnist --arms labels,kd-2t --seeds 0 --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from pipeline.data import storage  # noqa: E402  (after the repository root is on the path)


@dataclass(frozen=True)
class Recipe:
    """What every run of one dataset shares (teachers have their own epochs)."""

    img_size: int
    batch_size: int
    student_epochs: int
    teacher_epochs: int
    lr: float = 2e-3
    label_weight: float = 1.0
    kd_weight: float = 1.0
    temperature: float = 1.0
    seeds: tuple[int, ...] = (0, 1, 2)


DATASETS = {
    "mnist": Recipe(img_size=32, batch_size=64, student_epochs=3, teacher_epochs=4),
    "patches": Recipe(img_size=32, batch_size=64, student_epochs=5, teacher_epochs=6),
}
TEACHERS = ("resnet10t", "convnext_atto")
QUICK_SHARDS = 4  # --quick trains and evaluates on this many shards of each split
MAIN_STORE = (4, 5)  # (views, top-k) of the store most arms read


@dataclass(frozen=True)
class Arm:
    description: str
    views: int = MAIN_STORE[0]
    topk: int | str = MAIN_STORE[1]  # "all": every class
    options: dict = field(default_factory=dict)  # TrainConfig fields on top of the recipe
    online: bool = False  # both teachers run live on the replayed views instead of being read from the cache


ARMS = {
    "labels": Arm("labels only (same replayed views, KD weight 0)", options={"kd_weight": 0.0}),
    "kd-1t": Arm(f"KD from one cached teacher ({TEACHERS[0]})", options={"teachers": [TEACHERS[0]]}),
    "kd-2t": Arm("KD from two cached teachers (logits)"),
    "kd-2t-feat": Arm("two teachers, logits + features (weight 1)", options={"feature_weight": 1.0}),
    "kd-2t-drop": Arm("two teachers, teacher dropping p=0.5", options={"teacher_drop_prob": 0.5}),
    "kd-2t-v1": Arm("two teachers, V=1 view (fixed teacher)", views=1),
    "kd-2t-v16": Arm("two teachers, V=16 views", views=16),
    "kd-2t-k1": Arm("two teachers, top-1", topk=1),
    "kd-2t-k10": Arm("two teachers, top-10", topk=10),
    "kd-2t-kall": Arm("two teachers, all classes (cached)", topk="all"),
    "online-2t": Arm("two teachers run live on the same views (online KD, all classes)", topk="all", online=True),
}


# ---------------------------------------------------------------------------- data, teachers, stores


def make_shards(dataset: str, work: str) -> tuple[str, str]:
    """Shards through the CLI; returns the train and val manifests."""
    out = os.path.join(work, "shards")
    manifests = os.path.join(out, "train.json"), os.path.join(out, "val.json")
    if all(os.path.exists(m) for m in manifests):
        return manifests
    cli = [sys.executable, "-m", "pipeline.cli", "make-shards", "--out", out, "--samples-per-shard", "250"]
    if dataset == "mnist":
        subprocess.run([*cli, "--sample", "mnist"], check=True)
    else:
        from photo_patches import make_patch_folders

        train, val = make_patch_folders(os.path.join(work, "images"))
        subprocess.run([*cli, "--from-folder", train, "--split-name", "train"], check=True)
        subprocess.run([*cli, "--from-folder", val, "--split-name", "val"], check=True)
    return manifests


def first_shards(manifest: str, count: int) -> str:
    """A manifest of the first ``count`` shards of ``manifest``, beside it (the quick run's subset)."""
    from pipeline.data.shards import index_dataset, read_manifest, write_manifest

    dataset = index_dataset(manifest)
    path = manifest.removesuffix(".json") + f"-first{count}.json"
    write_manifest(path, read_manifest(manifest)["split"], dataset.shards[:count], dataset.class_names)
    return path


def train_run(config_values: dict) -> dict:
    """One run in this (spawned) process with the Ray Train worker loop; returns its metrics."""
    from jobs.train_student import plan_run
    from pipeline.train.metrics import read_metrics
    from pipeline.train.train_config import TrainConfig, save_run_config
    from pipeline.train.trainer import run_worker

    config = TrainConfig(**config_values)
    started = time.perf_counter()
    plan = plan_run(config)
    save_run_config(config)
    run_worker(config, plan | {"cpus_per_worker": 1})
    records = read_metrics(config.run_dir)
    return {"seconds": time.perf_counter() - started,
            "evals": [r for r in records if r["kind"] == "eval"],
            "train": [{k: v for k, v in r.items() if k.startswith(("loss", "step", "epoch"))}
                      for r in records if r["kind"] == "train"]}


def run_all(jobs: dict, workers: int, on_done: Callable[[object, dict], None] | None = None) -> dict:
    """Train every config (key -> TrainConfig fields), ``workers`` at a time; results by key.
    ``on_done`` gets each result as soon as its run ends, so an interrupted study keeps it."""
    results = {}
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(train_run, values): key for key, values in jobs.items()}
        for future in as_completed(futures):
            key, result = futures[future], future.result()
            results[key] = result
            print(f"  done {key}: {result['evals'][-1]['top1']:.2f}% top-1 in {result['seconds']:.0f} s", flush=True)
            if on_done is not None:
                on_done(key, result)
    return results


def common_options(recipe: Recipe, manifests: tuple[str, str]) -> dict:
    return dict(shards=[manifests[0]], val_shards=[manifests[1]], img_size=recipe.img_size,
                batch_size=recipe.batch_size, lr=recipe.lr, loader_workers=0, progress=False, log_every=10,
                checkpoint_every=10 ** 9)


def train_teachers(dataset: str, recipe: Recipe, manifests: tuple[str, str], work: str, out: str,
                   workers: int) -> dict[str, str]:
    """Both teachers on labels (seed 0); returns their weights. A saved result must be met again."""
    weights, jobs = {}, {}
    for name in TEACHERS:
        run_dir = os.path.join(work, "teachers", name)
        weights[name] = os.path.join(run_dir, "model.safetensors")
        if not os.path.exists(weights[name]):
            jobs[name] = common_options(recipe, manifests) | dict(
                out=run_dir, model=name, no_distill=True, epochs=recipe.teacher_epochs, seed=0)
    for name, result in run_all(jobs, workers).items():
        saved_path = os.path.join(out, f"teacher-{name}.json")
        final = result["evals"][-1]
        if os.path.exists(saved_path):
            with open(saved_path) as f:
                saved = json.load(f)["final"]
            if saved["top1"] != final["top1"]:
                raise SystemExit(f"teacher {name} rebuilt with {final['top1']}% top-1, but {saved_path} has "
                                 f"{saved['top1']}%: the saved runs were made with another teacher")
        save_json(saved_path, {"dataset": dataset, "run": f"teacher-{name}", "model": name, "final": final,
                               "recipe": asdict(recipe), **result})
    return weights


def store_path(work: str, views: int, topk: int | str) -> str:
    return os.path.join(work, f"cache-v{views}-k{topk}.zarr")


def build_stores(variants: set[tuple[int, int | str]], weights: dict[str, str], recipe: Recipe,
                 manifest: str, num_classes: int, work: str, out: str) -> None:
    """One store per (views, top-k) variant, both teachers in each, through the cache job."""
    from jobs.cache_teachers import CacheJob, run_cache_job
    from jobs.ray_env import ray_session
    from pipeline.cache.store import CacheConfig
    from pipeline.data.views import ViewPolicy
    from teachers import parse_teacher_spec

    specs = [parse_teacher_spec(f"{name}@{path},img_size={recipe.img_size}") for name, path in weights.items()]
    summaries = {}
    with ray_session():
        for views, topk in sorted(variants, key=str):
            k = num_classes if topk == "all" else topk
            job = CacheJob(shards=manifest, store=store_path(work, views, topk), teachers=specs,
                           config=CacheConfig(views=ViewPolicy(num_views=views, seed=0), topk=k))
            summary = run_cache_job(job, progress=False)
            if summary.failed:
                raise SystemExit(f"caching {job.store} failed for {', '.join(summary.failed)}")
            summaries[f"v{views}-k{topk}"] = {"seconds": summary.seconds, "bytes_on_disk": summary.bytes_on_disk}
            print(f"  store v{views} k{topk}: {summary.seconds:.0f} s", flush=True)
    if summaries:
        stores_json = os.path.join(out, "stores.json")
        previous = json.loads(storage.read_text(stores_json)) if os.path.exists(stores_json) else {}
        save_json(stores_json, previous | summaries)


# ---------------------------------------------------------------------------- the study


def student_options(arm: Arm, recipe: Recipe, manifests: tuple[str, str], weights: dict[str, str],
                    work: str, seed: int, run_dir: str) -> dict:
    options = common_options(recipe, manifests) | dict(
        out=run_dir, model="regla_t", epochs=recipe.student_epochs, seed=seed, label_weight=recipe.label_weight,
        kd_weight=recipe.kd_weight, temperature=recipe.temperature, store=store_path(work, arm.views, arm.topk))
    if arm.online:
        # Live teachers take the cached ones' places (same ids): the views still come from the store.
        options |= dict(teachers=list(TEACHERS), online_teachers=[
            f"{name}@{weights[name]},img_size={recipe.img_size},id={name}" for name in TEACHERS])
    return options | arm.options


def save_json(path: str, value: dict) -> None:
    storage.write_text(path, json.dumps(value, indent=1))


def machine() -> dict:
    from bench_quickstart import cpu_model

    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": sys.version.split()[0]}


def run_study(dataset: str, arms: list[str], seeds: list[int], work: str, out: str, workers: int,
              recipe: Recipe, max_shards: int | None = None) -> None:
    from pipeline.data.shards import index_dataset

    started = time.perf_counter()
    manifests = make_shards(dataset, work)
    if max_shards:
        manifests = tuple(first_shards(m, max_shards) for m in manifests)
    num_classes = len(index_dataset([manifests[0]]).class_names)
    same_as_all = [arm for arm in arms if isinstance(ARMS[arm].topk, int) and ARMS[arm].topk >= num_classes]
    if same_as_all:
        print(f"{dataset}: skipping {', '.join(same_as_all)}: top-k >= {num_classes} classes is all classes")
    arms = [arm for arm in arms if arm not in same_as_all]
    todo = {(arm, seed) for arm in arms for seed in seeds
            if not os.path.exists(os.path.join(out, f"{arm}-seed{seed}.json"))}
    print(f"{dataset}: {len(todo)} of {len(arms) * len(seeds)} runs to do ({num_classes} classes)", flush=True)
    if not todo:
        return
    weights = train_teachers(dataset, recipe, manifests, work, out, workers)
    needed = {(ARMS[arm].views, ARMS[arm].topk) for arm, _ in todo}
    build_stores({v for v in needed if not os.path.exists(store_path(work, *v))}, weights, recipe, manifests[0],
                 num_classes, work, out)
    jobs = {(arm, seed): student_options(ARMS[arm], recipe, manifests, weights, work, seed,
                                         os.path.join(work, "students", f"{arm}-seed{seed}"))
            for arm, seed in sorted(todo)}
    for run_dir in (values["out"] for values in jobs.values()):
        if os.path.exists(run_dir):  # a run interrupted before its result was saved starts again
            shutil.rmtree(run_dir)

    def save(key: tuple[str, int], result: dict) -> None:
        arm, seed = key
        save_json(os.path.join(out, f"{arm}-seed{seed}.json"), {
            "dataset": dataset, "run": arm, "arm": asdict(ARMS[arm]), "seed": seed, "recipe": asdict(recipe),
            "teachers": list(TEACHERS), "final": result["evals"][-1], **result, "machine": machine()})

    run_all(jobs, workers, on_done=save)
    print(f"{dataset}: finished in {time.perf_counter() - started:.0f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=sorted(DATASETS), required=True)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated arm names")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default: the recipe's 0,1,2)")
    parser.add_argument("--work", default=None, help="shards, teachers, stores and runs (default: /tmp/...)")
    parser.add_argument("--out", default=None, help="result folder (default: results/quality/DATASET)")
    parser.add_argument("--workers", type=int, default=2, help="runs at a time, one thread each")
    parser.add_argument("--quick", action="store_true",
                        help=f"one epoch each on the first {QUICK_SHARDS} train and val shards (a smoke test of the "
                             "study; results go to results/quality-quick/)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    recipe = DATASETS[args.dataset]
    if args.quick:
        recipe = Recipe(**asdict(recipe) | {"student_epochs": 1, "teacher_epochs": 1})
    unknown = set(args.arms.split(",")) - set(ARMS)
    if unknown:
        parser.error(f"unknown arm(s) {', '.join(sorted(unknown))}; choose from {', '.join(ARMS)}")
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(recipe.seeds)
    tag = "quality-quick" if args.quick else "quality"
    work = args.work or os.path.join("/tmp", f"regla-{tag}", args.dataset)
    out = args.out or os.path.join(HERE, "results", tag, args.dataset)
    run_study(args.dataset, args.arms.split(","), seeds, work, out, args.workers, recipe,
              QUICK_SHARDS if args.quick else None)


if __name__ == "__main__":
    main()
