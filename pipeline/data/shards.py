"""Sharded image datasets: shard lists, manifests, the dataset index, tar reading, image decoding.

A dataset is a list of WebDataset tar shards in ImageNet layout: each sample is a run of
consecutive tar members sharing a key (``n01440764/img001.jpg``, ``n01440764/img001.cls``).
Shards are named by a brace pattern, a directory, a list, or a manifest (``OUT/{split}.json``,
written by ``pipeline make-shards``) that also records per-shard counts and key hashes, so a
dataset can be indexed without reading its tars. Local paths and fsspec URLs both work.

The index fixes the row layout of the teacher cache: shard i, position j is row ``i * C + j``
with ``C = rows_per_shard``; its fingerprint is what every cache reader checks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO, Iterator, Sequence

import fsspec
import numpy as np
from braceexpand import braceexpand
from PIL import Image

from pipeline.data.storage import check_location

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTS = ("cls", "cls.txt")
MANIFEST_FORMAT = "regla-distill-shards/1"

_KNOWN_EXTS = frozenset(IMAGE_EXTS + LABEL_EXTS)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class DatasetError(ValueError):
    """Shards or manifests that cannot be used; the message names the shard, file or key."""


class ImageDecodeError(ValueError):
    """One sample's image cannot be decoded; the message says why."""


@dataclass(frozen=True)
class ShardInfo:
    url: str  # absolute local path, or the fsspec URL as given
    name: str  # basename, e.g. "train-000000.tar"
    num_samples: int
    keys_sha256: str  # hash_keys() of the shard's keys in tar order


@dataclass(frozen=True)
class DatasetIndex:
    shards: tuple[ShardInfo, ...]
    class_names: tuple[str, ...] | None = None

    @property
    def rows_per_shard(self) -> int:
        """C: every shard owns C rows of the cache, so rows of different shards never share a chunk."""
        return max([1] + [s.num_samples for s in self.shards])

    @property
    def num_rows(self) -> int:
        return len(self.shards) * self.rows_per_shard

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def fingerprint(self) -> dict:
        """JSON-able identity of the dataset: shard names, counts and a hash of all keys."""
        joined = "\n".join(s.keys_sha256 for s in self.shards)
        return {
            "shards": [s.name for s in self.shards],
            "counts": [s.num_samples for s in self.shards],
            "keys_sha256": hashlib.sha256(joined.encode()).hexdigest(),
        }


@dataclass(frozen=True)
class RawSample:
    key: str
    label: int | None  # None when there is no label member or it is not a class index
    image_bytes: bytes | None  # None when there is no image member
    image_ext: str | None  # e.g. "jpg", "png"


def hash_keys(keys: Sequence[str]) -> str:
    """sha256 hex of the keys joined by newlines: the ``keys_sha256`` of a shard."""
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


@contextmanager
def open_url(url: str, mode: str = "rb") -> Iterator[IO]:
    """Open a local path or an fsspec URL (anything containing ``://``)."""
    if "://" in url:
        with fsspec.open(url, mode) as f:
            yield f
    else:
        with open(url, mode) as f:
            yield f


# ---------------------------------------------------------------------------- shard lists


def expand_shard_urls(spec: str | Sequence[str]) -> list[str]:
    """Resolve a shard spec to shard locations, in order.

    ``spec`` is a string (entries separated by commas outside braces) or a list of entries.
    Each entry is a brace pattern, a glob, a directory (its ``*.tar``, sorted), a manifest
    ``.json`` or a file. Local paths become absolute; fsspec URLs are kept as given.
    """
    urls = [url for entry in shard_spec_entries(spec) for url in _expand_entry(entry)]
    if not urls:
        raise DatasetError(f"no shards in {spec!r}")
    return urls


def shard_spec_entries(spec: str | Sequence[str]) -> list[str]:
    """The entries of a shard spec (commas inside brace patterns kept), before any expansion."""
    entries = _split_outside_braces(spec) if isinstance(spec, str) else list(spec)
    # Shard locations are recorded in stores and printed: a URL carrying credentials is refused.
    return [check_location(e.strip()) for e in entries if e.strip()]


def _split_outside_braces(text: str) -> list[str]:
    """Split on commas, except those inside ``{a,b}`` alternatives of a brace pattern."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(text):
        depth += {"{": 1, "}": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    return parts + [text[start:]]


def _expand_entry(entry: str) -> list[str]:
    return [url for pattern in braceexpand(entry) for url in _expand_location(pattern)]


def _expand_location(location: str) -> list[str]:
    is_url = "://" in location
    if not is_url:
        location = os.path.abspath(os.path.expanduser(location))
    fs, path = fsspec.core.url_to_fs(location)

    def as_location(found: str) -> str:
        return fs.unstrip_protocol(found) if is_url else found

    if any(c in path for c in "*?["):
        found = fs.glob(path, detail=True)
        files = sorted(p for p, info in found.items() if info["type"] == "file")
        if not files:
            raise DatasetError(f"no files match {location}")
        return [as_location(p) for p in files]
    if fs.isdir(path):
        tars = sorted(fs.glob(path.rstrip("/") + "/*.tar"))
        if not tars:
            raise DatasetError(f"no .tar shards in directory {location}")
        return [as_location(p) for p in tars]
    if not fs.exists(path):
        raise DatasetError(f"shard path does not exist: {location}")
    if _is_manifest(location):
        return [url for url, _ in _manifest_shards(location, read_manifest(location))]
    return [location]


def _is_manifest(location: str) -> bool:
    return location.lower().endswith(".json")


def _shard_name(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


# ---------------------------------------------------------------------------- manifests


def read_manifest(path: str) -> dict:
    """Load and validate a shard manifest (``OUT/{split}.json``)."""
    try:
        with open_url(path, "rb") as f:
            manifest = json.loads(f.read())
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read manifest {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DatasetError(f"{path} is not a shard manifest (expected format {MANIFEST_FORMAT!r})")
    shards = manifest.get("shards")
    fields = {"name": str, "num_samples": int, "keys_sha256": str}
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and all(isinstance(s.get(k), t) for k, t in fields.items()) for s in shards
    ):
        raise DatasetError(f"manifest {path}: 'shards' must be a list of {{name, num_samples, keys_sha256}}")
    total = sum(s["num_samples"] for s in shards)
    if manifest.get("num_samples") != total:
        raise DatasetError(
            f"manifest {path}: num_samples is {manifest.get('num_samples')} but its shards hold {total}")
    class_names = manifest.get("class_names")
    if class_names is not None and not (
            isinstance(class_names, list) and all(isinstance(c, str) for c in class_names)):
        raise DatasetError(f"manifest {path}: class_names must be a list of strings or null")
    return manifest


def write_manifest(path: str, split: str, shards: Sequence[ShardInfo],
                   class_names: Sequence[str] | None) -> None:
    """Write ``path`` listing the shards by name (they live in the manifest's directory)."""
    manifest = {
        "format": MANIFEST_FORMAT,
        "split": split,
        "num_samples": sum(s.num_samples for s in shards),
        "class_names": list(class_names) if class_names is not None else None,
        "shards": [{"name": s.name, "num_samples": s.num_samples, "keys_sha256": s.keys_sha256}
                   for s in shards],
    }
    with open_url(path, "w") as f:
        f.write(json.dumps(manifest, indent=2) + "\n")


def _manifest_shards(path: str, manifest: dict) -> list[tuple[str, dict]]:
    """(location, entry) per listed shard; every shard must exist."""
    base = path.rsplit("/", 1)[0]
    fs, _ = fsspec.core.url_to_fs(path)
    shards = []
    for entry in manifest["shards"]:
        url = f"{base}/{entry['name']}"
        if not fs.exists(url):
            raise DatasetError(f"manifest {path} lists shard {entry['name']}, which does not exist ({url})")
        shards.append((url, entry))
    return shards


# ---------------------------------------------------------------------------- the index


def index_dataset(spec: str | Sequence[str]) -> DatasetIndex:
    """Index a dataset: per shard its count and key hash, in order.

    A manifest spec is read as is (its shards must exist); anything else is indexed by
    reading every tar's member headers. Keys must be unique across the whole dataset.
    """
    entries = shard_spec_entries(spec)
    if len(entries) == 1 and _is_manifest(entries[0]):
        return _index_from_manifest(entries[0])
    return _index_by_scan(expand_shard_urls(spec))


def _index_from_manifest(path: str) -> DatasetIndex:
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
    manifest = read_manifest(path)
    shards = tuple(ShardInfo(url=url, name=_shard_name(url), num_samples=entry["num_samples"],
                             keys_sha256=entry["keys_sha256"])
                   for url, entry in _manifest_shards(path, manifest))
    class_names = manifest["class_names"]
    return _checked_index(shards, tuple(class_names) if class_names is not None else None, path)


def _index_by_scan(urls: list[str]) -> DatasetIndex:
    shard_of_key: dict[str, str] = {}
    shards = []
    for url in urls:
        keys = [key for key, _ in _iter_groups(url, read_data=False)]
        for key in keys:
            if key in shard_of_key:
                raise DatasetError(f"duplicate sample key {key!r}: in {shard_of_key[key]} and in {url}")
            shard_of_key[key] = url
        shards.append(ShardInfo(url=url, name=_shard_name(url), num_samples=len(keys),
                                keys_sha256=hash_keys(keys)))
    return _checked_index(tuple(shards), None, ", ".join(urls))


def _checked_index(shards: tuple[ShardInfo, ...], class_names: tuple[str, ...] | None,
                   source: str) -> DatasetIndex:
    index = DatasetIndex(shards=shards, class_names=class_names)
    if index.num_samples == 0:
        raise DatasetError(f"dataset has no samples: {source}")
    for shard in shards:
        if shard.num_samples == 0:
            warnings.warn(f"shard {shard.url} has no samples; it keeps its place but owns no rows",
                          stacklevel=4)
    return index


# ---------------------------------------------------------------------------- tar reading


def iter_shard(url: str) -> Iterator[RawSample]:
    """Stream one shard's samples in tar order (one pass, so it works on any fsspec URL)."""
    for key, members in _iter_groups(url, read_data=True):
        image_ext = next((ext for ext in IMAGE_EXTS if ext in members), None)
        label_ext = next((ext for ext in LABEL_EXTS if ext in members), None)
        yield RawSample(
            key=key,
            label=_parse_label(members[label_ext]) if label_ext else None,
            image_bytes=members[image_ext] if image_ext else None,
            image_ext=image_ext,
        )


def _parse_label(data: bytes) -> int | None:
    """A class index from decimal text or a JSON int; None for anything else.

    Negative values are read as None: -1 is the usual mark of an unlabelled sample.
    """
    try:
        text = data.decode("utf-8").strip()
        value = int(text) if text.isdigit() else json.loads(text)
    except ValueError:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _split_member_name(name: str) -> tuple[str, str] | None:
    """(key, ext) of a tar member, WebDataset style; None for members that are not sample parts.

    The key is the path up to the first dot of the basename (directories may contain dots);
    the ext is the rest, lowercased. Hidden files and ``__meta__``-style members are skipped.
    """
    cut = name.rfind("/") + 1
    base = name[cut:]
    if base.startswith((".", "__")) or "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return name[:cut] + stem, ext.lower()


class _EndAwareTarInfo(tarfile.TarInfo):
    """Records on its TarFile whether the end-of-archive block was read.

    tarfile ends iteration silently when the data stops at a member boundary, which is how
    a shard whose writer died usually looks; the missing end block is what tells.
    """

    @classmethod
    def fromtarfile(cls, tar: tarfile.TarFile) -> tarfile.TarInfo:
        try:
            return super().fromtarfile(tar)
        except tarfile.EOFHeaderError:
            tar.reached_end_block = True
            raise


def _iter_groups(url: str, read_data: bool) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """(key, {ext: data}) per sample, in tar order; data is None unless ``read_data``.

    Without data, the tar is opened for random access so only member headers are read.
    This is tarfile directly rather than webdataset's ``tar_file_iterator``/``group_by_keys``
    (same speed): those open the TarFile themselves, so a shard cut at a member boundary reads
    as a complete, shorter one, and they miss a key repeated later in the shard.
    """
    last_key = None  # last sample yielded, for error messages
    key, members = None, {}
    seen: set[str] = set()
    try:
        with open_url(url) as f, tarfile.open(fileobj=f, mode="r|*" if read_data else "r:*",
                                              tarinfo=_EndAwareTarInfo) as tar:
            for info in tar:
                parsed = _split_member_name(info.name) if info.isfile() else None
                if parsed is None or parsed[1] not in _KNOWN_EXTS:
                    continue
                member_key, ext = parsed
                if member_key != key:
                    if key is not None:
                        yield key, members
                        last_key = key
                    if member_key in seen:
                        raise DatasetError(f"duplicate sample key {member_key!r}: twice in {url}")
                    seen.add(member_key)
                    key, members = member_key, {}
                if ext in members:
                    raise DatasetError(f"{url}: sample {member_key!r} has two {ext!r} members")
                members[ext] = tar.extractfile(info).read() if read_data else None
            if not getattr(tar, "reached_end_block", False):
                raise DatasetError(f"shard {url} is truncated: it ends without the tar end-of-archive "
                                   f"block ({_position(last_key)})")
    except (tarfile.TarError, EOFError) as e:
        cause = "is truncated" if _is_truncation(e) else "is not a readable tar"
        raise DatasetError(f"shard {url} {cause}: {e} ({_position(last_key)})") from e
    except OSError as e:
        raise DatasetError(f"cannot read shard {url}: {e}") from e
    if key is not None:
        yield key, members


def _is_truncation(error: Exception) -> bool:
    # tarfile has no exception class of its own for data that stops early; its messages tell.
    return isinstance(error, EOFError) or any(s in str(error) for s in ("unexpected end of data", "truncated"))


def _position(last_key: str | None) -> str:
    return f"last complete sample {last_key!r}" if last_key else "before its first complete sample"


# ---------------------------------------------------------------------------- images


def decode_image(data: bytes) -> np.ndarray:
    """Decode JPEG/PNG/WebP (or anything else PIL reads) to an HxWx3 uint8 RGB array.

    Grayscale, palette, alpha and CMYK images are converted to RGB; 16-bit images are scaled
    from 0..65535 to 0..255. Images above PIL's ``Image.MAX_IMAGE_PIXELS`` are refused.
    """
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image refused as a possible decompression bomb: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:  # PIL's UnidentifiedImageError is an OSError
        raise ImageDecodeError(f"not a decodable image: {e}") from e
    with img:
        limit = Image.MAX_IMAGE_PIXELS
        if limit and img.width * img.height > limit:
            raise ImageDecodeError(
                f"image refused as a possible decompression bomb: {img.width}x{img.height} = "
                f"{img.width * img.height} pixels, above Image.MAX_IMAGE_PIXELS = {limit}")
        try:
            img.load()
            return _to_rgb(img)
        except (OSError, SyntaxError, ValueError, EOFError) as e:
            raise ImageDecodeError(f"image data is corrupt or truncated: {e}") from e


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in _SIXTEEN_BIT_MODES:
        # PIL's own conversion clips 16-bit values at 255 instead of scaling them.
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        gray = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # resolves palette transparency, which a direct RGB conversion warns about
    return np.array(img.convert("RGB"))
