"""Run metrics: one JSON object per line in ``RUN_DIR/metrics.jsonl``, and their plot.

Records have a ``kind``: ``train`` (step, epoch, lr, loss parts, images/s) or
``eval`` (epoch, top-1/top-5 of the model and of its EMA).

A local run appends to ``metrics.jsonl`` as it goes. Object stores cannot append, so a run
directory there gets parts instead: ``metrics/part-S.jsonl`` holds the records logged since
the previous part, up to step S, and is written whole at every flush (before every
checkpoint, and at the end). At the end the parts are also joined into ``metrics.jsonl``.
Readers take the parts when there are any, so they see every flushed record at any time.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import defaultdict
from typing import Any

from pipeline.data import storage

_PART = re.compile(r"^part-(\d{9})\.jsonl$")


def metrics_path(run_dir: str) -> str:
    return storage.join(str(run_dir), "metrics.jsonl")


def _parts_dir(run_dir: str) -> str:
    return storage.join(str(run_dir), "metrics")


def _part_steps(run_dir: str) -> list[int]:
    return sorted(int(m.group(1)) for name in storage.listdir(_parts_dir(run_dir)) if (m := _PART.match(name)))


def _part_path(run_dir: str, step: int) -> str:
    return storage.join(_parts_dir(run_dir), f"part-{step:09d}.jsonl")


def _lines(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def _parse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class MetricsLog:
    """Writes a run's records, dropping those a resumed run has already written.

    A killed run may have logged steps past its last checkpoint; the resumed run
    logs them again, so the log is first cut back to the checkpoint's step.
    """

    def __init__(self, run_dir: str, resume_step: int = 0):
        self.run_dir = str(run_dir)
        self.append = not storage.is_remote(self.run_dir)
        self.pending: list[dict[str, Any]] = []
        self.last_part: tuple[int, list[dict[str, Any]]] | None = None  # (step, records) of this log's last part
        kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= resume_step] if resume_step else []
        if self.append:
            path = storage.local_path(metrics_path(self.run_dir))
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "w") as f:
                f.write(_lines(kept))
            return
        # Parts past the resumed step are cut back to it (a part never straddles a checkpoint, since
        # one is flushed before every checkpoint; cutting also covers one that does).
        for step in _part_steps(self.run_dir):
            if step > resume_step:
                records = _parse(storage.read_text(_part_path(self.run_dir, step)))
                before = [r for r in records if r.get("step", 0) <= resume_step]
                if before:
                    storage.write_text(_part_path(self.run_dir, resume_step), _lines(before))
                storage.remove(_part_path(self.run_dir, step))
        storage.remove(metrics_path(self.run_dir))  # joined again at the end

    def write(self, record: dict[str, Any]) -> None:
        if self.append:
            with open(storage.local_path(metrics_path(self.run_dir)), "a") as f:
                f.write(json.dumps(record) + "\n")
        else:
            self.pending.append(record)

    def flush(self) -> None:
        """Make every record written so far visible to readers (one new part on object storage)."""
        if self.pending:
            step = max(r.get("step", 0) for r in self.pending)
            if self.last_part is not None and self.last_part[0] == step:  # more records of the last part's step
                self.pending = self.last_part[1] + self.pending
            storage.write_text(_part_path(self.run_dir, step), _lines(self.pending))
            self.last_part, self.pending = (step, self.pending), []

    def close(self) -> None:
        """Flush, and on object storage join the parts into ``metrics.jsonl``."""
        self.flush()
        if not self.append:
            storage.write_text(metrics_path(self.run_dir), _lines(read_metrics(self.run_dir)))


def read_metrics(run_dir: str) -> list[dict[str, Any]]:
    """Every record of a run, in order: from its parts when it has any, else from ``metrics.jsonl``."""
    run_dir = str(run_dir)
    steps = _part_steps(run_dir) if storage.is_remote(run_dir) else []
    if steps:
        return [r for step in steps for r in _parse(storage.read_text(_part_path(run_dir, step)))]
    path = metrics_path(run_dir)
    if not storage.exists(path):
        return []
    return _parse(storage.read_text(path))


def plot_curves(run_dir: str, out: str | None = None) -> str:
    """Losses against steps (left) and val accuracy against epochs (right), to ``RUN_DIR/curves.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out = str(out) if out else storage.join(str(run_dir), "curves.png")
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
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(out, buffer.getvalue())
    return out
