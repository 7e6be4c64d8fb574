"""``pipeline verify``: recompute random cached entries live and compare them with the store.

For N random (sample, view) pairs the sample is read from its shard again, the view is
re-rendered from the stored box and flip, every teacher runs on it, and per teacher:

- the live log-softmax at the cached top-k indices, and the live top-k log-probabilities,
  against the cached log-probabilities (a wrong value, or a cached top-k that is not the
  live top-k), relative to max(1, |log p|);
- the live mass outside the cached top-k against the cached leftover, at each temperature
  (relative error);
- KL(live || rebuilt) at each cached temperature, in nats: "live" is the distribution the
  entry should encode (the live probabilities of the cached top-k classes, the live leftover
  spread over the others), "rebuilt" is the cached entry rebuilt by ``rebuild_log_probs``,
  exactly as the training loss rebuilds it. Above ``MAX_KL`` the store fails;
- the cosine between live and cached features.

Tolerances allow for fp16 storage and for a different batch composition than when caching
(reduced precision teachers get a wider one). NaN counts as a mismatch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import zarr

from pipeline.cache.store import CacheStore
from pipeline.cache.topk import kl_divergence, leftover_log_mass, rebuild_log_probs
from pipeline.data.images import decode_sample
from pipeline.data.shards import DatasetError, iter_shard
from pipeline.data.views import normalize, render_view
from teachers import TeacherSpec, load_teacher

# (relative tolerance on top-k log-probabilities and on the leftover mass, minimum feature cosine) per teacher dtype
TOLERANCES = {"fp32": (1e-2, 0.999), "fp16": (3e-2, 0.995), "bf16": (6e-2, 0.99)}
MAX_KL = 1e-3  # nats, live vs rebuilt distribution


@dataclass
class TeacherCheck:
    """The worst differences found for one teacher over the checked entries."""

    checked: int = 0
    max_logprob_error: float = 0.0  # relative to max(1, |log p|)
    max_leftover_rel_error: float = 0.0
    max_kl: float = 0.0  # nats, max over entries and cached temperatures
    min_feature_cosine: float | None = None  # None: no cached features checked


@dataclass
class VerifyReport:
    teachers: dict[str, TeacherCheck] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)

    @property
    def checked(self) -> int:
        """(sample, view, teacher) entries compared."""
        return sum(t.checked for t in self.teachers.values())

    @property
    def ok(self) -> bool:
        return self.checked > 0 and not self.mismatches

    def worst(self, name: str) -> float:
        """The worst value of a TeacherCheck field over the teachers (min for the cosine)."""
        values = [v for t in self.teachers.values() if (v := getattr(t, name)) is not None]
        pick = min if name == "min_feature_cosine" else max
        return pick(values) if values else float("nan")

    def to_dict(self) -> dict:
        return {"ok": self.ok, "checked": self.checked, "max_kl_allowed": MAX_KL,
                "teachers": {tid: asdict(t) for tid, t in self.teachers.items()}, "mismatches": self.mismatches}


def _pick_entries(store: CacheStore, num: int, seed: int) -> list[tuple[int, int]]:
    """Random (row, view) pairs among valid rows that every teacher has cached."""
    usable = store.group["samples/valid"][:]
    for tid in store.teacher_ids:
        usable &= store.cached_rows(tid)
    rows = np.flatnonzero(usable)
    if not len(rows):
        return []
    rng = np.random.default_rng(seed)
    picked = rng.choice(rows, size=min(num, len(rows)), replace=False)
    views = rng.integers(0, store.config.views.num_views, size=len(picked))
    return sorted(zip(picked.tolist(), views.tolist()))


def _read_images(store: CacheStore, urls: list[str], rows: list[int], device: torch.device
                 ) -> dict[int, torch.Tensor]:
    keys = store.group["samples/key"]
    by_shard: dict[int, dict[int, str]] = {}
    for row in rows:
        by_shard.setdefault(row // store.rows_per_shard, {})[row % store.rows_per_shard] = str(keys[row])
    images = {}
    for shard, wanted in by_shard.items():
        for position, raw in enumerate(iter_shard(urls[shard])):
            if position in wanted:
                if raw.key != wanted[position]:
                    raise DatasetError(f"shard {urls[shard]} position {position} holds '{raw.key}', "
                                       f"the store has '{wanted[position]}'")
                images[shard * store.rows_per_shard + position] = decode_sample(raw).to(device)
            if position >= max(wanted):
                break
    return images


def _entries(array: zarr.Array, rows: np.ndarray, views: np.ndarray) -> torch.Tensor:
    """array[rows[i], views[i]] for every entry, as a tensor [n, ...] (one read of the rows involved)."""
    unique, inverse = np.unique(rows, return_inverse=True)
    block = array.get_orthogonal_selection((unique,) + (slice(None),) * (array.ndim - 1))
    return torch.from_numpy(np.ascontiguousarray(block[inverse, views]))


def _relative_mass_error(live_log: torch.Tensor, cached_log: torch.Tensor) -> torch.Tensor:
    """|cached / live - 1| of masses given as logs; 0 where both are 0 (no other classes)."""
    both_empty = torch.isneginf(live_log) & torch.isneginf(cached_log)
    return torch.where(both_empty, 0.0, torch.expm1(cached_log - live_log).abs())


def _worst(values: torch.Tensor) -> torch.Tensor:
    """NaN (a broken entry) as +inf, so that it fails every tolerance."""
    return torch.nan_to_num(values.double(), nan=float("inf"))


def _compare_outputs(logits: torch.Tensor, group: zarr.Group, rows: np.ndarray, views: np.ndarray,
                     temperatures: tuple[float, ...], num_classes: int) -> dict[str, torch.Tensor]:
    """Per entry [n]: log-probability error, leftover relative error and KL, the worst over temperatures."""
    cached_logprob = _entries(group["topk_logprob"], rows, views).float()
    index = _entries(group["topk_index"], rows, views).long()
    cached_leftover = _entries(group["log_leftover"], rows, views).float()
    live = torch.log_softmax(logits, dim=-1)
    live_at_index, live_topk = live.gather(1, index), live.topk(index.shape[1], dim=-1).values
    logprob_error = torch.stack([((x - cached_logprob).abs() / x.abs().clamp(min=1)).amax(-1)
                                 for x in (live_at_index, live_topk)]).amax(0)
    live_leftover = leftover_log_mass(logits, index, temperatures)
    kl = torch.stack([kl_divergence(rebuild_log_probs(live_at_index, index, live_leftover[:, i], num_classes, t),
                                    rebuild_log_probs(cached_logprob, index, cached_leftover[:, i], num_classes, t))
                      for i, t in enumerate(temperatures)]).amax(0)
    return {"logprob": _worst(logprob_error), "leftover": _worst(_relative_mass_error(live_leftover, cached_leftover)
                                                                  .amax(-1)), "kl": _worst(kl)}


def verify_store(path: str, num_samples: int = 32, seed: int = 0, shards: list[str] | None = None,
                 device: str = "cpu") -> VerifyReport:
    """Recompute ``num_samples`` random cached entries with live teachers and compare."""
    store = CacheStore.open(path)
    urls = shards or store.attrs["dataset"]["urls"]
    if len(urls) != store.num_shards:
        raise DatasetError(f"{len(urls)} shard URLs given, the store has {store.num_shards} shards")
    entries = _pick_entries(store, num_samples, seed)
    report = VerifyReport()
    if not entries:
        report.mismatches.append("no cached entries to verify (no shard is complete for every teacher)")
        return report
    device_t = torch.device(device)
    images = _read_images(store, urls, sorted({row for row, _ in entries}), device_t)
    for tid in store.teacher_ids:
        _verify_teacher(store, tid, entries, images, device_t, report)
    return report


def _verify_teacher(store: CacheStore, tid: str, entries: list[tuple[int, int]], images: dict[int, torch.Tensor],
                    device: torch.device, report: VerifyReport) -> None:
    record = store.teacher_record(tid)
    spec = TeacherSpec.from_dict(record["spec"])
    teacher = load_teacher(spec, device, random_init=record["random_init"], seed=store.config.views.seed)
    if teacher.weights_sha256 != record["weights_sha256"]:
        report.mismatches.append(f"{tid}: weights sha256 {teacher.weights_sha256} differs from the store's "
                                 f"{record['weights_sha256']}")
        return
    tolerance, min_cosine = TOLERANCES[spec.dtype]
    pre = teacher.preprocessing
    boxes, flips = store.group["views/box"], store.group["views/flip"]
    crops = [render_view(images[row], boxes[row, view], bool(flips[row, view]), pre.input_size, pre.interpolation)
             for row, view in entries]
    logits, features = teacher(normalize(torch.stack(crops), pre.mean, pre.std))
    logits, features = logits.float().cpu(), features.float().cpu()
    rows, views = np.array([r for r, _ in entries]), np.array([v for _, v in entries])
    group, keys = store.teacher(tid), store.group["samples/key"]
    errors = _compare_outputs(logits, group, rows, views, store.config.temperatures, record["num_classes"])
    with_features = views < store.config.num_feature_views if "features" in group else np.zeros(len(views), bool)
    cosine = _feature_cosines(features, group, rows, views, with_features)
    check = report.teachers.setdefault(tid, TeacherCheck())
    for i, (row, view) in enumerate(entries):
        where = f"{tid} row {row} ({keys[row]}) view {view}"
        logprob_error, leftover_error, kl = (float(errors[name][i]) for name in ("logprob", "leftover", "kl"))
        check.max_logprob_error = max(check.max_logprob_error, logprob_error)
        check.max_leftover_rel_error = max(check.max_leftover_rel_error, leftover_error)
        check.max_kl = max(check.max_kl, kl)
        if logprob_error > tolerance:
            report.mismatches.append(f"{where}: top-k log-probabilities differ by {logprob_error:.3g} (relative)")
        if leftover_error > tolerance:
            report.mismatches.append(f"{where}: leftover mass differs by {leftover_error:.3g} (relative)")
        if kl > MAX_KL:
            report.mismatches.append(f"{where}: KL(live || rebuilt) {kl:.3g} nats > {MAX_KL}")
        if with_features[i]:
            seen = 1.0 if check.min_feature_cosine is None else check.min_feature_cosine
            check.min_feature_cosine = min(seen, float(np.nan_to_num(cosine[i], nan=-1.0)))
            if not cosine[i] >= min_cosine:
                report.mismatches.append(f"{where}: feature cosine {cosine[i]:.4f} < {min_cosine}")
        check.checked += 1


def _feature_cosines(features: torch.Tensor, group: zarr.Group, rows: np.ndarray, views: np.ndarray,
                     keep: np.ndarray) -> np.ndarray:
    """Cosine [n] between live and cached features where ``keep``; NaN elsewhere."""
    out = np.full(len(rows), np.nan)
    if keep.any():
        cached = _entries(group["features"], rows[keep], views[keep]).float()
        out[keep] = torch.nn.functional.cosine_similarity(features[torch.from_numpy(keep)], cached, dim=-1).numpy()
    return out
