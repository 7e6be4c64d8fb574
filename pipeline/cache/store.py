"""The teacher cache: a Zarr v3 store with one row per sample, aligned with the tar shards.

Layout (docs/store-format.md has the full description)::

    samples/key [N] str, label [N] int32, valid [N] bool, done [S] bool
    views/box [N, V, 4] float32, flip [N, V] bool
    teachers/<id>/topk_logprob [N, V, k] fp16, topk_index [N, V, k] int16|int32,
                  log_leftover [N, V, T] fp32, features [N, V_f, D] fp16 (optional),
                  done [S] bool

(the top-k encoding is described in ``topk.py``).

Shard ``s`` owns rows ``s*C .. s*C + C - 1`` (C = the largest shard's sample count)
and every array is chunked by C rows, so each shard's rows are whole chunks and
exactly one writer ever touches a chunk: concurrent workers never read-modify-write
each other's data. ``done`` flags are chunked one per shard for the same reason,
and a flag is set only after the shard's data is written.

Teachers are registered without any shared read-modify-write, so that several jobs can add
teachers to one store at once: a teacher's record lives in its own group's attributes and its
``done`` array is created last; the store's teachers are the groups that have one. The root
``teachers`` attribute is an index rebuilt from those groups (for readers that look there).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import time
from dataclasses import dataclass

import numpy as np
import zarr
from zarr.codecs import BloscCodec

from pipeline.cache import shard_io
from pipeline.cache.compat import (FORMAT, FORMAT_VERSION, StoreError, check_config, check_dataset, check_format,
                                   check_has_teacher, check_same_teacher, check_shards_done)
from pipeline.cache.shard_io import ShardSamples, TeacherOutputs
from pipeline.data import storage
from pipeline.data.shards import DatasetIndex
from pipeline.data.views import ViewPolicy

# Blosc zstd level 5 with byte shuffle compressed real teacher outputs best (top-k arrays) or
# within 1.4% (features); level 9 saves 1-11% more but encodes 10x slower
# (benchmarks/bench_store_compression.py, docs/benchmarks.md).
def _blosc() -> BloscCodec:
    return BloscCodec(cname="zstd", clevel=5, shuffle="shuffle")


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


CREATING = "being_created"


class StoreBeingCreated(StoreError):
    """Another job is creating this store right now."""


class CacheStore:
    """A teacher cache opened from a path or fsspec URL.

    The driver creates the store and its teacher groups; workers open it and write
    whole shards (``write_samples``, ``write_teacher``); readers use the arrays. Whether
    a store may be used is decided in ``compat.py``, a shard's rows are read and
    written by ``shard_io.py``; this class knows where things are.
    """

    def __init__(self, group: zarr.Group, path: str):
        self.group = group
        self.path = path
        attrs = group.attrs.asdict()
        if attrs.get(CREATING):
            raise StoreBeingCreated(f"{path} is being created by another job (or a job creating it was stopped: "
                                    "then delete it and rerun)")
        check_format(attrs, path)
        self.config = CacheConfig.from_dict(attrs["config"])
        self.dataset_fingerprint: dict = attrs["dataset"]["fingerprint"]
        self.rows_per_shard: int = attrs["dataset"]["rows_per_shard"]
        self.num_shards: int = len(self.dataset_fingerprint["shards"])

    # ----- opening and creating -------------------------------------------------

    @classmethod
    def open(cls, path: str, mode: str = "r") -> CacheStore:
        storage.check_location(path)  # its location is recorded and printed: it may not carry a secret
        try:
            group = zarr.open_group(path, mode=mode, zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError, zarr.errors.NodeTypeValidationError) as e:
            raise StoreError(f"no teacher cache at {path}: {e}") from None
        except (FileExistsError, NotADirectoryError):
            raise StoreError(f"{path} is a file, not a teacher cache (a Zarr directory)") from None
        return cls(group, path)

    @classmethod
    def create(cls, path: str, dataset: DatasetIndex, config: CacheConfig) -> CacheStore:
        storage.check_location(path)
        # Marked as being created until its attributes are written, last: another job opening it
        # meanwhile waits instead of taking it for a foreign folder.
        group = zarr.open_group(path, mode="w-", zarr_format=3, attributes={CREATING: True})
        _create_sample_arrays(group, dataset, config)
        group.attrs.put({
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "library_versions": library_versions(),
            "config": config.to_dict(),
            "dataset": {
                "fingerprint": dataset.fingerprint(),
                "rows_per_shard": dataset.rows_per_shard,
                "num_samples": dataset.num_samples,
                "class_names": list(dataset.class_names) if dataset.class_names else None,
                "urls": [s.url for s in dataset.shards],
            },
            "teachers": {},
        })
        return cls(group, path)

    @classmethod
    def open_or_create(cls, path: str, dataset: DatasetIndex, config: CacheConfig,
                       creation_timeout: float = 60.0) -> CacheStore:
        """Open the store at ``path`` if it exists (checking it matches), else create it.

        When another job creates the same store at the same moment, creating fails on the first
        node the other job wrote; the store is then opened once the other job has finished it.
        """
        try:
            store = cls.open(path, mode="r+")
        except StoreBeingCreated:
            store = cls._open_when_created(path, creation_timeout)
        except StoreError:
            if _exists(path):
                raise
            try:
                return cls.create(path, dataset, config)
            except (FileExistsError, zarr.errors.ContainsGroupError, zarr.errors.ContainsArrayError):
                store = cls._open_when_created(path, creation_timeout)
        store.check_compatible(dataset, config)
        return store

    @classmethod
    def _open_when_created(cls, path: str, timeout: float) -> CacheStore:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return cls.open(path, mode="r+")
            except StoreError:
                if time.monotonic() > deadline:
                    raise StoreError(f"{path} was being created by another job and is still incomplete after "
                                     f"{timeout:.0f} s; rerun when that job has started, or use another --store"
                                     ) from None
                time.sleep(0.5)

    # ----- checks (compat.py) ---------------------------------------------------

    def check_compatible(self, dataset: DatasetIndex, config: CacheConfig) -> None:
        """Refuse to mix: the dataset and the view/output settings must be the store's."""
        self.check_dataset(dataset)
        check_config(self.path, self.config.to_dict(), config.to_dict())

    def check_dataset(self, dataset: DatasetIndex) -> None:
        """Refuse shards other than those the store was built from (names, counts, keys)."""
        check_dataset(self.path, self.dataset_fingerprint, dataset.fingerprint())

    def check_ready(self, dataset: DatasetIndex, teacher_ids: list[str] | tuple[str, ...]) -> None:
        """Refuse to train from this store unless it is of ``dataset`` and complete for every teacher asked for."""
        self.check_dataset(dataset)
        check_shards_done(self.path, dataset, self.samples_done())
        for tid in teacher_ids:
            check_has_teacher(self.path, tid, self.teacher_ids)
            check_shards_done(self.path, dataset, self.teacher_done(tid), tid)

    # ----- layout ---------------------------------------------------------------

    @property
    def attrs(self) -> dict:
        return self.group.attrs.asdict()

    @property
    def teacher_ids(self) -> list[str]:
        """The registered teachers: groups under ``teachers/`` whose ``done`` array exists (created last)."""
        teachers = self.group["teachers"]
        return sorted(tid for tid in teachers.group_keys() if "done" in teachers[tid])

    def teacher_record(self, teacher_id: str) -> dict:
        return self.teacher(teacher_id).attrs.asdict()

    def shard_rows(self, shard: int) -> slice:
        return slice(shard * self.rows_per_shard, (shard + 1) * self.rows_per_shard)

    def shard_num_samples(self, shard: int) -> int:
        return int(self.dataset_fingerprint["counts"][shard])

    def teacher(self, teacher_id: str) -> zarr.Group:
        return self.group[f"teachers/{teacher_id}"]

    def teacher_done(self, teacher_id: str) -> np.ndarray:
        return self.teacher(teacher_id)["done"][:]

    def cached_rows(self, teacher_id: str) -> np.ndarray:
        """bool [N]: rows holding this teacher's outputs (valid samples of its completed shards)."""
        return np.repeat(self.teacher_done(teacher_id), self.rows_per_shard) & self.group["samples/valid"][:]

    def samples_done(self) -> np.ndarray:
        return self.group["samples/done"][:]

    def add_teacher(self, teacher_id: str, record: dict, num_classes: int, feature_dim: int,
                    features: bool) -> None:
        """Create the group and arrays of a new teacher, or check that an existing one is the same teacher.

        Writes only the teacher's own group (record in its attributes, ``done`` last), so jobs that add
        different teachers at the same time never overwrite each other's registration.
        """
        if teacher_id in self.teacher_ids:
            check_same_teacher(self.path, teacher_id, self.teacher_record(teacher_id), record)
            return
        if self.config.topk > num_classes:
            raise StoreError(f"--topk {self.config.topk} exceeds teacher '{teacher_id}''s {num_classes} classes")
        # overwrite: a group left without its `done` array (a job stopped while creating it) is not registered.
        group = self.group["teachers"].create_group(teacher_id, attributes=record, overwrite=True)
        _create_teacher_arrays(group, self.num_shards, self.rows_per_shard, self.config, num_classes,
                               feature_dim if features else 0)
        self.write_teacher_index()

    def write_teacher_index(self) -> None:
        """Rebuild the root ``teachers`` attribute from the teacher groups (an index; the groups are authoritative)."""
        self.group.attrs["teachers"] = {tid: self.teacher_record(tid) for tid in self.teacher_ids}

    # ----- shard reads and writes (shard_io.py; one writer per shard) ---------------

    def write_samples(self, shard: int, samples: ShardSamples) -> None:
        shard_io.write_samples(self.group, self.shard_rows(shard), samples)
        self.group["samples/done"][shard] = True

    def read_samples(self, shard: int) -> ShardSamples:
        return shard_io.read_samples(self.group, self.shard_rows(shard))

    def write_teacher(self, teacher_id: str, shard: int, outputs: TeacherOutputs) -> None:
        group = self.teacher(teacher_id)
        shard_io.write_teacher(group, self.shard_rows(shard), outputs)
        group["done"][shard] = True

    def read_teacher(self, teacher_id: str, shard: int, features: bool = True) -> TeacherOutputs:
        return shard_io.read_teacher(self.teacher(teacher_id), self.shard_rows(shard), features)


# ----- the arrays ---------------------------------------------------------------


def _create_sample_arrays(group: zarr.Group, dataset: DatasetIndex, config: CacheConfig) -> None:
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
    view_group.create_array("flip", shape=(rows, views), chunks=(chunk, views), dtype="bool", fill_value=False)
    view_group.attrs.update(config.views.to_dict())
    group.create_group("teachers")


def _create_teacher_arrays(group: zarr.Group, num_shards: int, chunk: int, config: CacheConfig, num_classes: int,
                           feature_dim: int) -> None:
    """A teacher's arrays, chunked by shard; ``feature_dim`` 0: no features."""
    rows, views, k, temps = num_shards * chunk, config.views.num_views, config.topk, len(config.temperatures)

    def per_view(name: str, width: int, dtype, view_count: int = views) -> None:
        group.create_array(name, shape=(rows, view_count, width), chunks=(chunk, view_count, width), dtype=dtype,
                           fill_value=0, compressors=_blosc())

    per_view("topk_logprob", k, "float16")
    per_view("topk_index", k, index_dtype(num_classes))
    per_view("log_leftover", temps, "float32")
    if feature_dim and config.num_feature_views > 0:
        per_view("features", feature_dim, "float16", config.num_feature_views)
    group.create_array("done", shape=(num_shards,), chunks=(1,), dtype="bool", fill_value=False)


def _exists(path: str) -> bool:
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    return fs.exists(root)

