"""Throughput of ``cache-teachers`` on ImageNet-shaped JPEGs: decoding per core, and end to end
against the teachers' forward pass alone, as the number of decode threads grows.

Data: ImageNet-shaped JPEGs (benchmarks/imagenet_like.py: natural photos, 500x375 / 375x500,
quality 90), packed by ``make-shards``. Measured side by side, in interleaved rounds:

- decode per core: one thread decoding each JPEG and rendering its V views at the teacher's
  size, with the project's path (torchvision's libjpeg-turbo decoder, channels-last uint8
  resize) and with the path it replaced (PIL decode, planar resize), images/s;
- forward only: the teachers' forward passes on views rendered in memory beforehand, with every
  thread (no decoding, no cropping, no storing), images/s (an image counts once all its V views
  went through every teacher), measured before and after each cache run;
- cache: ``run_cache_job`` end to end on an embedded Ray (a fresh store each time, worker
  start-up, teacher loading and the final writes included), and its steady state (the time the
  worker spent processing shards), for each number of decode threads in ``--decode-workers``.

On a GPU the forward and the decoding use different hardware, so the cache can approach
min(forward only, N x decode per core). On a CPU they share the cores: the rate of the cores
doing both jobs one after the other, 1 / (1/forward + 1/(cores x decode per core)), is reported
as ``shared_core_bound``. Both it and ``forward only`` are references taken from separate runs,
not limits: the machine's speed drifts between runs, and the cache's steady state has come out
above the shared-core rate. Each cache run is compared with the mean of the forward-only runs
just before and after it; medians and the spread over rounds are reported.

    pip install --no-deps scikit-image==0.26.0                      # the photos
    python benchmarks/bench_cache.py                                # ~15 min on 2 CPU cores
    python benchmarks/bench_cache.py --quick                        # 300 images, 1 round
    python benchmarks/bench_cache.py --teacher vit_base_patch16_224,dtype=bf16,batch_size=256 \\
        --device cuda --decode-workers 4,8,16                       # on a GPU (written, not run)
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision.transforms.v2 import functional as TF  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imagenet_like import make_imagenet_like_folder  # noqa: E402

from jobs.cache_teachers import CacheJob, run_cache_job  # noqa: E402
from pipeline.cache.store import CacheConfig  # noqa: E402
from pipeline.data.images import decode_tensor  # noqa: E402
from pipeline.data.make_shards import make_shards_from_folder  # noqa: E402
from pipeline.data.shards import expand_shard_urls, iter_shard  # noqa: E402
from pipeline.data.views import (ViewPolicy, box_to_pixels, interpolation_mode, normalize, render_view,  # noqa: E402
                                 sample_views, stack_views)
from teachers import load_teacher, parse_teacher_spec  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def read_samples(urls: list[str]) -> list[tuple[str, bytes]]:
    return [(raw.key, raw.image_bytes) for url in urls for raw in iter_shard(url)]


def _pil_path(data: bytes, key: str, policy: ViewPolicy, size: tuple[int, int], interpolation: str) -> None:
    """The decode-and-render path before torchvision decoding and channels-last resizing."""
    array = np.array(Image.open(io.BytesIO(data)).convert("RGB"))
    image = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
    boxes, flips = sample_views(policy, key, image.shape[-1], image.shape[-2])
    for box, flip in zip(boxes, flips):
        top, left, h, w = box_to_pixels(box, image.shape[-1], image.shape[-2])
        view = TF.resized_crop(image, top, left, h, w, list(size), interpolation=interpolation_mode(interpolation),
                               antialias=True)
        _ = view.flip(-1) if flip else view


def _project_path(data: bytes, key: str, policy: ViewPolicy, size: tuple[int, int], interpolation: str) -> None:
    image = decode_tensor(data)
    boxes, flips = sample_views(policy, key, image.shape[-1], image.shape[-2])
    for box, flip in zip(boxes, flips):
        render_view(image, box, bool(flip), size, interpolation)


def _decode_rate(samples, policy: ViewPolicy, pre, path) -> float:
    torch.set_num_threads(1)
    start = time.perf_counter()
    for key, data in samples:
        path(data, key, policy, pre.input_size, pre.interpolation)
    return len(samples) / (time.perf_counter() - start)


def decode_per_core(samples, policy: ViewPolicy, pre, paths) -> list[float]:
    """Images/s of one thread decoding and rendering every view at the teacher's size, per path.

    Measured in a child process: lowering torch's thread count here and raising it again slows
    this process's later multi-threaded forward passes (seen: 44 -> 25 images/s).
    """
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return [pool.apply(_decode_rate, (samples, policy, pre, path)) for path in paths]


def render_all(samples, teachers, policy: ViewPolicy, device: torch.device) -> dict[str, list[torch.Tensor]]:
    """Every view of every image at each teacher's input size (uint8, in memory on ``device``)."""
    crops: dict[str, list[torch.Tensor]] = {t.spec.teacher_id: [] for t in teachers}
    for key, data in samples:
        image = decode_tensor(data)
        boxes, flips = sample_views(policy, key, image.shape[-1], image.shape[-2])
        for t in teachers:
            pre = t.preprocessing
            crops[t.spec.teacher_id] += [render_view(image, box, bool(flip), pre.input_size, pre.interpolation)
                                         .to(device) for box, flip in zip(boxes, flips)]
    return crops


def run_forward_only(teachers, crops: dict[str, list[torch.Tensor]]) -> float:
    start = time.perf_counter()
    for t in teachers:
        views, pre, batch = crops[t.spec.teacher_id], t.preprocessing, t.spec.batch_size
        for i in range(0, len(views), batch):
            t(normalize(stack_views(views[i:i + batch]), pre.mean, pre.std))
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
    return time.perf_counter() - start


def run_cache(urls: list[str], specs, config: CacheConfig, device: str, decode_workers: int,
              workdir: str) -> tuple[float, float]:
    """(end-to-end seconds, seconds the worker spent processing shards)."""
    store = os.path.join(workdir, "cache.zarr")
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    summary = run_cache_job(CacheJob(shards=urls, store=store, teachers=specs, config=config, random_init=True,
                                     num_workers=1, device=device, decode_workers=decode_workers), progress=False)
    seconds = time.perf_counter() - start
    if summary.failed:
        raise RuntimeError(f"cache job failed: {summary.failed}")
    return seconds, summary.samples / summary.worker_images_per_second


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", action="append",
                        help="teacher spec (repeatable); default: test_convnext at 224 px")
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--samples-per-shard", type=int, default=500)
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--decode-workers", default="1,2", help="decode threads per cache worker to try")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workdir", help="reuse the images and shards built here by an earlier run")
    parser.add_argument("--quick", action="store_true", help="300 images in 2 shards, 1 round")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.images, args.samples_per_shard = 1, 300, 150
    torch.set_num_threads(args.threads)
    specs = [parse_teacher_spec(s) for s in (args.teacher or ["test_convnext,img_size=224,batch_size=64"])]
    policy = ViewPolicy(num_views=args.views)
    config = CacheConfig(views=policy, topk=args.topk, temperatures=(1.0,))
    decode_workers = [int(n) for n in args.decode_workers.split(",")]

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_cache_")
    folder = make_imagenet_like_folder(os.path.join(workdir, "images"), args.images)
    manifest = os.path.join(workdir, "shards", "train.json")
    if not os.path.exists(manifest):
        make_shards_from_folder(folder, os.path.join(workdir, "shards"), args.samples_per_shard, progress=False)
    urls = expand_shard_urls(manifest)
    samples = read_samples(urls)
    teachers = [load_teacher(spec, args.device, random_init=True, seed=policy.seed) for spec in specs]
    crops = render_all(samples, teachers, policy, torch.device(args.device))
    decode_sample_set = samples[:min(len(samples), 600)]

    import ray

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    times: dict[str, list[float]] = {"forward_only": [], "decode_per_core": [], "decode_per_core_pil": []}
    for n in decode_workers:
        times[f"cache_n{n}"], times[f"cache_n{n}_steady"] = [], []
    for round_index in range(args.rounds):
        project, pil = decode_per_core(decode_sample_set, policy, teachers[0].preprocessing, (_project_path, _pil_path))
        times["decode_per_core"].append(project)
        times["decode_per_core_pil"].append(pil)
        # The forward pass alone before and after each cache run: each run is compared with the mean of
        # its two neighbours, since this machine's speed drifts by 10% or more over minutes.
        around = [run_forward_only(teachers, crops)]
        for n in decode_workers:
            seconds, steady = run_cache(urls, specs, config, args.device, n, workdir)
            times[f"cache_n{n}"].append(seconds)
            times[f"cache_n{n}_steady"].append(steady)
            around.append(run_forward_only(teachers, crops))
        times["forward_only"].append(around)
        print(f"round {round_index}: " + ", ".join(f"{m} {v[-1]}" for m, v in times.items()), flush=True)
    ray.shutdown()

    images = len(samples)
    cores = args.threads

    def forward_rate(i: int, j: int | None = None) -> float:
        """The forward-only rate of round i: around cache run j (the mean of its neighbours), or all of it."""
        around = times["forward_only"][i]
        seconds = statistics.mean(around if j is None else around[j:j + 2])
        return images / seconds

    def rate(mode: str, i: int) -> float:
        return times[mode][i] if mode.startswith("decode") else images / times[mode][i]

    def shared_core_bound(i: int, j: int) -> float:
        return 1.0 / (1.0 / forward_rate(i, j) + 1.0 / (cores * rate("decode_per_core", i)))

    def spread(values: list[float]) -> dict:
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}

    result = {
        "benchmark": "cache-teachers throughput, ImageNet-shaped JPEGs",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                    "python": sys.version.split()[0], "torch": torch.__version__},
        "teachers": [str(s) for s in specs], "images": images, "views": args.views, "topk": args.topk,
        "rounds": args.rounds, "seconds_or_rates": times,
        "median_images_per_second": {
            "forward_only": statistics.median(forward_rate(i) for i in range(args.rounds)),
            **{m: statistics.median(rate(m, i) for i in range(args.rounds)) for m in times if m != "forward_only"}},
        "decode_per_core": spread(times["decode_per_core"]),
        "decode_speedup_over_pil": statistics.median(
            rate("decode_per_core", i) / rate("decode_per_core_pil", i) for i in range(args.rounds)),
        "decode_workers_for_the_forward": math.ceil(statistics.median(
            forward_rate(i) / rate("decode_per_core", i) for i in range(args.rounds))),
        "cache": {},
    }
    for j, n in enumerate(decode_workers):
        rounds = range(args.rounds)
        result["cache"][n] = {
            "over_forward_only": spread([rate(f"cache_n{n}", i) / forward_rate(i, j) for i in rounds]),
            "steady_over_forward_only": spread([rate(f"cache_n{n}_steady", i) / forward_rate(i, j) for i in rounds]),
            "over_shared_core_bound": spread([rate(f"cache_n{n}", i) / shared_core_bound(i, j) for i in rounds]),
            "steady_over_shared_core_bound": spread([rate(f"cache_n{n}_steady", i) / shared_core_bound(i, j)
                                                     for i in rounds]),
            "start_up_fraction": statistics.median((e - s) / e for e, s in zip(times[f"cache_n{n}"],
                                                                                times[f"cache_n{n}_steady"])),
        }
    print(json.dumps({k: result[k] for k in ("median_images_per_second", "decode_speedup_over_pil",
                                             "decode_workers_for_the_forward", "cache")}, indent=2))
    out = args.out or os.path.join(RESULTS, f"cache-{args.device.replace('cuda', 'gpu')}"
                                            f"{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    if not args.workdir:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
