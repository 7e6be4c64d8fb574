"""Throughput of ``cache-teachers`` against its upper bound and against a naive baseline.

Three ways to get every teacher's outputs on V views of the same images, same
teachers, batch size, device and threads, measured side by side in interleaved rounds:

- bound:  the teachers' forward passes alone, on views rendered in memory beforehand
          (no decoding, no cropping, no storing): what no cache job can beat;
- cache:  ``run_cache_job`` end to end on an embedded Ray (a fresh store each round,
          worker start-up, teacher loading and the final writes included), and its
          steady state: the time the worker spent processing shards;
- naive:  per teacher and per view, a torch DataLoader over the WebDataset shards
          (decode + RandomResizedCrop + flip), the forward pass, and one .npz file per
          sample and view.

Throughput is images per second, an image counting once all its V views went
through every teacher. The ratios are taken within each round (the modes of one
round run back to back) and the median over rounds is reported: this VM has slow
spells that would otherwise land on one mode and not the other. Run on an idle
machine: two-thread CPU timings swing by up to 10x when another process is busy.

    python benchmarks/bench_cache.py                 # ~11 min on 2 CPU cores
    python benchmarks/bench_cache.py --quick         # smaller, one round
    python benchmarks/bench_cache.py --teacher vit_base_patch16_224,dtype=bf16,batch_size=256   # on a GPU
"""

from __future__ import annotations

import argparse
import json
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

from jobs.cache_teachers import CacheJob, run_cache_job  # noqa: E402
from pipeline.cache.shard_cacher import decode_to_tensor  # noqa: E402
from pipeline.cache.store import CacheConfig  # noqa: E402
from pipeline.data.make_shards import make_mnist_sample  # noqa: E402
from pipeline.data.shards import expand_shard_urls, iter_shard  # noqa: E402
from pipeline.data.views import ViewPolicy, normalize, render_view, sample_views  # noqa: E402
from teachers import load_teacher, parse_teacher_spec  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def render_all(urls: list[str], teachers, policy: ViewPolicy, device: torch.device) -> dict[str, list[torch.Tensor]]:
    """Every view of every image, rendered at each teacher's input size (uint8, in memory on ``device``)."""
    crops: dict[str, list[torch.Tensor]] = {t.spec.teacher_id: [] for t in teachers}
    for url in urls:
        for raw in iter_shard(url):
            image = decode_to_tensor(raw, torch.device("cpu"))
            boxes, flips = sample_views(policy, raw.key, image.shape[-1], image.shape[-2])
            for t in teachers:
                pre = t.preprocessing
                crops[t.spec.teacher_id] += [render_view(image, boxes[v], bool(flips[v]), pre.input_size,
                                                         pre.interpolation).to(device)
                                             for v in range(policy.num_views)]
    return crops


def run_bound(teachers, crops: dict[str, list[torch.Tensor]]) -> float:
    start = time.perf_counter()
    for t in teachers:
        views, pre, batch = crops[t.spec.teacher_id], t.preprocessing, t.spec.batch_size
        for i in range(0, len(views), batch):
            t(normalize(torch.stack(views[i:i + batch]), pre.mean, pre.std))
        if t.device.type == "cuda":
            torch.cuda.synchronize(t.device)
    return time.perf_counter() - start


def run_cache(urls: list[str], specs, config: CacheConfig, device: str, workdir: str) -> tuple[float, float, int]:
    """(end-to-end seconds, seconds the worker spent processing shards, store bytes)."""
    store = os.path.join(workdir, "cache.zarr")
    shutil.rmtree(store, ignore_errors=True)
    start = time.perf_counter()
    summary = run_cache_job(CacheJob(shards=urls, store=store, teachers=specs, config=config, random_init=True,
                                     num_workers=1, device=device), progress=False)
    seconds = time.perf_counter() - start
    if summary.failed:
        raise RuntimeError(f"cache job failed: {summary.failed}")
    return seconds, summary.samples / summary.worker_images_per_second, summary.bytes_on_disk


class _NaiveViews(torch.utils.data.IterableDataset):
    """WebDataset pipeline with torchvision's RandomResizedCrop + flip, as a training script would."""

    def __init__(self, urls, pre, seed):
        self.urls, self.pre, self.seed = urls, pre, seed

    def __iter__(self):
        import webdataset as wds
        from torchvision import transforms as T

        torch.manual_seed(self.seed)
        transform = T.Compose([T.RandomResizedCrop(self.pre.input_size, antialias=True), T.RandomHorizontalFlip(),
                               T.ToTensor(), T.Normalize(self.pre.mean, self.pre.std)])
        dataset = wds.WebDataset(self.urls, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg")
        for key, image in dataset:
            yield key, transform(image.convert("RGB"))


def run_naive(urls: list[str], teachers, views: int, k: int, workdir: str) -> float:
    out = os.path.join(workdir, "naive")
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    for t in teachers:
        os.makedirs(os.path.join(out, t.spec.teacher_id), exist_ok=True)
        for view in range(views):
            # Decoding in the main process: DataLoader workers would be forked from a process
            # that holds a Ray connection (which breaks it), and on 2 cores they compete with
            # the forward pass anyway, as the cache worker's own decoding does.
            loader = torch.utils.data.DataLoader(_NaiveViews(urls, t.preprocessing, view),
                                                 batch_size=t.spec.batch_size, num_workers=0)
            for keys, images in loader:
                logits, features = (out.cpu() for out in t(images))
                values, indices = logits.topk(k, dim=-1)
                lse = torch.logsumexp(logits, dim=-1)
                for i, key in enumerate(keys):
                    np.savez(os.path.join(out, t.spec.teacher_id, f"{key.replace('/', '_')}_{view}.npz"),
                             logits=values[i].half().numpy(), index=indices[i].numpy(), lse=lse[i].numpy(),
                             features=features[i].half().numpy())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", action="append",
                        help="teacher spec (repeatable); default: resnet18 and vit_tiny at 128 px")
    parser.add_argument("--shards", type=int, default=6, help="MNIST shards of 250 images to use")
    parser.add_argument("--views", type=int, default=2)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="1 round, 2 shards")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.shards = 1, 2
    torch.set_num_threads(args.threads)
    specs = [parse_teacher_spec(s) for s in (args.teacher or ["resnet18,img_size=128,batch_size=64",
                                                               "vit_tiny_patch16_224,img_size=128,batch_size=64"])]
    policy = ViewPolicy(num_views=args.views)
    config = CacheConfig(views=policy, topk=args.topk, temperatures=(1.0,))

    import ray

    workdir = tempfile.mkdtemp(prefix="bench_cache_")
    make_mnist_sample(os.path.join(workdir, "shards"), samples_per_shard=250, progress=False)
    urls = expand_shard_urls(os.path.join(workdir, "shards", "train.json"))[:args.shards]
    images = sum(1 for url in urls for _ in iter_shard(url))
    teachers = [load_teacher(spec, args.device, random_init=True, seed=policy.seed) for spec in specs]
    crops = render_all(urls, teachers, policy, torch.device(args.device))
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)

    times: dict[str, list[float]] = {"bound": [], "cache": [], "cache_steady": [], "naive": []}
    store_bytes = 0
    for round_index in range(args.rounds):
        times["bound"].append(run_bound(teachers, crops))
        seconds, steady, store_bytes = run_cache(urls, specs, config, args.device, workdir)
        times["cache"].append(seconds)
        times["cache_steady"].append(steady)
        times["naive"].append(run_naive(urls, teachers, args.views, args.topk, workdir))
        print(f"round {round_index}: " + ", ".join(f"{m} {v[-1]:.1f} s" for m, v in times.items()), flush=True)
    ray.shutdown()

    def ratio(reference: str, mode: str) -> float:
        """The throughput of ``mode`` over that of ``reference``: the median over rounds of their time ratio."""
        return statistics.median(r / m for r, m in zip(times[reference], times[mode]))

    result = {
        "benchmark": "cache-teachers throughput",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
                    "python": sys.version.split()[0], "torch": torch.__version__},
        "teachers": [str(s) for s in specs], "images": images, "views": args.views, "topk": args.topk,
        "rounds": args.rounds, "seconds": times,
        "median_images_per_second": {mode: images / statistics.median(v) for mode, v in times.items()},
        "cache_start_up_seconds": [e2e - steady for e2e, steady in zip(times["cache"], times["cache_steady"])],
        "cache_over_bound": ratio("bound", "cache"),
        "cache_steady_over_bound": ratio("bound", "cache_steady"),
        "cache_over_naive": ratio("naive", "cache"),
        "store_bytes": store_bytes,
    }
    print(json.dumps({k: result[k] for k in ("median_images_per_second", "cache_start_up_seconds", "cache_over_bound",
                                             "cache_steady_over_bound", "cache_over_naive")},
                     indent=2))
    out = args.out or os.path.join(RESULTS, f"cache-{args.device.replace('cuda', 'gpu')}"
                                            f"{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
