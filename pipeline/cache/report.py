"""What a teacher cache holds: the report behind ``pipeline inspect`` and its plot."""

from __future__ import annotations

import numpy as np
import torch
import zarr

from pipeline.cache.store import CacheStore
from pipeline.cache.topk import topk_log_mass

OUTPUT_ARRAYS = ("topk_logprob", "topk_index", "log_leftover", "done")  # a teacher's "logits" bytes


def confidence_and_entropy(topk_logprob: np.ndarray, log_leftover: np.ndarray, num_classes: int,
                           temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Max probability and entropy (nats) [...] of the distribution the cache encodes at ``temperature``.

    ``topk_logprob`` [..., k] and ``log_leftover`` [...] (at that temperature) as stored; the
    distribution is the one the training loss rebuilds (top-k probabilities, leftover spread uniformly).
    """
    log_top = topk_log_mass(torch.from_numpy(topk_logprob).double(), torch.from_numpy(log_leftover).double(),
                            temperature).numpy()
    confidence, entropy = np.exp(log_top[..., 0]), _entropy_terms(log_top).sum(-1)
    others = num_classes - topk_logprob.shape[-1]
    if others > 0:  # each other class holds leftover / others
        log_other = log_leftover.astype(np.float64) - np.log(others)
        confidence = np.maximum(confidence, np.exp(log_other))
        entropy += others * _entropy_terms(log_other)
    return confidence, entropy


def _entropy_terms(log_p: np.ndarray) -> np.ndarray:
    """-p log p, 0 where p is 0."""
    p = np.exp(log_p)
    return -p * np.where(p > 0, log_p, 0.0)


def _sizes(group: zarr.Group, names: tuple[str, ...]) -> tuple[int, int]:
    """(stored, raw) bytes of the arrays of ``group`` named ``names`` (those present)."""
    arrays = [group[n] for n in names if n in group]
    return sum(a.nbytes_stored() for a in arrays), sum(a.nbytes for a in arrays)


def store_usage(store: CacheStore) -> dict:
    """Stored and raw bytes: total, and per teacher split into logits (top-k outputs) and features."""
    report: dict = {"teachers": {}}
    total_stored, total_raw = _sizes(store.group["samples"], ("key", "label", "valid", "done"))
    stored, raw = _sizes(store.group["views"], ("box", "flip"))
    total_stored, total_raw = total_stored + stored, total_raw + raw
    for tid in store.teacher_ids:
        group = store.teacher(tid)
        logits_stored, logits_raw = _sizes(group, OUTPUT_ARRAYS)
        features_stored, features_raw = _sizes(group, ("features",))
        report["teachers"][tid] = {"logits_bytes": logits_stored, "logits_raw_bytes": logits_raw,
                                   "features_bytes": features_stored, "features_raw_bytes": features_raw}
        total_stored += logits_stored + features_stored
        total_raw += logits_raw + features_raw
    report["bytes"], report["raw_bytes"] = total_stored, total_raw
    return report


def _per_view(total_bytes: int, views: int) -> float:
    """Bytes per cached view; 0 when nothing is cached yet (partial chunks are not a per-view cost)."""
    return total_bytes / views if views else 0.0


def store_report(path: str) -> dict:
    """Teachers, k, views, coverage, sizes and compression of the store at ``path``."""
    store = CacheStore.open(path)
    attrs, config = store.attrs, store.config
    valid = store.group["samples/valid"][:]
    samples_done = store.samples_done()
    counts = np.array(store.dataset_fingerprint["counts"])
    valid_per_shard = valid.reshape(store.num_shards, store.rows_per_shard).sum(axis=1)
    views = config.views.num_views
    usage = store_usage(store)
    raw_covered = 0
    teachers = {}
    for tid in store.teacher_ids:
        record, done = store.teacher_record(tid), store.teacher_done(tid)
        covered = int(store.cached_rows(tid).sum())
        teacher_usage = usage["teachers"][tid]
        fraction = done.mean() if len(done) else 0.0
        raw_covered += (teacher_usage["logits_raw_bytes"] + teacher_usage["features_raw_bytes"]) * fraction
        teachers[tid] = {
            "model": record["spec"]["model_name"],
            "weights_source": record["weights_source"],
            "weights_sha256": record["weights_sha256"],
            "num_classes": record["num_classes"],
            "feature_dim": record["feature_dim"] if "features" in store.teacher(tid) else None,
            "input_size": record["preprocessing"]["input_size"],
            "shards_done": int(done.sum()),
            "samples_covered": covered,
            "coverage": covered / max(1, int(valid.sum())),
            "bytes": teacher_usage["logits_bytes"] + teacher_usage["features_bytes"],
            "bytes_per_view": _per_view(teacher_usage["logits_bytes"], covered * views),
            "feature_bytes_per_view": _per_view(teacher_usage["features_bytes"], covered * config.num_feature_views),
        }
    stored_teacher_bytes = sum(t["bytes"] for t in teachers.values())
    return {
        "store": path,
        "format_version": attrs["format_version"],
        "created": attrs["created"],
        "dataset": {"fingerprint": store.dataset_fingerprint, "num_samples": attrs["dataset"]["num_samples"],
                    "valid_samples_cached": int(valid.sum()),
                    "invalid_samples": int((counts - valid_per_shard)[samples_done].sum()),
                    "shards_with_samples": int(samples_done.sum()), "num_shards": store.num_shards},
        "topk": config.topk,
        "temperatures": list(config.temperatures),
        "views": config.views.to_dict(),
        "feature_views": config.num_feature_views,
        "teachers": teachers,
        "bytes": usage["bytes"],
        "compression_ratio": raw_covered / stored_teacher_bytes if stored_teacher_bytes else None,
        "library_versions": attrs["library_versions"],
    }


def format_report(report: dict) -> list[str]:
    lines = [f"store: {report['store']} (format {report['format_version']}, created {report['created']})",
             f"dataset: {report['dataset']['num_samples']} samples in {report['dataset']['num_shards']} shards, "
             f"keys sha256 {report['dataset']['fingerprint']['keys_sha256'][:16]}...",
             f"views: {report['views']['num_views']} per sample (features for {report['feature_views']}), "
             f"top-{report['topk']}, temperatures {report['temperatures']}",
             f"size: {report['bytes']:,} bytes"
             + (f", compression {report['compression_ratio']:.2f}x" if report["compression_ratio"] else "")]
    for tid, t in report["teachers"].items():
        lines.append(f"teacher {tid}: {t['model']} ({t['weights_source']}, sha256 {t['weights_sha256'][:16]}...), "
                     f"{t['num_classes']} classes, input {t['input_size']}")
        feature = f", {t['feature_bytes_per_view']:.1f} B/view features (D={t['feature_dim']})" \
            if t["feature_dim"] else ""
        lines.append(f"  coverage {t['coverage']:.1%} ({t['shards_done']}/{report['dataset']['num_shards']} shards), "
                     f"{t['bytes_per_view']:.1f} B/view logits{feature}")
    return lines


def _plot_temperature(temperatures: tuple[float, ...]) -> tuple[int, float]:
    """(column, temperature) shown by the plot: T = 1 if cached, else the first cached temperature."""
    column = next((i for i, t in enumerate(temperatures) if t == 1.0), 0)
    return column, temperatures[column]


def plot_store(path: str, png: str, max_rows: int = 100_000) -> None:
    """Per-teacher confidence and entropy histograms and the teachers' top-1 agreement matrix."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    store = CacheStore.open(path)
    ids = store.teacher_ids
    column, temperature = _plot_temperature(store.config.temperatures)
    rows = {tid: np.flatnonzero(store.cached_rows(tid))[:max_rows] for tid in ids}
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    top1 = {}
    for tid in ids:
        group = store.teacher(tid)
        if not len(rows[tid]):
            continue
        logprob = group["topk_logprob"].get_orthogonal_selection((rows[tid], slice(None), slice(None)))
        leftover = group["log_leftover"].get_orthogonal_selection((rows[tid], slice(None), column))
        confidence, entropy = confidence_and_entropy(logprob, leftover, store.teacher_record(tid)["num_classes"],
                                                     temperature)
        axes[0].hist(confidence.ravel(), bins=50, range=(0, 1), alpha=0.5, label=tid)
        axes[1].hist(entropy.ravel(), bins=50, alpha=0.5, label=tid)
        top1[tid] = group["topk_index"].get_orthogonal_selection((rows[tid], slice(None), 0))
    axes[0].set(title=f"confidence (max probability, T={temperature:g})", xlabel="p", ylabel="views")
    axes[1].set(title=f"entropy (T={temperature:g})", xlabel="nats")
    for ax in axes[:2]:
        ax.legend()
    agreement = np.full((len(ids), len(ids)), np.nan)
    for i, a in enumerate(ids):
        for j, b in enumerate(ids):
            if a in top1 and b in top1:
                common = np.intersect1d(rows[a], rows[b])
                ia, ib = np.searchsorted(rows[a], common), np.searchsorted(rows[b], common)
                if len(common):
                    agreement[i, j] = (top1[a][ia] == top1[b][ib]).mean()
    image = axes[2].imshow(agreement, vmin=0, vmax=1, cmap="viridis")
    axes[2].set(title="top-1 agreement", xticks=range(len(ids)), yticks=range(len(ids)))
    axes[2].set_xticklabels(ids, rotation=45, ha="right")
    axes[2].set_yticklabels(ids)
    for i in range(len(ids)):
        for j in range(len(ids)):
            if not np.isnan(agreement[i, j]):
                axes[2].text(j, i, f"{agreement[i, j]:.2f}", ha="center", va="center", color="w")
    fig.colorbar(image, ax=axes[2])
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
