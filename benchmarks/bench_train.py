"""Student training throughput: labels only, KD from the cache, and KD from live (online) teachers.

Same student, batch size, data, threads and training loop (``pipeline.train.trainer.WorkerRun``),
three ways to get the targets, measured side by side in interleaved rounds:

- labels:  label cross-entropy only (``--no-distill``);
- cached:  KD from two teachers' top-k log-probabilities and leftover mass, read from the store;
- online:  KD from the same two teachers run live on the same replayed views;
- labels_nchw: labels only with ``--no-channels-last``, to measure what NHWC buys.

Also timed on its own: the two teachers' forward passes on one batch, which is what
online KD should add to a step. Images per second count training examples. Run on an
idle machine (two-thread CPU timings swing by up to 10x when another process is busy).

    python benchmarks/bench_train.py            # ~6 min on 2 CPU cores
    python benchmarks/bench_train.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

from jobs.train_student import plan_run  # noqa: E402
from pipeline.cache.shard_cacher import ShardCacher  # noqa: E402
from pipeline.cache.store import CacheConfig, CacheStore  # noqa: E402
from pipeline.data.make_shards import make_mnist_sample  # noqa: E402
from pipeline.data.shards import index_dataset  # noqa: E402
from pipeline.data.views import ViewPolicy, normalize  # noqa: E402
from pipeline.train.train_config import TrainConfig  # noqa: E402
from pipeline.train.trainer import WorkerRun  # noqa: E402
from teachers import load_teacher, parse_teacher_spec  # noqa: E402

from bench_quickstart import cpu_model  # noqa: E402  (this folder is the script's first sys.path entry)

RESULTS = os.path.join(os.path.dirname(__file__), "results")
TEACHERS = ("resnet10t,img_size=32,num_classes=10", "convnext_atto,img_size=32,num_classes=10")
# Ratios of images/s saved per round as well (name: (numerator mode, denominator mode)).
RATIOS = {"ratio_cached_over_labels": ("cached", "labels"), "speedup_cached_over_online": ("cached", "online"),
          "speedup_channels_last": ("labels", "labels_nchw")}


def build_store(root: str, views: int, seed: int) -> tuple[str, str]:
    """MNIST shards and a store cached by the two teachers (random weights: same compute as trained ones)."""
    manifest, _ = make_mnist_sample(os.path.join(root, "shards"), progress=False)
    dataset = index_dataset(manifest)
    path = os.path.join(root, "cache.zarr")
    store = CacheStore.create(path, dataset, CacheConfig(views=ViewPolicy(num_views=views, seed=seed), topk=10))
    teachers = {}
    for text in TEACHERS:
        teacher = load_teacher(parse_teacher_spec(text), random_init=True, seed=seed)
        store.add_teacher(teacher.spec.teacher_id, teacher.record(), teacher.num_classes, teacher.feature_dim, False)
        teachers[teacher.spec.teacher_id] = teacher
    cacher = ShardCacher(store, teachers)
    for shard, info in enumerate(dataset.shards):
        cacher.process(shard, info.url, list(teachers), info.keys_sha256)
    return manifest, path


def make_run(mode: str, manifest: str, store: str, root: str, args: argparse.Namespace) -> WorkerRun:
    options = {"labels": dict(no_distill=True, store=None),
               "cached": dict(store=store),
               "online": dict(store=store, online_teachers=list(TEACHERS), random_init_online=True),
               "labels_nchw": dict(no_distill=True, store=None, channels_last=False)}[mode]
    config = TrainConfig(shards=[manifest], out=os.path.join(root, mode), model=args.model, img_size=32,
                         epochs=1, batch_size=args.batch_size, loader_workers=0, seed=args.seed, progress=False,
                         **options)
    plan = plan_run(config) | {"cpus_per_worker": args.threads}
    return WorkerRun(config, plan)


def time_steps(run: WorkerRun, batches: list, steps: int) -> list[float]:
    """Seconds per training step over pre-loaded batches (data loading is timed apart, by the stream)."""
    times = []
    for batch in batches[:steps]:
        started = time.perf_counter()
        run.train_step(batch)
        run.position.step += 1
        times.append(time.perf_counter() - started)
    return times


def teacher_seconds(run: WorkerRun, batch, reps: int) -> float:
    """Median time of the online teachers' forward passes on one batch."""
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        for teacher in run.online.values():
            pre = teacher.preprocessing
            teacher(normalize(batch.extra_images[(*pre.input_size, pre.interpolation)], pre.mean, pre.std))
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="regla_t")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=12, help="timed steps per mode and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="one round of 4 steps")
    parser.add_argument("--out", default=os.path.join(RESULTS, "train-cpu.json"))
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.steps = 1, 4
    torch.set_num_threads(args.threads)

    root = tempfile.mkdtemp(prefix="bench_train_")
    print(f"building shards and a 2-teacher store under {root} ...", flush=True)
    manifest, store = build_store(root, views=2, seed=args.seed)
    modes = ("labels", "cached", "online", "labels_nchw")
    runs = {mode: make_run(mode, manifest, store, root, args) for mode in modes}
    # Batches are loaded once, outside the timed loop; the loader's own cost is reported apart.
    wanted = 2 + args.steps * args.rounds
    loaded, load_seconds = {}, {}
    for mode in modes:
        started = time.perf_counter()
        stream = runs[mode].train_stream.iter_epoch(0)
        loaded[mode] = [next(stream) for _ in range(wanted)]
        load_seconds[mode] = (time.perf_counter() - started) / wanted
    for mode in modes:  # warm-up steps: allocator, lazy init
        time_steps(runs[mode], loaded[mode][:2], 2)
    step_times: dict[str, list[float]] = {m: [] for m in modes}
    round_ips: dict[str, list[float]] = {m: [] for m in modes}  # per round, so ratios come with their spread
    for r in range(args.rounds):
        for mode in modes:
            batches = loaded[mode][2 + r * args.steps: 2 + (r + 1) * args.steps]
            times = time_steps(runs[mode], batches, args.steps)
            step_times[mode] += times
            round_ips[mode].append(args.batch_size / statistics.median(times))
        print(f"round {r + 1}: " + ", ".join(f"{m} {args.batch_size / statistics.median(step_times[m]):.0f} img/s"
                                             for m in modes), flush=True)
    teacher_time = teacher_seconds(runs["online"], loaded["online"][0], reps=5)

    median = {m: statistics.median(t) for m, t in step_times.items()}
    ips = {m: args.batch_size / median[m] for m in modes}
    result = {
        "model": args.model, "batch_size": args.batch_size, "threads": args.threads, "img_size": 32,
        "teachers": list(TEACHERS), "steps_per_mode": len(step_times["labels"]),
        "images_per_second": ips,
        "seconds_per_step": median,
        "loader_seconds_per_batch": load_seconds,
        "teacher_forward_seconds_per_batch": teacher_time,
        "ratio_cached_over_labels": ips["cached"] / ips["labels"],
        "speedup_cached_over_online": ips["cached"] / ips["online"],
        "predicted_speedup_from_teacher_share": (median["cached"] + teacher_time) / median["cached"],
        "speedup_channels_last": ips["labels"] / ips["labels_nchw"],
        "rounds": {"images_per_second": round_ips,
                   **{name: [a / b for a, b in zip(round_ips[num], round_ips[den])]
                      for name, (num, den) in RATIOS.items()}},
        "torch": torch.__version__, "python": sys.version.split()[0], "machine": platform.machine(), "cpu": cpu_model(),
        "cpus": os.cpu_count(),
    }
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
