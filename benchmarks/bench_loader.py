"""The student loader on ImageNet-shaped data: throughput against a plain loader, memory, shard mixing, stalls.

Data: ImageNet-shaped JPEGs (benchmarks/imagenet_like.py: natural photos, 500x375 / 375x500,
quality 90) packed by ``make-shards`` into shards of ``--samples-per-shard`` (1250 by default,
ImageNet's 1024-shard layout), cached with V views by a tiny random teacher (the targets' values
do not matter here, their joining does). Modes, measured side by side in interleaved rounds, all
at 224 px, ``--loader-workers`` loader processes of one thread each:

- plain:  webdataset + torch DataLoader, PIL decode, RandomResizedCrop + flip + PILToTensor, a
          2048-sample shuffle buffer (what a training script would write; no teacher targets);
- stream: ``StudentStream`` with the store's views replayed and the teacher's targets joined;
- stream x2: the same with ``crops_per_image=2`` (examples per second, two per decoded image).

Also recorded: distinct shards per batch, peak RSS of each loader process and of the main
process, and the stall fraction of a real training step (regla_t at 224 px on this CPU, the
loader sharing its cores) as the trainer measures it (time waiting for a batch / step time).

    pip install --no-deps scikit-image==0.26.0      # the photos
    python benchmarks/bench_loader.py                # ~15 min on 2 CPU cores
    python benchmarks/bench_loader.py --quick        # 2 shards of 250, 1 round
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from imagenet_like import make_imagenet_like_folder  # noqa: E402

from pipeline.cache.shard_cacher import ShardCacher  # noqa: E402
from pipeline.cache.store import CacheConfig, CacheStore  # noqa: E402
from pipeline.data.make_shards import make_shards_from_folder  # noqa: E402
from pipeline.data.shards import index_dataset  # noqa: E402
from pipeline.data.views import ViewPolicy  # noqa: E402
from pipeline.train.student_data import StreamConfig, StudentInput, StudentStream  # noqa: E402
from teachers import load_teacher, parse_teacher_spec  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
TEACHER = "test_resnet,img_size=32,batch_size=256"
SIZE = 224


def _status_kb(pid: int, field: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration):
        return 0


def _descendants(pid: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


class PeakRss:
    """Peak resident memory of this process (sampled) and of each child process (its VmHWM), in bytes."""

    def __init__(self):
        self.main = 0
        self.children: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(0.1):
            self.main = max(self.main, _status_kb(me, "VmRSS") * 1024)
            for child in _descendants(me):
                self.children[child] = max(self.children.get(child, 0), _status_kb(child, "VmHWM") * 1024)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def build_data(workdir: str, images: int, per_shard: int, views: int) -> tuple[str, str]:
    """(train manifest, store path): ImageNet-shaped shards cached by a tiny teacher."""
    folder = make_imagenet_like_folder(os.path.join(workdir, "images"), images, num_classes=10)
    manifest = make_shards_from_folder(folder, os.path.join(workdir, "shards"), per_shard, progress=False)
    dataset = index_dataset(manifest)
    store_path = os.path.join(workdir, "cache.zarr")
    store = CacheStore.open_or_create(store_path, dataset, CacheConfig(views=ViewPolicy(num_views=views), topk=10))
    spec = parse_teacher_spec(TEACHER)
    teacher = load_teacher(spec, random_init=True)
    store.add_teacher(spec.teacher_id, teacher.record(), teacher.num_classes, teacher.feature_dim, False)
    cacher = ShardCacher(store, {spec.teacher_id: teacher}, decode_workers=os.cpu_count() or 1)
    done = store.teacher_done(spec.teacher_id)
    for shard, info in enumerate(dataset.shards):
        if not done[shard]:
            cacher.process(shard, info.url, [spec.teacher_id], info.keys_sha256)
    return manifest, store_path


class _PlainTransform:
    """RandomResizedCrop + flip + PILToTensor on a PIL image (a class: DataLoader workers pickle it)."""

    def __init__(self):
        from torchvision import transforms as T

        self.transform = T.Compose([T.RandomResizedCrop(SIZE, antialias=True), T.RandomHorizontalFlip(),
                                    T.PILToTensor()])

    def __call__(self, image):
        return self.transform(image.convert("RGB"))


def _plain_loader(urls: list[str], batch_size: int, workers: int, seed: int):
    import webdataset as wds

    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), seed=seed, empty_check=False)
               .shuffle(2048, rng=random.Random(seed)).decode("pil").to_tuple("jpg", "cls")
               .map_tuple(_PlainTransform(), int))
    # Forked, persistent workers: what a training script gets from DataLoader on Linux.
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                                       persistent_workers=workers > 0)


def _epochs(epoch_batches, close=None, epochs: int = 2) -> dict:
    """Examples/s of a first epoch (start-up included) and a second one (loaders running), and peak RSS.

    ``epoch_batches(e)`` yields (examples, distinct shards or None) per batch of epoch e.
    """
    with PeakRss() as rss:
        rates, shards = [], []
        for epoch in range(epochs):
            start = time.perf_counter()
            examples = 0
            for count, distinct in epoch_batches(epoch):
                examples += count
                if distinct is not None:
                    shards.append(distinct)
            rates.append(examples / (time.perf_counter() - start))
        if close is not None:
            close()
    result = {"first_epoch_examples_per_s": rates[0], "examples_per_s": rates[-1],
              "peak_rss_main_mb": rss.main / 2**20, "peak_rss_loader_mb": max(rss.children.values(), default=0) / 2**20}
    if shards:
        result |= {"shards_per_batch_mean": float(np.mean(shards)), "shards_per_batch_min": int(min(shards))}
    return result


def run_plain(urls: list[str], batch_size: int, workers: int) -> dict:
    loader = _plain_loader(urls, batch_size, workers, seed=0)
    return _epochs(lambda epoch: ((len(labels), None) for _, labels in loader))


def _stream(manifest: str, store: str, batch_size: int, workers: int, crops: int) -> StudentStream:
    config = StreamConfig(batch_size=batch_size, crops_per_image=crops, loader_workers=workers,
                          teacher_ids=(parse_teacher_spec(TEACHER).teacher_id,), features=False)
    return StudentStream(index_dataset(manifest), store, StudentInput(size=(SIZE, SIZE)), config)


def run_stream(manifest: str, store: str, batch_size: int, workers: int, crops: int) -> dict:
    stream = _stream(manifest, store, batch_size, workers, crops)
    rows = stream.dataset.rows_per_shard
    result = _epochs(lambda epoch: ((len(b), len(set((b.rows // rows).tolist()))) for b in stream.iter_epoch(epoch)),
                     close=stream.close)
    return result | {"pool_peak_examples": stream._pool.peak}


def plain_shards_per_batch(urls: list[str], batch_size: int, keys_to_shard: dict[str, int]) -> list[int]:
    """Distinct shards per batch of the plain loader (keys mapped back to their shards)."""
    import webdataset as wds

    dataset = (wds.WebDataset(urls, shardshuffle=len(urls), seed=0, empty_check=False)
               .shuffle(2048, rng=random.Random(0)).to_tuple("__key__"))
    keys = [key for (key,) in dataset]
    return [len({keys_to_shard[k] for k in keys[i:i + batch_size]}) for i in range(0, len(keys), batch_size)]


def training_stall(manifest: str, store: str, batch_size: int, workers: int, steps: int) -> dict:
    """Waiting share of real regla_t steps at 224 px (CPU), the loader running beside them."""
    import timm

    import regla  # noqa: F401

    model = timm.create_model("regla_t", num_classes=10).to(memory_format=torch.channels_last).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) * 255
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255
    waited = stepped = 0.0
    with _stream(manifest, store, batch_size, workers, 1) as stream:
        batches = stream.iter_epoch(0)
        for step in range(steps + 1):
            started = time.perf_counter()
            batch = next(batches)
            wait = time.perf_counter() - started
            started = time.perf_counter()
            images = ((batch.images.float() - mean) / std).contiguous(memory_format=torch.channels_last)
            loss = torch.nn.functional.cross_entropy(model(images), batch.labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step:  # the first batch includes the loader's start-up
                waited, stepped = waited + wait, stepped + time.perf_counter() - started
        batches.close()
    return {"steps": steps, "batch_size": batch_size, "wait_seconds": waited, "step_seconds": stepped,
            "stall_fraction": waited / (waited + stepped)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--samples-per-shard", type=int, default=1250)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--loader-workers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=8)
    parser.add_argument("--workdir", help="reuse data built here by an earlier run")
    parser.add_argument("--quick", action="store_true", help="500 images in 2 shards, 1 round")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.quick:
        args.images, args.samples_per_shard, args.rounds, args.train_steps = 500, 250, 1, 3
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_loader_")
    started = time.perf_counter()
    manifest, store = build_data(workdir, args.images, args.samples_per_shard, args.views)
    print(f"data ready in {time.perf_counter() - started:.0f} s: {workdir}", flush=True)
    dataset = index_dataset(manifest)
    urls = [s.url for s in dataset.shards]

    runs: dict[str, list[dict]] = {"plain": [], "stream": [], "stream_x2": []}
    for round_index in range(args.rounds):
        runs["plain"].append(run_plain(urls, args.batch_size, args.loader_workers))
        runs["stream"].append(run_stream(manifest, store, args.batch_size, args.loader_workers, 1))
        runs["stream_x2"].append(run_stream(manifest, store, args.batch_size, args.loader_workers, 2))
        print(f"round {round_index}: " + ", ".join(f"{m} {r[-1]['examples_per_s']:.0f}/s" for m, r in runs.items()),
              flush=True)

    def ratio(mode: str, key: str = "examples_per_s") -> dict:
        values = [runs[mode][i][key] / runs["plain"][i][key] for i in range(args.rounds)]
        return {"median": statistics.median(values), "min": min(values), "max": max(values), "rounds": values}

    store_keys = CacheStore.open(store).group["samples/key"][:]
    keys_to_shard = {str(k): i // dataset.rows_per_shard for i, k in enumerate(store_keys) if k}
    plain_mix = plain_shards_per_batch(urls, args.batch_size, keys_to_shard)
    stall = training_stall(manifest, store, 32, args.loader_workers, args.train_steps)
    result = {
        "benchmark": "student loader",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "torch": torch.__version__, "cpu": platform.processor()},
        "images": args.images, "samples_per_shard": args.samples_per_shard, "img_size": SIZE,
        "batch_size": args.batch_size, "loader_workers": args.loader_workers, "rounds": args.rounds,
        "runs": runs,
        "median_examples_per_s": {m: statistics.median(r["examples_per_s"] for r in v) for m, v in runs.items()},
        "median_first_epoch_examples_per_s": {m: statistics.median(r["first_epoch_examples_per_s"] for r in v)
                                              for m, v in runs.items()},
        "stream_over_plain": ratio("stream"), "stream_x2_over_plain": ratio("stream_x2"),
        "first_epoch_stream_over_plain": ratio("stream", "first_epoch_examples_per_s"),
        "shards_per_batch_mean": {"plain": float(np.mean(plain_mix)),
                                  "stream": statistics.median(r["shards_per_batch_mean"] for r in runs["stream"])},
        "peak_rss_loader_mb": {m: max(r["peak_rss_loader_mb"] for r in v) for m, v in runs.items()},
        "peak_rss_main_mb": {m: max(r["peak_rss_main_mb"] for r in v) for m, v in runs.items()},
        "training_stall": stall,
    }
    print(json.dumps({k: v for k, v in result.items() if k not in ("runs", "machine")}, indent=2))
    out = args.out or os.path.join(RESULTS, f"loader-cpu{'-quick' if args.quick else ''}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
