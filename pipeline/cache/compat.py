"""Whether a store may be used: its format version, dataset, settings, teachers and completeness.

Every check raises ``StoreError`` with one line naming what differs; none of them reads
arrays, so they take the store's attributes and flags as plain values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.data.shards import DatasetIndex

FORMAT = "regla-distill-teacher-cache"
FORMAT_VERSION = 2
MAX_LISTED = 10  # shard names / keys quoted in one error message


class StoreError(ValueError):
    """A store that is missing, malformed, or incompatible with the requested run."""


def listed(names: Sequence[str]) -> str:
    """The first MAX_LISTED names, comma-separated, saying how many there are in all if more."""
    more = f", ... ({len(names)} in all)" if len(names) > MAX_LISTED else ""
    return ", ".join(names[:MAX_LISTED]) + more


def check_format(attrs: Mapping[str, Any], path: str) -> None:
    """Refuse anything but a teacher cache of the version this code reads."""
    if attrs.get("format") != FORMAT:
        raise StoreError(f"{path} is not a regla-distill teacher cache (no '{FORMAT}' format attribute)")
    version = attrs.get("format_version")
    if version == 1:
        raise StoreError(_version_1_message(attrs, path))
    if version != FORMAT_VERSION:
        raise StoreError(f"{path} has format version {version}, "
                         f"this version of regla-distill reads version {FORMAT_VERSION}")


def _version_1_message(attrs: Mapping[str, Any], path: str) -> str:
    """How to rebuild a version-1 store: its view count, k, temperatures, feature views and view seed as flags."""
    config = attrs.get("config", {})
    views = config.get("views", {})
    flags = [f"--{flag} {value}" for flag, value in (
        ("views", views.get("num_views")), ("topk", config.get("topk")),
        ("temperatures", ",".join(f"{t:g}" for t in config.get("temperatures", []))),
        ("feature-views", config.get("feature_views")), ("seed", views.get("seed"))) if value not in (None, "")]
    teachers = ", ".join(sorted(attrs.get("teachers", {}))) or "none"
    return (f"{path} is a format-1 teacher cache (fp16 top-k logits + logsumexp, whose leftover mass is wrong "
            f"for confident teachers), which this version of regla-distill does not read; rebuild it in format "
            f"{FORMAT_VERSION}: `pipeline cache-teachers --shards SHARDS --store NEW.zarr {' '.join(flags)} "
            f"--teacher SPEC ...` with the same teachers ({teachers})")


def check_dataset(path: str, stored: dict, actual: dict) -> None:
    """Refuse shards other than those the store was built from (names, counts, keys)."""
    if actual != stored:
        raise StoreError(f"store {path} was built from another dataset: " + _fingerprint_difference(stored, actual))


def check_config(path: str, stored: dict, requested: dict) -> None:
    """Refuse to mix views or output settings (``CacheConfig.to_dict()`` of the store and of the run)."""
    if requested != stored:
        raise StoreError(f"store {path} was built with other settings: "
                         + _describe_difference("configuration", stored, requested)
                         + "; use the store's settings or a new --store")


def check_same_teacher(path: str, teacher_id: str, stored: dict, requested: dict) -> None:
    """Refuse a teacher id that the store already holds for other weights, preprocessing or options."""
    if stored != requested:
        raise StoreError(f"store {path} already has a teacher '{teacher_id}' that differs: "
                         + _describe_difference(f"teacher '{teacher_id}'", stored, requested)
                         + "; give this teacher another id (',id=NAME') or use a new --store")


def check_has_teacher(path: str, teacher_id: str, teacher_ids: Sequence[str]) -> None:
    if teacher_id not in teacher_ids:
        raise StoreError(f"store {path} has no teacher {teacher_id!r}; it holds {', '.join(teacher_ids) or 'none'}")


def check_shards_done(path: str, dataset: DatasetIndex, done: np.ndarray, teacher_id: str | None = None) -> None:
    """Refuse to train unless every shard with samples has its sample rows (``teacher_id`` None) or
    this teacher's rows written."""
    missing = [info.name for info, flag in zip(dataset.shards, done) if info.num_samples > 0 and not flag]
    if not missing:
        return
    if teacher_id is None:
        raise StoreError(f"store {path} has no sample rows for {len(missing)} shard(s): {listed(missing)}; "
                         "finish it with `pipeline cache-teachers`")
    raise StoreError(f"teacher {teacher_id!r} is not complete in store {path}: {len(missing)} shard(s) "
                     f"missing: {listed(missing)}; finish it with `pipeline cache-teachers`")


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
