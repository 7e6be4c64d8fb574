"""The main job as a user runs it: ``pipeline quickstart`` timed end to end, with the accuracies it reports.

Runs the console script in a fresh process (imports, Ray start-up and every stage included),
then reads each run's last evaluation from its ``metrics.jsonl`` and saves both.

    python benchmarks/bench_quickstart.py          # ~3-6 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

RESULTS = os.path.join(os.path.dirname(__file__), "results")
RUNS = {"teacher resnet10t": "teachers/resnet10t", "teacher convnext_atto": "teachers/convnext_atto",
        "student regla_t, KD from the cache": "students/kd", "student regla_t, labels only": "students/labels"}
# What `pipeline quickstart` runs (jobs/quickstart.py); saved with the result so that a result from an
# earlier recipe can be told apart.
RECIPE = ("teachers 2 epochs, students 3 epochs, batch 64, seed 0, 4 cached views, top-5; "
          "both students label weight 1.0, KD weight 1.0 vs 0 (labels only)")


def last_eval(run_dir: str) -> dict:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        evals = [record for record in map(json.loads, f) if record["kind"] == "eval"]
    return {k: evals[-1][k] for k in ("top1", "top5", "ema_top1")}


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        fields = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in f if ":" in line)}
    return f"{fields.get('model name', '')}, family {fields.get('cpu family', '')}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(RESULTS, "quickstart-cpu.json"))
    args = parser.parse_args()
    work = tempfile.mkdtemp(prefix="bench_quickstart_")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    command = [os.path.join(os.path.dirname(sys.executable), "pipeline"), "quickstart", "--out", work,
               "--no-progress"]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    seconds = time.perf_counter() - start
    result = {"benchmark": "pipeline quickstart", "command": "pipeline quickstart --out DIR --no-progress",
              "recipe": RECIPE, "seconds": seconds,
              "accuracy": {name: last_eval(os.path.join(work, d)) for name, d in RUNS.items()},
              "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
                          "python": sys.version.split()[0]}}
    print(json.dumps(result, indent=2))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
