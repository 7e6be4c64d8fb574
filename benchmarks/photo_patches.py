"""A small real-image classification dataset from the photos inside the scikit-image wheel.

Each class is one photo or texture (brick, grass, gravel, the cameraman, cells, the moon,
the astronaut, coffee, the Hubble deep field, an IHC stain, a motorcycle, a retina); each
sample is a square patch of it (10-25% of the photo's shorter side) resized to 40x40 px and
saved as a JPEG. Train patches come from the left 70% of each photo and val patches from the
right 30%, so no val pixel is ever seen in training. Classes differ in colour for some photos
and only in texture for the grey ones, and many patches are ambiguous (flat sky, dark
background), so teachers are confident but not always right: a harder, less saturated task
than MNIST digits. The files are read without importing scikit-image
(``pip install --no-deps scikit-image==0.26.0``).

    python benchmarks/photo_patches.py --out /tmp/patches      # train/ and val/, ImageNet layout
    pipeline make-shards --from-folder /tmp/patches/train --out shards --split-name train
    pipeline make-shards --from-folder /tmp/patches/val --out shards --split-name val
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from PIL import Image

from imagenet_like import save_jpeg, skimage_data_folder

CLASSES = ("brick.png", "grass.png", "gravel.png", "camera.png", "cell.png", "moon.png", "astronaut.png",
           "coffee.png", "hubble_deep_field.jpg", "ihc.png", "motorcycle_left.png", "retina.jpg")
PATCH_PX = 40
TRAIN_SHARE = 0.7  # of each photo's width: train patches left of it, val patches right of it


def cut_patch(photo: Image.Image, split: str, rng: np.random.Generator) -> Image.Image:
    side = rng.uniform(0.10, 0.25) * min(photo.size)
    lo, hi = (0.0, TRAIN_SHARE * photo.width) if split == "train" else (TRAIN_SHARE * photo.width, photo.width)
    left = rng.uniform(lo, hi - side)
    top = rng.uniform(0, photo.height - side)
    return photo.resize((PATCH_PX, PATCH_PX), Image.LANCZOS, box=(left, top, left + side, top + side))


def make_patch_folders(out: str, train_per_class: int = 200, val_per_class: int = 60, seed: int = 0) -> list[str]:
    """Write ``out/train/CLASS/*.jpg`` and ``out/val/CLASS/*.jpg``; return the two folders."""
    folder = skimage_data_folder()
    folders = []
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for index, name in enumerate(CLASSES):
            photo = Image.open(os.path.join(folder, name)).convert("RGB")
            rng = np.random.default_rng([seed, index, split == "val"])
            class_dir = os.path.join(out, split, os.path.splitext(name)[0])
            for i in range(count):
                save_jpeg(os.path.join(class_dir, f"{i:05d}.jpg"), cut_patch(photo, split, rng))
        folders.append(os.path.join(out, split))
    return folders


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-per-class", type=int, default=200)
    parser.add_argument("--val-per-class", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for folder in make_patch_folders(args.out, args.train_per_class, args.val_per_class, args.seed):
        print(f"{sum(len(files) for _, _, files in os.walk(folder))} patches in {folder}")


if __name__ == "__main__":
    main()
