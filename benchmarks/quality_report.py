"""docs/quality.md and its plots, generated from the study's saved runs (benchmarks/results/quality/).

Nothing in the page is typed by hand: every number is read from a run's JSON here, so the
page cannot drift from the results. Rerun after adding runs:

    python benchmarks/quality_report.py
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DOCS = os.path.join(ROOT, "docs")
DATASET_NAMES = {"mnist": "MNIST sample (bundled, 4000 train / 1000 val digits, 10 classes)",
                 "patches": "scikit-image photo patches (2400 train / 720 val, 12 classes; benchmarks/photo_patches.py)"}
V_ARMS = {1: "kd-2t-v1", 4: "kd-2t", 16: "kd-2t-v16"}
K_ARMS = {1: "kd-2t-k1", 5: "kd-2t", 10: "kd-2t-k10", "all": "kd-2t-kall"}
CURVE_ARMS = ("labels", "kd-1t", "kd-2t", "kd-2t-kall", "online-2t")


def load(results: str) -> dict[str, dict[str, list[dict]]]:
    """dataset -> run name -> its saved runs (one per seed for students)."""
    runs: dict[str, dict[str, list[dict]]] = {}
    for path in sorted(glob.glob(os.path.join(results, "*", "*.json"))):
        with open(path) as f:
            run = json.load(f)
        if "run" in run:  # stores.json has no "run"
            runs.setdefault(run["dataset"], {}).setdefault(run["run"], []).append(run)
    return runs


def is_teacher(run_name: str) -> bool:
    return run_name.startswith("teacher-")


def stats(runs: list[dict], key: str = "top1") -> tuple[float, float, int]:
    values = [r["final"][key] for r in runs]
    spread = statistics.stdev(values) if len(values) > 1 else float("nan")
    return statistics.mean(values), spread, len(values)


def difference(a: list[dict], b: list[dict]) -> tuple[float, float]:
    """Mean of a minus mean of b, and the standard error of that difference."""
    (ma, sa, na), (mb, sb, nb) = stats(a), stats(b)
    return ma - mb, math.sqrt(sa ** 2 / na + sb ** 2 / nb)


def signed(delta: float) -> str:
    """+1.23 / -1.23, and +0.00 for a difference that rounds to zero (never -0.00)."""
    return f"{delta if round(delta, 2) else 0.0:+.2f}"


def verdict(delta: float, error: float) -> str:
    if math.isnan(error):
        return "one seed: no spread"
    return "within noise" if abs(delta) <= 2 * error else ("better" if delta > 0 else "worse")


def comparison(runs: dict[str, list[dict]], name: str, reference: str) -> str:
    if reference not in runs or name == reference:
        return "-"
    delta, error = difference(runs[name], runs[reference])
    return f"{signed(delta)} ± {2 * error:.2f}: {verdict(delta, error)}"


def arm_table(dataset: str, runs: dict[str, list[dict]]) -> list[str]:
    from quality_study import ARMS

    rows = ["| arm | what differs | val top-1 % (mean ± sd, n) | EMA top-1 % | vs labels only (± 2 se) "
            "| vs `kd-2t` (± 2 se) |",
            "|---|---|---|---|---|---|"]
    for name, arm in ARMS.items():
        if name not in runs:
            continue
        mean, sd, n = stats(runs[name])
        ema, _, _ = stats(runs[name], "ema_top1")
        rows.append(f"| `{name}` | {arm.description} | {mean:.2f} ± {sd:.2f} ({n}) | {ema:.2f} "
                    f"| {comparison(runs, name, 'labels')} | {comparison(runs, name, 'kd-2t')} |")
    return rows


def teacher_lines(runs: dict[str, list[dict]]) -> list[str]:
    teachers = sorted(filter(is_teacher, runs))
    return [f"- `{runs[t][0]['model']}`: {runs[t][0]['final']['top1']:.2f}% val top-1 "
            f"({runs[t][0]['recipe']['teacher_epochs']} epochs on labels, seed 0)" for t in teachers]


def summary(runs: dict[str, list[dict]]) -> list[str]:
    """The arms grouped by their verdict against labels only."""
    from quality_study import ARMS

    if "labels" not in runs:
        return []
    groups: dict[str, list[str]] = {}
    for name in ARMS:
        if name != "labels" and name in runs:
            groups.setdefault(verdict(*difference(runs[name], runs["labels"])), []).append(f"`{name}`")
    return ["Against labels only: " + "; ".join(f"{v}: {', '.join(names)}" for v, names in sorted(groups.items()))
            + "."]


def last_epoch_line(runs: dict[str, list[dict]]) -> list[str]:
    """How much labels only still gained in its last epoch: a large gain means the recipe stops early."""
    if "labels" not in runs or len(runs["labels"][0]["evals"]) < 2:
        return []
    gain = statistics.mean(r["evals"][-1]["top1"] - r["evals"][-2]["top1"] for r in runs["labels"])
    still = " (the students were still learning when the recipe stopped)" if gain > 1 else ""
    return [f"Labels only gained {signed(gain)} points of top-1 in its last epoch, mean over seeds{still}."]


def cached_vs_online(runs: dict[str, list[dict]]) -> list[str]:
    if "online-2t" not in runs or "kd-2t-kall" not in runs:
        return []
    delta, error = difference(runs["kd-2t-kall"], runs["online-2t"])
    return [f"Cached minus online, same teachers, same views, all classes: **{signed(delta)} ± {2 * error:.2f}** "
            f"points of top-1 ({verdict(delta, error)})."]


def plot_sweep(all_runs: dict, arms: dict, xlabel: str, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(all_runs), figsize=(5 * len(all_runs), 3.6), squeeze=False)
    for ax, (dataset, runs) in zip(axes[0], sorted(all_runs.items())):
        points = [(str(x), *stats(runs[arm])[:2]) for x, arm in arms.items() if arm in runs]
        if points:
            ax.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points], marker="o",
                        capsize=4, label="KD, two cached teachers")
        if "labels" in runs:
            mean, sd, _ = stats(runs["labels"])
            ax.axhline(mean, color="grey", linestyle="--", label="labels only")
            ax.axhspan(mean - sd, mean + sd, color="grey", alpha=0.15)
        ax.set_title(dataset)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("val top-1 % (mean ± sd over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(all_runs: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(all_runs), figsize=(5 * len(all_runs), 3.6), squeeze=False)
    for ax, (dataset, runs) in zip(axes[0], sorted(all_runs.items())):
        for arm in CURVE_ARMS:
            if arm not in runs:
                continue
            epochs = [e["epoch"] for e in runs[arm][0]["evals"]]
            means = [statistics.mean(r["evals"][i]["top1"] for r in runs[arm]) for i in range(len(epochs))]
            ax.plot(epochs, means, marker="o", label=arm)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(dataset)
        ax.set_xlabel("epoch")
        ax.set_ylabel("val top-1 % (mean over seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def recipe_line(runs: dict[str, list[dict]]) -> str:
    any_run = next(r[0] for name, r in runs.items() if not is_teacher(name))
    recipe = any_run["recipe"]
    machine = any_run.get("machine", {})
    return (f"Recipe (every arm): student `regla_t` at {recipe['img_size']} px, {recipe['student_epochs']} epochs, "
            f"batch {recipe['batch_size']}, lr {recipe['lr']}, label weight {recipe['label_weight']}, KD weight "
            f"{recipe['kd_weight']}, temperature {recipe['temperature']}, EMA 0.999, the cached views as the only "
            f"augmentation; seeds {', '.join(map(str, recipe['seeds']))}. Machine: {machine.get('cpu', '?')}, "
            f"{machine.get('cpus', '?')} CPUs.")


def run_time_line(runs: dict[str, list[dict]]) -> str:
    """What the runs cost, from their own timings (caching the stores comes on top)."""
    def minutes(names: list[str]) -> float:
        return sum(r["seconds"] for name in names for r in runs[name]) / 60

    teachers = [n for n in runs if is_teacher(n)]
    students = [n for n in runs if not is_teacher(n)]
    count = sum(len(runs[n]) for n in students)
    return (f"Run time: {minutes(teachers):.0f} min for the teachers and {minutes(students):.0f} min for the "
            f"{count} student runs, summed over runs (the study trains two at a time).")


def studied(results: str) -> dict[str, dict[str, list[dict]]]:
    """The datasets with at least one student run."""
    return {d: r for d, r in load(results).items() if not all(map(is_teacher, r))}


def render(all_runs: dict) -> str:
    """The page's markdown."""
    lines = [
        "# Distillation quality",
        "",
        "<!-- Generated by benchmarks/quality_report.py from benchmarks/results/quality/*/*.json; do not edit. -->",
        "",
        "Does a `regla_t` student learn more from cached teachers than from labels, and does the cache lose",
        "anything against running the same teachers live? Each arm below is one change to one shared recipe,",
        "trained with 3 seeds; the table gives the mean and standard deviation of the final val top-1. A",
        "difference is called *within noise* when it is no larger than twice its standard error",
        "(sqrt(sd1²/n1 + sd2²/n2)); with 3 seeds that is a coarse test, so small gaps say nothing either way.",
        "",
        "Reproduce (finished runs are kept and skipped, so an interrupted study continues):",
        "",
        "```bash",
        "python benchmarks/quality_study.py --dataset mnist",
        "python benchmarks/quality_study.py --dataset patches",
        "python benchmarks/quality_report.py                    # this page and docs/quality/*.png",
        "```",
        "",
        "How: `benchmarks/quality_study.py` makes the shards with `pipeline make-shards`, trains the two",
        "teachers (`resnet10t`, `convnext_atto`) on labels, caches both with the cache-teachers job once per",
        "store variant (V views, top-k), and trains each student with the Ray Train worker loop run directly",
        "(world size 1, one thread, two runs at a time). The labels-only arm replays the same cached views",
        "with the KD weight at 0, so the loss is the only thing it changes.",
        "",
        "Scope: both datasets are small 32-px images, and the teachers are small models trained here for a few",
        "epochs. These runs say nothing about the gain at ImageNet scale (1000 classes, confident teachers, 224 px).",
        "",
    ]
    for dataset, runs in sorted(all_runs.items()):
        lines += [f"## {DATASET_NAMES.get(dataset, dataset)}", "", recipe_line(runs), "", run_time_line(runs), "",
                  "Teachers:", "", *teacher_lines(runs), "", *arm_table(dataset, runs), "", *summary(runs), "",
                  *last_epoch_line(runs), "", *cached_vs_online(runs), ""]
    lines += ["## Plots", "",
              "![accuracy vs views](quality/accuracy-vs-views.png)", "",
              "![accuracy vs top-k](quality/accuracy-vs-topk.png)", "",
              "![training curves](quality/curves.png)", ""]
    return "\n".join(lines)


def write(results: str, docs: str) -> str:
    all_runs = studied(results)
    if not all_runs:
        raise SystemExit(f"no student runs under {results}: run benchmarks/quality_study.py first")
    figures = os.path.join(docs, "quality")
    os.makedirs(figures, exist_ok=True)
    plot_sweep(all_runs, V_ARMS, "cached views per image (V)", os.path.join(figures, "accuracy-vs-views.png"))
    plot_sweep(all_runs, K_ARMS, "classes kept per view (top-k)", os.path.join(figures, "accuracy-vs-topk.png"))
    plot_curves(all_runs, os.path.join(figures, "curves.png"))
    path = os.path.join(docs, "quality.md")
    with open(path, "w") as f:
        f.write(render(all_runs))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=os.path.join(HERE, "results", "quality"))
    parser.add_argument("--docs", default=DOCS)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/quality.md is not current (writes nothing)")
    args = parser.parse_args()
    if args.check:
        path = os.path.join(args.docs, "quality.md")
        current = open(path).read() if os.path.exists(path) else ""
        if current != render(studied(args.results)):
            raise SystemExit(f"{path} is not current: run python benchmarks/quality_report.py")
        print(f"{path} is current")
        return
    print(f"wrote {write(args.results, args.docs)}")


if __name__ == "__main__":
    main()
