"""Run metrics: one JSON object per line in ``RUN_DIR/metrics.jsonl``, and their plot.

Records have a ``kind``: ``train`` (step, epoch, lr, loss parts, images/s) or
``eval`` (epoch, top-1/top-5 of the model and of its EMA).
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "metrics.jsonl"


class MetricsLog:
    """Appends records to metrics.jsonl, dropping those a resumed run has already written.

    A killed run may have logged steps past its last checkpoint; the resumed run
    logs them again, so the log is first cut back to the checkpoint's step.
    """

    def __init__(self, run_dir: str | Path, resume_step: int = 0):
        self.path = metrics_path(run_dir)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= resume_step] if resume_step else []
        with self.path.open("w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = metrics_path(run_dir)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Losses against steps (left) and val accuracy against epochs (right), to ``RUN_DIR/curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    losses: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if r["kind"] == "train":
            for name, value in r.items():
                if name == "loss" or name.startswith("loss/"):
                    losses[name].append((r["step"], value))
    for name, points in sorted(losses.items()):
        ax_loss.plot(*zip(*points), label=name, linewidth=2 if name == "loss" else 1)
    ax_loss.set(xlabel="step", ylabel="loss", title="training losses")
    evals = [r for r in records if r["kind"] == "eval"]
    for name in ("top1", "top5", "ema_top1", "ema_top5"):
        points = [(r["epoch"], r[name]) for r in evals if r.get(name) is not None]
        if points:
            ax_acc.plot(*zip(*points), marker="o", label=name)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation")
    for ax in (ax_loss, ax_acc):
        if ax.lines:
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
