"""Throughput of ``pipeline make-shards`` with 1 and N worker processes, and of reading shards back.

Each measurement is repeated in rounds whose order alternates; every ratio is taken within a
round and the median (and range) over rounds is reported, since a shared 2-core VM has slow
spells that would otherwise land on one configuration and not the other.

- build:   ``make_shards_from_folder`` on an ImageNet-shaped folder (natural-photo JPEGs,
           500x375, quality 90, from ``benchmarks/imagenet_like.py``) with each worker count,
           each call in a fresh process, timed without the interpreter's start-up (wall and CPU
           seconds, workers included); the outputs of each round are compared byte for byte. Each round also
           measures how much two busy processes gain over one after the other at that moment
           (2.0 when two cores are free), which tells how many cores other users left;
- mnist:   ``make_mnist_sample`` (5000 small digits) the same way;
- read:    the built shards read back by this project's reader (``iter_shard``, and the
           header-only scan that ``index_dataset`` does without a manifest) and by webdataset's
           ``tar_file_iterator`` + ``group_by_keys``, from the page cache; the samples of both
           readers are compared;
- imports: seconds a fresh interpreter takes to import ``pipeline.data.make_shards`` (what a
           spawned worker imports), ``webdataset``, and what ``pipeline make-shards`` imports
           besides (its error handling imports ``pipeline.cache.store`` and ``teachers``).

    python benchmarks/bench_make_shards.py                  # ~3 min on 2 CPU cores
    python benchmarks/bench_make_shards.py --images 500 --rounds 1 --out /tmp/quick.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

from imagenet_like import make_imagenet_like_folder
from pipeline.data.shards import expand_shard_urls, index_dataset, iter_shard

RESULTS = os.path.join(os.path.dirname(__file__), "results")
SPIN = 10_000_000  # loop length of the parallelism probe (about 0.5 s of one core)
FREE_CORES_PARALLELISM = 1.8  # two busy processes this much faster than one after the other: 2 free cores
# What a make-shards worker imports; webdataset; and what `pipeline make-shards` imports for its error handling.
_IMPORTS = ("pipeline.data.make_shards", "webdataset", "pipeline.cache.store, teachers")


def same_files(a: str, b: str) -> bool:
    names = sorted(os.listdir(a))
    return names == sorted(os.listdir(b)) and all(
        open(os.path.join(a, n), "rb").read() == open(os.path.join(b, n), "rb").read() for n in names)


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def summary(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4),
            "max": round(max(values), 4), "rounds": [round(v, 4) for v in values]}


# Times one make-shards call in a fresh interpreter, as a user's process runs it (its memory
# allocator starts cold, unlike this long-running one's), leaving out start-up and imports.
_TIMED_CALL = """
import json, resource, sys, time
from pipeline.data.make_shards import make_mnist_sample, make_shards_from_folder
def cpu():
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the workers, once the pool has closed
    return time.process_time() + children.ru_utime + children.ru_stime
build = make_shards_from_folder if sys.argv[1] == "folder" else make_mnist_sample
start_cpu, start = cpu(), time.perf_counter()
build(progress=False, **json.loads(sys.argv[2]))
print(json.dumps([time.perf_counter() - start, cpu() - start_cpu]))
"""


def run_make_shards(source: str, kwargs: dict) -> tuple[float, float]:
    """(wall, CPU) seconds of one make-shards call (workers included) in a fresh process."""
    done = subprocess.run([sys.executable, "-c", _TIMED_CALL, source, json.dumps(kwargs)], check=True,
                          capture_output=True, text=True, env=_env())
    wall, cpu = json.loads(done.stdout.strip().splitlines()[-1])
    return wall, cpu


def spin(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def machine_parallelism(pool: ProcessPoolExecutor, n: int) -> float:
    """Speed-up of two busy processes running at once over one after the other, now on this machine.

    Other users' processes on a shared VM take cores away; this shows how many were free.
    """
    one_at_a_time = timed(lambda: [pool.submit(spin, n).result() for _ in range(2)])
    both = timed(lambda: list(pool.map(spin, [n, n])))
    return one_at_a_time / both


def bench(name: str, source: str, kwargs: dict, num_images: int, workers: list[int], rounds: int,
          workdir: str, control: ProcessPoolExecutor) -> dict:
    """make-shards with each worker count, in rounds of alternating order; outputs compared byte for byte.

    The machine's parallelism is measured before and after each round; a round counts as having
    had two free cores when both are at least ``FREE_CORES_PARALLELISM``.
    """
    seconds: dict[int, list[float]] = {n: [] for n in workers}
    cpu: dict[int, list[float]] = {n: [] for n in workers}
    parallelism: list[tuple[float, float]] = []
    identical = True
    for r in range(rounds):
        before = machine_parallelism(control, SPIN)
        for n in (workers if r % 2 == 0 else workers[::-1]):
            out = os.path.join(workdir, f"{name}-{n}")
            shutil.rmtree(out, ignore_errors=True)
            wall, cpu_seconds = run_make_shards(source, dict(kwargs, out=out, num_workers=n))
            seconds[n].append(wall)
            cpu[n].append(cpu_seconds)
        parallelism.append((before, machine_parallelism(control, SPIN)))
        identical &= all(same_files(os.path.join(workdir, f"{name}-{workers[0]}"),
                                    os.path.join(workdir, f"{name}-{n}")) for n in workers[1:])
        print(f"{name} round {r}: machine parallelism {before:.2f} / {parallelism[-1][1]:.2f}, "
              + ", ".join(f"{n} worker(s) {seconds[n][-1]:.2f} s" for n in workers), flush=True)
    base = workers[0]
    free = [min(p) >= FREE_CORES_PARALLELISM for p in parallelism]
    speed_up = {n: [b / s for b, s in zip(seconds[base], seconds[n])] for n in workers[1:]}
    return {
        "images": num_images, "byte_identical": identical,
        "seconds": {str(n): summary(seconds[n]) for n in workers},
        "cpu_seconds": {str(n): summary(cpu[n]) for n in workers},
        "images_per_second": {str(n): summary([num_images / s for s in seconds[n]]) for n in workers},
        "speed_up": {str(n): summary(v) for n, v in speed_up.items()},
        "machine_parallelism_before_after": [[round(b, 3), round(a, 3)] for b, a in parallelism],
        "rounds_with_two_free_cores": sum(free),
        "speed_up_with_two_free_cores": {str(n): summary([x for x, f in zip(v, free) if f]) if any(free) else None
                                         for n, v in speed_up.items()},
    }


def read_ours(urls: list[str]) -> list[tuple[str, bytes]]:
    return [(s.key, s.image_bytes) for url in urls for s in iter_shard(url)]


def read_webdataset(urls: list[str]) -> list[tuple[str, bytes]]:
    from webdataset.tariterators import group_by_keys, tar_file_iterator  # imports torch: not in workers

    samples = []
    for url in urls:
        with open(url, "rb") as f:
            files = (dict(member, __url__=url) for member in tar_file_iterator(f))
            samples += [(s["__key__"], s["jpg"]) for s in group_by_keys(files)]
    return samples


def bench_read(urls: list[str], rounds: int) -> dict:
    num_samples = index_dataset(urls).num_samples
    num_bytes = sum(os.path.getsize(u) for u in urls)
    same = read_ours(urls) == read_webdataset(urls)  # also warms the page cache
    modes = {"ours": lambda: read_ours(urls), "webdataset": lambda: read_webdataset(urls),
             "ours_header_scan": lambda: index_dataset(urls)}
    seconds: dict[str, list[float]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
            seconds[mode].append(timed(modes[mode]))
    return {
        "samples": num_samples, "megabytes": round(num_bytes / 1e6, 1), "same_samples": same,
        "samples_per_second": {m: summary([num_samples / s for s in v]) for m, v in seconds.items()},
        "ours_over_webdataset": summary([w / o for o, w in zip(seconds["ours"], seconds["webdataset"])]),
        "header_scan_over_webdataset": summary([w / o for o, w in zip(seconds["ours_header_scan"],
                                                                      seconds["webdataset"])]),
    }


def import_seconds(module: str, reps: int) -> dict:
    return summary([timed(lambda: subprocess.run([sys.executable, "-c", f"import {module}"], check=True, env=_env()))
                    for _ in range(reps)])


def _env() -> dict:
    """This checkout first on the path of child processes."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--samples-per-shard", type=int, default=250)
    parser.add_argument("--workers", default="1,2", help="worker counts to compare; the first is the reference")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--data", help="folder for the ImageNet-shaped images (kept; default: a temporary one)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "make-shards.json"))
    args = parser.parse_args()
    workers = [int(n) for n in args.workers.split(",")]

    with tempfile.TemporaryDirectory(prefix="bench-make-shards-") as workdir, \
            ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as control:
        list(control.map(spin, [1, 1]))  # started before any timing
        folder = args.data or os.path.join(workdir, "images")
        make_imagenet_like_folder(folder, args.images, args.classes, seed=0)
        build = dict(bench("build", "folder", {"folder": folder, "samples_per_shard": args.samples_per_shard},
                           args.images, workers, args.rounds, workdir, control),
                     samples_per_shard=args.samples_per_shard)
        mnist = bench("mnist", "mnist", {}, 5000, workers, args.rounds, workdir, control)
        read = bench_read(expand_shard_urls(os.path.join(workdir, f"build-{workers[0]}", "train.json")), args.rounds)
    result = {
        "benchmark": "make-shards", "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": _cpu_model(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0]},
        "build": build, "mnist": mnist, "read": read,
        "import_seconds": {m: import_seconds(m, args.rounds) for m in _IMPORTS},
    }
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


if __name__ == "__main__":
    main()
