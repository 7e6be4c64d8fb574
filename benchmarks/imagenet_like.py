"""ImageNet-shaped JPEGs for benchmarks: natural photos, 500x375 or 375x500, quality 90.

The photos are the colour photographs shipped inside the scikit-image wheel (astronaut, coffee,
rocket, motorcycle, ...), read as files without importing scikit-image, so it can be installed
with ``pip install --no-deps scikit-image==0.26.0``. Each image is a random crop of a random
photo (40-100% of the largest crop of the target aspect), flipped at random, resized with
Lanczos to ImageNet's most common sizes (3 in 4 landscape 500x375, else portrait 375x500), given
a mild brightness/colour jitter, and encoded at JPEG quality 90. Decoding cost and file size are
therefore those of real photos (about 50-110 KB), not of upscaled digits.

    python benchmarks/imagenet_like.py --out /tmp/inet --images 2000 --classes 10
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import os

import numpy as np
from PIL import Image, ImageEnhance

from pipeline.data import storage

PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "ihc.png",
          "motorcycle_left.png", "motorcycle_right.png", "retina.jpg", "rocket.jpg")
SKIMAGE_INSTALL = "pip install --no-deps scikit-image==0.26.0"
LANDSCAPE, PORTRAIT = (500, 375), (375, 500)
QUALITY = 90


def skimage_data_folder() -> str:
    """The folder of photos inside the installed scikit-image wheel (found without importing it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"this benchmark data needs the scikit-image wheel's photos: {SKIMAGE_INSTALL}")
    return os.path.join(spec.submodule_search_locations[0], "data")


def load_photos() -> list[Image.Image]:
    """The colour photos shipped in the scikit-image wheel, as RGB PIL images."""
    folder = skimage_data_folder()
    return [Image.open(os.path.join(folder, name)).convert("RGB") for name in PHOTOS]


def render_image(photos: list[Image.Image], rng: np.random.Generator) -> Image.Image:
    """One ImageNet-shaped image: a jittered random crop of a random photo."""
    photo = photos[int(rng.integers(len(photos)))]
    width, height = LANDSCAPE if rng.random() < 0.75 else PORTRAIT
    aspect = width / height
    crop_w = min(photo.width, photo.height * aspect)
    scale = np.sqrt(rng.uniform(0.4, 1.0))
    crop_w, crop_h = crop_w * scale, crop_w * scale / aspect
    left = rng.uniform(0, photo.width - crop_w)
    top = rng.uniform(0, photo.height - crop_h)
    image = photo.resize((width, height), Image.LANCZOS, box=(left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.8, 1.2))
    return ImageEnhance.Color(image).enhance(rng.uniform(0.7, 1.3))


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=QUALITY)
    return buffer.getvalue()


def save_jpeg(path: str, image: Image.Image) -> None:
    """``image`` as a JPEG file, written whole (its folder made as needed)."""
    storage.write_bytes(path, jpeg_bytes(image))


def make_imagenet_like_folder(out: str, num_images: int, num_classes: int = 10, seed: int = 0) -> str:
    """An ImageNet-layout folder (``out/nXXXXXXXX/img_NNNNNN.JPEG``) of ``num_images`` JPEGs; returns ``out``.

    Classes are assigned round-robin, so they carry no signal: this data is for speed and memory
    measurements only. Existing files of the same name are kept (the output is deterministic).
    """
    rng = np.random.default_rng(seed)
    photos = load_photos()
    for i in range(num_images):
        image = render_image(photos, rng)  # drawn even when the file exists, so later images stay the same
        class_dir = os.path.join(out, f"n{i % num_classes:08d}")
        path = os.path.join(class_dir, f"img_{i:06d}.JPEG")
        if not os.path.exists(path):
            save_jpeg(path, image)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_imagenet_like_folder(args.out, args.images, args.classes, args.seed)
    sizes = [os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(args.out) for f in files]
    print(f"{len(sizes)} JPEGs in {args.out}, mean {np.mean(sizes) / 1024:.1f} KB")


if __name__ == "__main__":
    main()
