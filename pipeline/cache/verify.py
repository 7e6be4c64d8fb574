"""``pipeline verify``: recompute random cached entries live and compare them with the store.

For N random (sample, view) pairs the sample is read from its shard again, the view
is re-rendered from the stored box and flip, every teacher runs on it, and the live
outputs are compared with the cached ones: the live logits at the cached top-k
indices against the cached top-k logits, the log-sum-exp at each temperature, and
the cosine between live and cached features. Tolerances allow for fp16 storage and
for a different batch composition than when caching (reduced precision teachers
get a wider one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.cache.shard_cacher import decode_to_tensor
from pipeline.cache.store import CacheStore
from pipeline.data.shards import DatasetError, iter_shard
from pipeline.data.views import normalize, render_view
from teachers import TeacherSpec, load_teacher

# (relative/absolute tolerance on logits and log-sum-exp, minimum feature cosine) per teacher dtype
TOLERANCES = {"fp32": (1e-2, 0.999), "fp16": (3e-2, 0.995), "bf16": (6e-2, 0.99)}


@dataclass
class VerifyReport:
    checked: int = 0  # (sample, view, teacher) entries compared
    max_logit_error: float = 0.0  # relative to max(1, |logit|)
    max_logsumexp_error: float = 0.0
    min_feature_cosine: float = 1.0
    mismatches: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.checked > 0 and not self.mismatches


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
                images[shard * store.rows_per_shard + position] = decode_to_tensor(raw, device)
            if position >= max(wanted):
                break
    return images


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
    boxes, flips = store.group["views/box"], store.group["views/flip"]
    temperatures = torch.tensor(store.config.temperatures)
    for tid in store.teacher_ids:
        record = store.teacher_record(tid)
        spec = TeacherSpec.from_dict(record["spec"])
        teacher = load_teacher(spec, device_t, random_init=record["random_init"], seed=store.config.views.seed)
        if teacher.weights_sha256 != record["weights_sha256"]:
            report.mismatches.append(f"{tid}: weights sha256 {teacher.weights_sha256} differs from the store's "
                                     f"{record['weights_sha256']}")
            continue
        tolerance, min_cosine = TOLERANCES[spec.dtype]
        pre = teacher.preprocessing
        crops = [render_view(images[row], boxes[row, view], bool(flips[row, view]), pre.input_size,
                             pre.interpolation) for row, view in entries]
        logits, features = teacher(normalize(torch.stack(crops), pre.mean, pre.std))
        logits, features = logits.float().cpu(), features.float().cpu()
        group = store.teacher(tid)
        for i, (row, view) in enumerate(entries):
            where = f"{tid} row {row} ({store.group['samples/key'][row]}) view {view}"
            cached_index = torch.from_numpy(group["topk_index"][row, view].astype(np.int64))
            cached_logits = torch.from_numpy(group["topk_logits"][row, view].astype(np.float32))
            # Live logits at the cached indices catch wrong values; the live top-k values catch
            # a cached top-k that is not the live top-k.
            live_at_index, live_topk = logits[i, cached_index], logits[i].topk(len(cached_index)).values
            logit_error = max(float(((live - cached_logits).abs() / live.abs().clamp(min=1)).max())
                              for live in (live_at_index, live_topk))
            live_lse = torch.logsumexp(logits[i][None] / temperatures[:, None], dim=-1)
            cached_lse = torch.from_numpy(group["logsumexp"][row, view])
            lse_error = float(((live_lse - cached_lse).abs() / live_lse.abs().clamp(min=1)).max())
            report.max_logit_error = max(report.max_logit_error, logit_error)
            report.max_logsumexp_error = max(report.max_logsumexp_error, lse_error)
            if logit_error > tolerance:
                report.mismatches.append(f"{where}: top-k logits differ by {logit_error:.3g} (relative)")
            if lse_error > tolerance:
                report.mismatches.append(f"{where}: logsumexp differs by {lse_error:.3g} (relative)")
            if "features" in group and view < store.config.num_feature_views:
                cached_features = torch.from_numpy(group["features"][row, view].astype(np.float32))
                cosine = float(torch.nn.functional.cosine_similarity(features[i], cached_features, dim=0))
                report.min_feature_cosine = min(report.min_feature_cosine, cosine)
                if cosine < min_cosine:
                    report.mismatches.append(f"{where}: feature cosine {cosine:.4f} < {min_cosine}")
            report.checked += 1
    return report
