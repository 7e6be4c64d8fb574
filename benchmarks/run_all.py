"""Run every benchmark, each in a fresh process, then render docs/benchmarks.md from the results.

    python benchmarks/run_all.py                 # the full runs that docs/benchmarks.md documents (hours)
    python benchmarks/run_all.py --quick         # smoke runs; JSON under benchmarks/results/quick/
    python benchmarks/run_all.py --list [--quick]
    python benchmarks/run_all.py --only cache,loader

``STEPS`` below is the one list of commands: docs/benchmarks.md's "Reproduce" blocks are rendered
from it by benchmarks/tables.py, so the documented commands and this script cannot disagree.

Full mode runs each benchmark as documented (writing benchmarks/results/*.json), then the quality
study on both datasets, its report (docs/quality.md) and benchmarks/tables.py. Run it on an
otherwise idle machine: every benchmark compares timings taken on the same cores.

Quick mode runs each benchmark in its smoke mode, writing under benchmarks/results/quick/ so that
a smoke run never overwrites a recorded result, and aims at 10 minutes on 2 cores (the last run's
seconds per step: benchmarks/results/run-all-quick-mode.json, rendered in docs/benchmarks.md):

    models             bench_models.py --quick: regla_m and iformer_m, fp32, 224 and 512 px, batch 1
    make-shards        bench_make_shards.py: 200 images, 1 round
    cache              bench_cache.py --quick: 300 images in 2 shards, 1 round, 1 decode thread
    store-compression  bench_store_compression.py: 1 teacher epoch, 2 views, 2 of the 8 shards
    store-precision    bench_store_precision.py: 100 views
    loader             bench_loader.py --quick: 500 images in 2 shards, 1 round, 2 training steps
    driver             bench_driver.py --quick: the same steps, forked from one process that imported once
    train              bench_train.py --quick: 1 round of 4 steps
    estimate-imagenet  estimate_imagenet.py: arithmetic on the recorded results
    quality-mnist      quality_study.py --quick: labels and kd-2t, 1 seed, 1 epoch, 4 shards per split,
                       from scratch (its earlier quick output is removed first)

Left out of --quick: the two extra bench_models runs (batch 32 at 1024 px), bench_quickstart.py
(the whole quickstart, minutes, no smaller size: quickstart-cpu.json has its time), the patches
quality study, quality_report.py and tables.py (both render the recorded full results).

A step whose script is missing is reported as "missing" and skipped; it does not fail the run.
Each step runs with HF_HUB_OFFLINE=1, RAY_AUTH_MODE=disabled, RAY_USAGE_STATS_ENABLED=0 and this
checkout first on PYTHONPATH. A summary (step, seconds, exit code) is printed and saved to
benchmarks/results/run-all.json (run-all-quick-mode.json with --quick; an --only run's summary is
printed only, so that a part never replaces the recorded summary of a whole run); the exit code
is 1 if any step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = "benchmarks/results"
QUICK = "benchmarks/results/quick"
QUICK_QUALITY_WORK = "/tmp/regla-run-all-quick/mnist"
ENV = {"HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


@dataclass(frozen=True)
class Step:
    """One benchmark command: its full-run arguments and, if it has one, its smoke run's."""

    name: str
    section: str | None  # the docs/benchmarks.md section whose "Reproduce" block shows it
    script: str  # from the repository root
    args: tuple[str, ...]
    quick: tuple[str, ...] | None = None  # None: left out of --quick
    note: str = ""  # shown above the command in docs/benchmarks.md
    # Removed before the quick run: a step that resumes from its earlier output would otherwise skip its work.
    quick_fresh: tuple[str, ...] = ()

    def command(self, quick: bool = False) -> list[str]:
        args = self.quick if quick else self.args
        if args is None:
            raise ValueError(f"step {self.name} has no quick run")
        return ["python", self.script, *args]


STEPS: tuple[Step, ...] = (
    Step("models", "models", "benchmarks/bench_models.py",
         ("--max-time", "15", "--out", f"{RESULTS}/bench_models-cpu.json"),
         ("--quick", "--models", "regla_m,iformer_m", "--min-time", "0.3", "--max-time", "3",
          "--out", f"{QUICK}/bench_models-cpu.json"), note="the full sweep"),
    Step("models-b32-1024", "models", "benchmarks/bench_models.py",
         ("--models", "regla_m,iformer_m", "--img-sizes", "1024", "--batch-sizes", "32", "--rounds", "1",
          "--min-reps", "1", "--max-pixels-per-batch", "0", "--out", f"{RESULTS}/bench_models-cpu-b32-1024.json"),
         note="batch 32 at 1024 px, which the sweep skips on a CPU: the target pair only"),
    Step("models-elrf", "models", "benchmarks/bench_models.py",
         ("--models", "regla_m,regla_m(elrf_dw5_in_ffn=False),iformer_m", "--img-sizes", "512,1024",
          "--batch-sizes", "1,32", "--max-time", "15", "--out", f"{RESULTS}/bench_models-cpu-elrf-variants.json"),
         note="a second run of the target pair, with the ELRF switch"),
    Step("make-shards", "make-shards", "benchmarks/bench_make_shards.py",
         ("--rounds", "7", "--data", "/tmp/inet2000", "--out", f"{RESULTS}/make-shards.json"),
         ("--images", "200", "--rounds", "1", "--out", f"{QUICK}/make-shards.json"),
         note="--data keeps the images between runs"),
    Step("cache", "cache", "benchmarks/bench_cache.py",
         ("--images", "6000", "--workdir", "/tmp/bc_6k", "--out", f"{RESULTS}/cache-cpu.json"),
         ("--quick", "--decode-workers", "1", "--out", f"{QUICK}/cache-cpu.json"),
         note="--workdir keeps the images and shards between runs"),
    Step("store-compression", "store-compression", "benchmarks/bench_store_compression.py",
         ("--out", f"{RESULTS}/store-compression.json"),
         ("--epochs", "1", "--views", "2", "--shards", "2", "--out", f"{QUICK}/store-compression.json")),
    Step("store-precision", "store-precision", "benchmarks/bench_store_precision.py",
         ("--out", f"{RESULTS}/store-precision.json"),
         ("--views", "100", "--out", f"{QUICK}/store-precision.json")),
    Step("loader", "loader", "benchmarks/bench_loader.py",
         ("--workdir", "/tmp/bl_full", "--out", f"{RESULTS}/loader-cpu.json"),
         ("--quick", "--train-steps", "2", "--out", f"{QUICK}/loader-cpu.json"),
         note="--workdir keeps the data (shards and store) between runs"),
    Step("driver", "driver", "benchmarks/bench_driver.py",
         ("--out", f"{RESULTS}/driver-scale.json"),
         ("--quick", "--out", f"{QUICK}/driver-scale.json")),
    Step("train", "train", "benchmarks/bench_train.py",
         ("--out", f"{RESULTS}/train-cpu.json"),
         ("--quick", "--out", f"{QUICK}/train-cpu.json")),
    Step("quickstart", "quickstart", "benchmarks/bench_quickstart.py",
         ("--out", f"{RESULTS}/quickstart-cpu.json")),
    # After store-compression and cache: the estimate is arithmetic on their recorded results.
    Step("estimate-imagenet", None, "benchmarks/estimate_imagenet.py",
         ("--out", f"{RESULTS}/estimate-imagenet.json"),
         ("--out", f"{QUICK}/estimate-imagenet.json")),
    Step("quality-mnist", None, "benchmarks/quality_study.py", ("--dataset", "mnist"),
         ("--dataset", "mnist", "--arms", "labels,kd-2t", "--seeds", "0", "--quick",
          "--out", f"{QUICK}/quality/mnist", "--work", QUICK_QUALITY_WORK),
         quick_fresh=(f"{QUICK}/quality/mnist", QUICK_QUALITY_WORK)),
    Step("quality-patches", None, "benchmarks/quality_study.py", ("--dataset", "patches")),
    Step("quality-report", None, "benchmarks/quality_report.py", ()),
    Step("tables", None, "benchmarks/tables.py", ()),
)


def display(command: list[str]) -> str:
    return shlex.join(command)


def select(names: str | None, quick: bool) -> list[Step]:
    """The steps to run, in STEPS order; --only names must exist (and have a quick run with --quick)."""
    steps = [s for s in STEPS if s.quick is not None] if quick else list(STEPS)
    if not names:
        return steps
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = {s.name for s in STEPS}
    unknown = [n for n in wanted if n not in known]
    if unknown:
        sys.exit(f"error: unknown step(s) {', '.join(unknown)}; choose from {', '.join(s.name for s in STEPS)}")
    available = {s.name for s in steps}
    left_out = [n for n in wanted if n not in available]
    if left_out:
        sys.exit(f"error: not in --quick: {', '.join(left_out)}")
    return [s for s in steps if s.name in wanted]


def run_step(step: Step, quick: bool) -> dict:
    command = step.command(quick)
    record = {"name": step.name, "command": display(command), "seconds": 0.0, "exit_code": None}
    if not (ROOT / step.script).exists():
        print(f"[{step.name}] missing: {step.script} is not in this checkout; skipped", flush=True)
        return record | {"status": "missing"}
    print(f"[{step.name}] {display(command)}", flush=True)
    for path in step.quick_fresh if quick else ():
        shutil.rmtree(ROOT / path, ignore_errors=True)
    env = {**os.environ, **ENV,
           "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH"))))}
    started = time.perf_counter()
    # sys.executable, not "python": the interpreter (and venv) running this script.
    code = subprocess.run([sys.executable, *command[1:]], cwd=ROOT, env=env).returncode
    seconds = time.perf_counter() - started
    print(f"[{step.name}] exit {code} after {seconds:.0f} s", flush=True)
    return record | {"seconds": seconds, "exit_code": code, "status": "ok" if code == 0 else "failed"}


def summary_lines(records: list[dict]) -> list[str]:
    width = max(len(r["name"]) for r in records)
    lines = [f"{'step':<{width}}  {'seconds':>8}  exit code", "-" * (width + 21)]
    for r in records:
        code = r["status"] if r["exit_code"] is None else str(r["exit_code"])
        lines.append(f"{r['name']:<{width}}  {r['seconds']:>8.1f}  {code}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smoke runs, JSON under benchmarks/results/quick/")
    parser.add_argument("--only", metavar="NAME[,NAME]", help="run only these steps")
    parser.add_argument("--list", action="store_true", help="print the steps and their commands, run nothing")
    args = parser.parse_args()
    steps = select(args.only, args.quick)
    if args.list:
        width = max(len(s.name) for s in steps)
        for step in steps:
            missing = "" if (ROOT / step.script).exists() else "  (missing)"
            print(f"{step.name:<{width}}  {display(step.command(args.quick))}{missing}")
        return
    from bench_quickstart import cpu_model  # this folder is the script's first sys.path entry

    started = time.time()
    records = [run_step(step, args.quick) for step in steps]
    print("\n" + "\n".join(summary_lines(records)))
    code = 1 if any(r["status"] == "failed" for r in records) else 0
    if args.only:  # a part of the run: saving it would replace the recorded summary of a whole one
        sys.exit(code)
    out = ROOT / RESULTS / ("run-all-quick-mode.json" if args.quick else "run-all.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"mode": "quick" if args.quick else "full", "started": started,
                               "machine": {"cpu": cpu_model(), "cpus": os.cpu_count()},
                               "seconds": sum(r["seconds"] for r in records), "steps": records}, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}")
    sys.exit(code)


if __name__ == "__main__":
    main()
