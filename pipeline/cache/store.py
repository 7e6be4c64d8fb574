"""The teacher cache: a Zarr v3 store with one row per sample, aligned with the tar shards.

Layout (docs/store-format.md has the full description)::

    samples/key [N] str, label [N] int32, valid [N] bool, done [S] bool
    views/box [N, V, 4] float32, flip [N, V] bool
    teachers/<id>/topk_logits [N, V, k] fp16, topk_index [N, V, k] int16|int32,
                  logsumexp [N, V, T] fp32, features [N, V_f, D] fp16 (optional),
                  done [S] bool

Shard ``s`` owns rows ``s*C .. s*C + C - 1`` (C = the largest shard's sample count)
and every array is chunked by C rows, so each shard's rows are whole chunks and
exactly one writer ever touches a chunk: concurrent workers never read-modify-write
each other's data. ``done`` flags are chunked one per shard for the same reason,
and a flag is set only after the shard's data is written.
"""

from __future__ import annotations

import datetime
import importlib.metadata
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.data.shards import DatasetIndex
from pipeline.data.views import ViewPolicy

FORMAT = "regla-distill-teacher-cache"
FORMAT_VERSION = 1

# Blosc zstd level 5 with byte shuffle compressed real teacher outputs best, or within 1%,
# for every array; level 9 saves 1-10% more but encodes 10x slower
# (benchmarks/bench_store_compression.py, docs/benchmarks.md).
def _blosc() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


class StoreError(ValueError):
    """A store that is missing, malformed, or incompatible with the requested run."""


@dataclass(frozen=True)
class CacheConfig:
    """What every teacher in one store shares: the views and the output encoding."""

    views: ViewPolicy
    topk: int
    temperatures: tuple[float, ...] = (1.0,)
    feature_views: int | None = None  # views with cached features; None = all views

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise ValueError(f"topk must be >= 1, got {self.topk}")
        if not self.temperatures or any(t <= 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be positive, got {self.temperatures}")
        if self.feature_views is not None and not 0 <= self.feature_views <= self.views.num_views:
            raise ValueError(f"feature_views must be in [0, {self.views.num_views}], got {self.feature_views}")

    @property
    def num_feature_views(self) -> int:
        return self.views.num_views if self.feature_views is None else self.feature_views

    def to_dict(self) -> dict:
        return {"views": self.views.to_dict(), "topk": self.topk,
                "temperatures": list(self.temperatures), "feature_views": self.num_feature_views}

    @classmethod
    def from_dict(cls, d: dict) -> CacheConfig:
        return cls(views=ViewPolicy.from_dict(d["views"]), topk=int(d["topk"]),
                   temperatures=tuple(float(t) for t in d["temperatures"]),
                   feature_views=int(d["feature_views"]))


@dataclass
class TeacherOutputs:
    """One shard's outputs for one teacher, rows in shard order (length C)."""

    topk_logits: np.ndarray  # [C, V, k] float16
    topk_index: np.ndarray  # [C, V, k] int16 or int32
    logsumexp: np.ndarray  # [C, V, T] float32
    features: np.ndarray | None  # [C, V_f, D] float16


@dataclass
class ShardSamples:
    """One shard's sample rows (length C; rows past the shard's end are padding)."""

    keys: np.ndarray  # [C] str
    labels: np.ndarray  # [C] int32, -1 where unknown
    valid: np.ndarray  # [C] bool
    boxes: np.ndarray  # [C, V, 4] float32
    flips: np.ndarray  # [C, V] bool


def index_dtype(num_classes: int) -> np.dtype:
    return np.dtype(np.int16) if num_classes <= np.iinfo(np.int16).max + 1 else np.dtype(np.int32)


def library_versions() -> dict[str, str]:
    versions = {}
    for dist in ("regla-distill", "torch", "timm", "zarr", "numcodecs", "ray", "webdataset"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


MAX_LISTED = 10  # shard names / keys quoted in one error message


def listed(names: list[str]) -> str:
    """The first MAX_LISTED names, comma-separated, saying how many there are in all if more."""
    more = f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def _fingerprint_difference(stored: dict, actual: dict) -> str:
    """The first way two dataset fingerprints differ: shard names, then counts, then keys."""
    if stored.get("shards") != actual.get("shards"):
        a, b = list(stored.get("shards", [])), list(actual.get("shards", []))
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return (f"shard names differ (store has {len(a)} shards, dataset has {len(b)}; first difference at "
                f"shard {i}: store has {a[i] if i < len(a) else None!r}, dataset has {b[i] if i < len(b) else None!r})")
    if stored.get("counts") != actual.get("counts"):
        diff = [f"{name}: store has {x}, dataset has {y}"
                for name, x, y in zip(actual["shards"], stored["counts"], actual["counts"]) if x != y]
        return f"sample counts differ ({listed(diff)})"
    return "the sample keys differ (keys_sha256 of the same shards and counts)"


def _describe_difference(name: str, stored: Any, requested: Any) -> str:
    if isinstance(stored, dict) and isinstance(requested, dict):
        keys = sorted(k for k in set(stored) | set(requested) if stored.get(k) != requested.get(k))
        detail = "; ".join(f"{k}: store has {stored.get(k)!r}, this run has {requested.get(k)!r}" for k in keys)
    else:
        detail = f"store has {stored!r}, this run has {requested!r}"
    return f"{name} differs ({detail})"


class CacheStore:
    """A teacher cache opened from a path or fsspec URL.

    The driver creates the store and its teacher groups; workers open it and write
    whole shards (``write_samples``, ``write_teacher``); readers use the arrays.
    """

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        attrs = group.attrs.asdict()
        if attrs.get("format") != FORMAT:
            raise StoreError(f"{path} is not a regla-distill teacher cache (no '{FORMAT}' format attribute)")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise StoreError(f"{path} has format version {attrs.get('format_version')}, "
                             f"this version of regla-distill reads version {FORMAT_VERSION}")
        self.config = CacheConfig.from_dict(attrs["config"])
        self.dataset_fingerprint: dict = attrs["dataset"]["fingerprint"]
        self.rows_per_shard: int = attrs["dataset"]["rows_per_shard"]
        self.num_shards: int = len(self.dataset_fingerprint["shards"])

    # ----- opening and creating -------------------------------------------------

    @classmethod
    def open(cls, path: str, mode: str = "r") -> CacheStore:
        try:
            group = zarr.open_group(path, mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
            raise StoreError(f"no teacher cache at {path}: {e}") from None
        except (FileExistsError, NotADirectoryError):
            raise StoreError(f"{path} is a file, not a teacher cache (a Zarr directory)") from None
        return cls(group, path)

    @classmethod
    def create(cls, path: str, dataset: DatasetIndex, config: CacheConfig) -> CacheStore:
        group = zarr.open_group(path, mode="w-", zarr_format=3)
        rows, chunk, num_shards = dataset.num_rows, dataset.rows_per_shard, len(dataset.shards)
        views = config.views.num_views
        samples = group.create_group("samples")
        samples.create_array("key", shape=(rows,), chunks=(chunk,), dtype=str, fill_value="")
        samples.create_array("label", shape=(rows,), chunks=(chunk,), dtype="int32", fill_value=-1)
        samples.create_array("valid", shape=(rows,), chunks=(chunk,), dtype="bool", fill_value=False)
        samples.create_array("done", shape=(num_shards,), chunks=(1,), dtype="bool", fill_value=False)
        view_group = group.create_group("views")
        view_group.create_array("box", shape=(rows, views, 4), chunks=(chunk, views, 4), dtype="float32",
                                fill_value=0.0, compressors=_blosc())
        view_group.create_array("flip", shape=(rows, views), chunks=(chunk, views), dtype="bool",
                                fill_value=False)
        view_group.attrs.update(config.views.to_dict())
        group.create_group("teachers")
        group.attrs.update({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "library_versions": library_versions(),
            "config": config.to_dict(),
            "dataset": {
                "fingerprint": dataset.fingerprint(),
                "rows_per_shard": chunk,
                "num_samples": dataset.num_samples,
                "class_names": list(dataset.class_names) if dataset.class_names else None,
                "urls": [s.url for s in dataset.shards],
            },
            "teachers": {},
        })
        return cls(group, path)

    @classmethod
    def open_or_create(cls, path: str, dataset: DatasetIndex, config: CacheConfig) -> CacheStore:
        """Open the store at ``path`` if it exists (checking it matches), else create it."""
        try:
            store = cls.open(path, mode="r+")
        except StoreError:
            if _exists(path):
                raise
            return cls.create(path, dataset, config)
        store.check_compatible(dataset, config)
        return store

    def check_compatible(self, dataset: DatasetIndex, config: CacheConfig) -> None:
        """Refuse to mix: the dataset and the view/output settings must be the store's."""
        self.check_dataset(dataset)
        if config.to_dict() != self.config.to_dict():
            stored, requested = self.config.to_dict(), config.to_dict()
            raise StoreError(f"store {self.path} was built with other settings: "
                             + _describe_difference("configuration", stored, requested)
                             + "; use the store's settings or a new --store")

    def check_dataset(self, dataset: DatasetIndex) -> None:
        """Refuse shards other than those the store was built from (names, counts, keys)."""
        fingerprint = dataset.fingerprint()
        if fingerprint != self.dataset_fingerprint:
            raise StoreError(f"store {self.path} was built from another dataset: "
                             + _fingerprint_difference(self.dataset_fingerprint, fingerprint))

    def check_ready(self, dataset: DatasetIndex, teacher_ids: list[str] | tuple[str, ...]) -> None:
        """Refuse to train from this store unless it is of ``dataset`` and complete for every teacher asked for."""
        self.check_dataset(dataset)
        used = [s for s, info in enumerate(dataset.shards) if info.num_samples > 0]
        missing = [dataset.shards[s].name for s, done in zip(used, self.samples_done()[used]) if not done]
        if missing:
            raise StoreError(f"store {self.path} has no sample rows for {len(missing)} shard(s): {listed(missing)}; "
                             "finish it with `pipeline cache-teachers`")
        for tid in teacher_ids:
            if tid not in self.teacher_ids:
                raise StoreError(f"store {self.path} has no teacher {tid!r}; "
                                 f"it holds {', '.join(self.teacher_ids) or 'none'}")
            done = self.teacher_done(tid)
            missing = [dataset.shards[s].name for s in used if not done[s]]
            if missing:
                raise StoreError(f"teacher {tid!r} is not complete in store {self.path}: {len(missing)} shard(s) "
                                 f"missing: {listed(missing)}; finish it with `pipeline cache-teachers`")

    # ----- layout ---------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return self.group.attrs.asdict()

    @property
    def teacher_ids(self) -> list[str]:
        return sorted(self.attrs["teachers"])

    def teacher_record(self, teacher_id: str) -> dict:
        return self.attrs["teachers"][teacher_id]

    def shard_rows(self, shard: int) -> slice:
        return slice(shard * self.rows_per_shard, (shard + 1) * self.rows_per_shard)

    def shard_num_samples(self, shard: int) -> int:
        return int(self.dataset_fingerprint["counts"][shard])

    def teacher(self, teacher_id: str) -> zarr.Group:
        return self.group[f"teachers/{teacher_id}"]

    # ----- teachers -------------------------------------------------------------

    def add_teacher(self, teacher_id: str, record: dict, num_classes: int, feature_dim: int,
                    features: bool) -> None:
        """Create the arrays of a new teacher, or check that an existing one is the same teacher."""
        teachers = self.attrs["teachers"]
        if teacher_id in teachers:
            if teachers[teacher_id] != record:
                raise StoreError(f"store {self.path} already has a teacher '{teacher_id}' that differs: "
                                 + _describe_difference(f"teacher '{teacher_id}'", teachers[teacher_id], record)
                                 + "; give this teacher another id (',id=NAME') or use a new --store")
            return
        rows, chunk = self.num_shards * self.rows_per_shard, self.rows_per_shard
        views, k = self.config.views.num_views, self.config.topk
        if k > num_classes:
            raise StoreError(f"--topk {k} exceeds teacher '{teacher_id}''s {num_classes} classes")
        group = self.group["teachers"].create_group(teacher_id)
        group.create_array("topk_logits", shape=(rows, views, k), chunks=(chunk, views, k), dtype="float16",
                           fill_value=0.0, compressors=_blosc())
        group.create_array("topk_index", shape=(rows, views, k), chunks=(chunk, views, k),
                           dtype=index_dtype(num_classes), fill_value=0, compressors=_blosc())
        temps = len(self.config.temperatures)
        group.create_array("logsumexp", shape=(rows, views, temps), chunks=(chunk, views, temps),
                           dtype="float32", fill_value=0.0, compressors=_blosc())
        feature_views = self.config.num_feature_views
        if features and feature_views > 0:
            group.create_array("features", shape=(rows, feature_views, feature_dim),
                               chunks=(chunk, feature_views, feature_dim), dtype="float16", fill_value=0.0,
                               compressors=_blosc())
        group.create_array("done", shape=(self.num_shards,), chunks=(1,), dtype="bool", fill_value=False)
        group.attrs.update(record)
        teachers[teacher_id] = record
        self.group.attrs["teachers"] = teachers

    def teacher_done(self, teacher_id: str) -> np.ndarray:
        return self.teacher(teacher_id)["done"][:]

    def cached_rows(self, teacher_id: str) -> np.ndarray:
        """bool [N]: rows holding this teacher's outputs (valid samples of its completed shards)."""
        return np.repeat(self.teacher_done(teacher_id), self.rows_per_shard) & self.group["samples/valid"][:]

    def samples_done(self) -> np.ndarray:
        return self.group["samples/done"][:]

    # ----- shard writes (one writer per shard) -------------------------------------

    def write_samples(self, shard: int, samples: ShardSamples) -> None:
        rows = self.shard_rows(shard)
        self.group["samples/key"][rows] = samples.keys
        self.group["samples/label"][rows] = samples.labels
        self.group["samples/valid"][rows] = samples.valid
        self.group["views/box"][rows] = samples.boxes
        self.group["views/flip"][rows] = samples.flips
        self.group["samples/done"][shard] = True

    def read_samples(self, shard: int) -> ShardSamples:
        rows = self.shard_rows(shard)
        return ShardSamples(keys=self.group["samples/key"][rows], labels=self.group["samples/label"][rows],
                            valid=self.group["samples/valid"][rows], boxes=self.group["views/box"][rows],
                            flips=self.group["views/flip"][rows])

    def write_teacher(self, teacher_id: str, shard: int, outputs: TeacherOutputs) -> None:
        rows, group = self.shard_rows(shard), self.teacher(teacher_id)
        group["topk_logits"][rows] = outputs.topk_logits
        group["topk_index"][rows] = outputs.topk_index
        group["logsumexp"][rows] = outputs.logsumexp
        if "features" in group and outputs.features is not None:
            group["features"][rows] = outputs.features
        group["done"][shard] = True

    def usage(self) -> dict:
        """Stored and raw bytes: total, and per teacher split into logits (top-k + logsumexp) and features."""
        def sizes(group: zarr.Group, names: tuple[str, ...]) -> tuple[int, int]:
            arrays = [group[n] for n in names if n in group]
            return sum(a.nbytes_stored() for a in arrays), sum(a.nbytes for a in arrays)

        report: dict = {"teachers": {}}
        total_stored, total_raw = sizes(self.group["samples"], ("key", "label", "valid", "done"))
        stored, raw = sizes(self.group["views"], ("box", "flip"))
        total_stored, total_raw = total_stored + stored, total_raw + raw
        for tid in self.teacher_ids:
            group = self.teacher(tid)
            logits_stored, logits_raw = sizes(group, ("topk_logits", "topk_index", "logsumexp", "done"))
            features_stored, features_raw = sizes(group, ("features",))
            report["teachers"][tid] = {"logits_bytes": logits_stored, "logits_raw_bytes": logits_raw,
                                       "features_bytes": features_stored, "features_raw_bytes": features_raw}
            total_stored += logits_stored + features_stored
            total_raw += logits_raw + features_raw
        report["bytes"], report["raw_bytes"] = total_stored, total_raw
        return report

    def read_teacher(self, teacher_id: str, shard: int) -> TeacherOutputs:
        rows, group = self.shard_rows(shard), self.teacher(teacher_id)
        return TeacherOutputs(topk_logits=group["topk_logits"][rows], topk_index=group["topk_index"][rows],
                              logsumexp=group["logsumexp"][rows],
                              features=group["features"][rows] if "features" in group else None)


def _exists(path: str) -> bool:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(root)

