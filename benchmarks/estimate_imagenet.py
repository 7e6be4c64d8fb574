"""Worked estimate for caching ImageNet-1k on a GPU cluster: store bytes, GPU-hours, decode cores per GPU.

Every input is either measured here (bytes per view, CPU decode rate; read from
benchmarks/results/) or cited (teacher throughput on a GPU, from timm's published
benchmark CSV). The arithmetic is printed and saved to
benchmarks/results/estimate-imagenet.json; docs/cluster.md quotes it.

    python benchmarks/estimate_imagenet.py [--views 8] [--feature-views 2]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
IMAGENET_TRAIN_IMAGES = 1_281_167

# Cited: timm results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv (huggingface/pytorch-image-models,
# commit 5c33776), batch 1024, 224 px, AMP, NCHW, RTX 4090. An H100 is faster; these are conservative.
TEACHERS = {
    "convnext_base": {"images_per_second": 2095.37, "feature_dim": 1024},
    "vit_base_patch16_224": {"images_per_second": 2787.15, "feature_dim": 768},
}
SOURCE = ("timm results/benchmark-infer-amp-nchw-pt240-cu124-rtx4090.csv "
          "(huggingface/pytorch-image-models@5c33776), batch 1024, AMP, RTX 4090")


def estimate(views: int, feature_views: int, topk: int) -> dict:
    compression = json.loads((RESULTS / "store-compression.json").read_text())
    measured = [b["total"] for b in compression["budget"].values()]  # top-10 + one leftover, 10 classes
    raw_topk = topk * 2 + topk * 2 + 4  # fp16 log-probs + int16 indices + one fp32 leftover
    cache = json.loads((RESULTS / "cache-cpu.json").read_text())
    decode_two_views = cache["decode_per_core"]["median"]  # images/s per core: decode + two 224-px views
    # Rendering a view costs less than decoding the JPEG, so V views take at most V/2 times the
    # decode-plus-two-views time: a lower bound on the per-core rate.
    decode_rate_floor = decode_two_views * 2 / max(views, 2)

    n = IMAGENET_TRAIN_IMAGES
    view_rows = n * views
    gpu_seconds_per_image = sum(views / t["images_per_second"] for t in TEACHERS.values())
    gpu_images_per_second = 1 / gpu_seconds_per_image
    return {
        "images": n, "views": views, "feature_views": feature_views, "topk": topk,
        "teachers": TEACHERS, "teacher_rate_source": SOURCE,
        "store_bytes": {
            "topk_per_teacher_low": min(measured) * view_rows,
            "topk_per_teacher_high": raw_topk * view_rows,
            "topk_bytes_per_view_measured_10_classes": measured,
            "topk_bytes_per_view_raw": raw_topk,
            "features": {name: 2 * t["feature_dim"] * n * feature_views for name, t in TEACHERS.items()},
            "views_table": (4 * 4 + 1) * view_rows,  # box float32 x 4 + flip bool, before compression
        },
        "gpu_hours": {name: n * views / t["images_per_second"] / 3600 for name, t in TEACHERS.items()},
        "gpu_images_per_second_all_teachers": gpu_images_per_second,
        "decode_images_per_second_per_core_floor": decode_rate_floor,
        "decode_cores_per_gpu_ceiling": gpu_images_per_second / decode_rate_floor,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--feature-views", type=int, default=2)
    parser.add_argument("--topk", type=int, default=10)
    parser.add_argument("--out", type=Path, default=RESULTS / "estimate-imagenet.json")
    args = parser.parse_args()
    result = estimate(args.views, args.feature_views, args.topk)
    store = result["store_bytes"]
    gb = 1e9
    print(f"ImageNet-1k train: {result['images']:,} images x {result['views']} views, "
          f"{len(TEACHERS)} teachers ({', '.join(TEACHERS)})")
    print(f"top-{result['topk']} + leftover, per teacher: {store['topk_per_teacher_low'] / gb:.2f}-"
          f"{store['topk_per_teacher_high'] / gb:.2f} GB")
    for name, size in store["features"].items():
        print(f"features of {name} on {result['feature_views']} views: {size / gb:.2f} GB")
    print(f"views table: {store['views_table'] / gb:.2f} GB before compression")
    for name, hours in result["gpu_hours"].items():
        print(f"{name}: {hours:.2f} GPU-hours")
    print(f"one GPU runs both teachers at {result['gpu_images_per_second_all_teachers']:.0f} images/s; "
          f"decoding needs at most {result['decode_cores_per_gpu_ceiling']:.2f} CPU cores per GPU")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
