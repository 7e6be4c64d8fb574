"""Which Blosc shuffle compresses real teacher outputs best, and how many bytes a view costs.

Real outputs need trained teachers, and no ImageNet weights are available offline, so
this script trains two small teachers of different families (test_resnet, test_convnext
at 32 px) on the bundled MNIST sample for a few epochs, caches them with
``run_cache_job`` (V views, top-k, two temperatures, features for every view), then
re-encodes every cached array chunk by chunk with Blosc zstd under each shuffle
(none, byte, bit) and levels 3/5/9, and reports bytes per view per teacher.

The teachers have 10 classes, so top-10 holds every class and leaves nothing over
(``log_leftover`` is -inf throughout). A second store of the same teachers with top-5
(``--leftover-topk``) measures the fp32 leftover on real values; the budget line adds
its one-temperature column to the top-10 log-probabilities and indices:
top-10 + one temperature, as stored.

    python benchmarks/bench_store_compression.py            # ~4 min on 2 CPU cores

Caveat: with 10 classes the top-10 indices are a permutation of all classes; on a
1000-class teacher the indices are sparser and compress differently.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from numcodecs import Blosc  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from jobs.cache_teachers import CacheJob, run_cache_job  # noqa: E402
from pipeline.cache.store import CacheConfig, CacheStore  # noqa: E402
from pipeline.data.images import decode_sample  # noqa: E402
from pipeline.data.make_shards import make_mnist_sample  # noqa: E402
from pipeline.data.shards import expand_shard_urls, iter_shard  # noqa: E402
from pipeline.data.views import ViewPolicy, normalize, render_view, sample_views  # noqa: E402
from teachers import parse_teacher_spec  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
SHUFFLES = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
MEAN, STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)


def load_images(urls: list[str]) -> tuple[list[torch.Tensor], torch.Tensor, list[str]]:
    images, labels, keys = [], [], []
    for url in urls:
        for raw in iter_shard(url):
            images.append(decode_sample(raw))
            labels.append(raw.label)
            keys.append(raw.key)
    return images, torch.tensor(labels), keys


def train_teacher(name: str, images, labels, keys, out_dir: str, epochs: int, seed: int) -> str:
    """Train a 10-class teacher on random views; save model.safetensors + timm config.json."""
    torch.manual_seed(seed)
    model = timm.create_model(name, num_classes=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    policy = ViewPolicy(num_views=epochs, scale=(0.35, 1.0), seed=seed)
    model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(images))
        for start in range(0, len(order), 128):
            idx = order[start:start + 128].tolist()
            crops = []
            for i in idx:
                boxes, flips = sample_views(policy, keys[i], images[i].shape[-1], images[i].shape[-2])
                crops.append(render_view(images[i], boxes[epoch], False, (32, 32)))
            loss = torch.nn.functional.cross_entropy(model(normalize(torch.stack(crops), MEAN, STD)), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"  {name} epoch {epoch}: loss {loss.item():.3f}", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    save_file(model.state_dict(), os.path.join(out_dir, "model.safetensors"))
    cfg = {"input_size": [3, 32, 32], "interpolation": "bilinear", "mean": list(MEAN), "std": list(STD),
           "num_classes": 10}
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump({"architecture": name, "num_classes": 10, "pretrained_cfg": cfg}, f)
    return os.path.join(out_dir, "model.safetensors")


def encoded_bytes(array, codec: Blosc, columns: slice = slice(None)) -> tuple[int, float]:
    """Total encoded size of an array (its last axis cut to ``columns``), chunk by chunk as stored,
    and encode speed in MB/s."""
    rows = array.chunks[0]
    total, seconds, raw = 0, 0.0, 0
    for start in range(0, array.shape[0], rows):
        chunk = np.ascontiguousarray(array[start:start + rows][..., columns])
        t0 = time.perf_counter()
        total += len(codec.encode(chunk))
        seconds += time.perf_counter() - t0
        raw += chunk.nbytes
    return total, raw / seconds / 1e6


def codec_table(array, views: int, columns: slice = slice(None)) -> dict:
    """Bytes per view (``views`` = cached views of the array) under every shuffle and level, and the best."""
    raw = np.empty((1,) + array.shape[1:], array.dtype)[..., columns].nbytes * array.shape[0]
    table: dict = {"raw_bytes_per_view": raw / views}
    for shuffle, code in SHUFFLES.items():
        for level in (3, 5, 9):
            size, speed = encoded_bytes(array, Blosc(cname="zstd", clevel=level, shuffle=code), columns)
            table[f"{shuffle}/{level}"] = {"bytes_per_view": size / views, "encode_mb_s": speed}
    options = {k: v for k, v in table.items() if "/" in k}
    table["best"] = min(options, key=lambda k: options[k]["bytes_per_view"])
    return table


def cache(urls: list[str], specs, path: str, views: int, topk: int):
    config = CacheConfig(views=ViewPolicy(num_views=views), topk=topk, temperatures=(1.0, 4.0))
    summary = run_cache_job(CacheJob(shards=urls, store=path, teachers=specs, config=config), progress=False)
    return CacheStore.open(path), summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--leftover-topk", type=int, default=5, help="k of the second store (k < classes)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--shards", type=int, default=None,
                        help="use the first N shards of 500 samples (default: all 8)")
    parser.add_argument("--out", default=os.path.join(RESULTS, "store-compression.json"))
    args = parser.parse_args()

    import ray

    workdir = tempfile.mkdtemp(prefix="bench_compression_")
    make_mnist_sample(os.path.join(workdir, "shards"), samples_per_shard=500, progress=False)
    urls = expand_shard_urls(os.path.join(workdir, "shards", "train.json"))[:args.shards]
    images, labels, keys = load_images(urls)
    specs = []
    for seed, name in enumerate(("test_resnet", "test_convnext")):
        weights = train_teacher(name, images, labels, keys, os.path.join(workdir, name), args.epochs, seed)
        specs.append(parse_teacher_spec(f"{name}@{weights},batch_size=128"))

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    store, summary = cache(urls, specs, os.path.join(workdir, "cache.zarr"), args.views, args.topk)
    leftover_store, _ = cache(urls, specs, os.path.join(workdir, f"cache-top{args.leftover_topk}.zarr"), args.views,
                              args.leftover_topk)
    ray.shutdown()
    valid = int(store.group["samples/valid"][:].sum())
    one_temperature = slice(0, 1)

    results: dict = {"samples": valid, "views": args.views, "topk": args.topk, "leftover_topk": args.leftover_topk,
                     "teachers": {}, "budget": {}}
    for tid in store.teacher_ids:
        group, per_array = store.teacher(tid), {}
        for name in ("topk_logprob", "topk_index", "log_leftover", "features"):
            per_array[name] = codec_table(group[name], valid * group[name].shape[1])
        leftover = leftover_store.teacher(tid)["log_leftover"]
        per_array[f"log_leftover (top-{args.leftover_topk})"] = codec_table(leftover, valid * args.views)
        per_array[f"log_leftover (top-{args.leftover_topk}, T=1 only)"] = codec_table(
            leftover, valid * args.views, one_temperature)
        results["teachers"][tid] = per_array
        stored = {name: per_array[name]["shuffle/5"]["bytes_per_view"] for name in ("topk_logprob", "topk_index")}
        stored["log_leftover_one_temperature"] = \
            per_array[f"log_leftover (top-{args.leftover_topk}, T=1 only)"]["shuffle/5"]["bytes_per_view"]
        results["budget"][tid] = {**stored, "total": sum(stored.values())}
        print(f"{tid}:")
        for name, r in per_array.items():
            row = "  ".join(f"{s}:{r[f'{s}/5']['bytes_per_view']:.1f}" for s in SHUFFLES)
            print(f"  {name:32s} raw {r['raw_bytes_per_view']:.1f} B/view  level 5: {row}  best {r['best']}")
        print(f"  top-{args.topk} + one temperature, as stored (byte shuffle, level 5): "
              f"{results['budget'][tid]['total']:.1f} B/view")
    results["store_summary"] = {"bytes_per_view": summary.bytes_per_view,
                                "feature_bytes_per_view": summary.feature_bytes_per_view}
    print("as stored now (top-k + two temperatures):", json.dumps(results["store_summary"]))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
