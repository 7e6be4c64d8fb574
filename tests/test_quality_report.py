"""docs/quality.md is generated from the study's saved runs: the numbers, verdicts and plots come
from the JSON, and the committed page is the one the committed runs give."""
import json
import os
import subprocess
import sys

import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.fixture
def report(monkeypatch):
    monkeypatch.syspath_prepend(BENCHMARKS)
    import quality_report

    return quality_report


RECIPE = {"img_size": 32, "batch_size": 64, "student_epochs": 2, "teacher_epochs": 2, "lr": 0.002,
          "label_weight": 1.0, "kd_weight": 1.0, "temperature": 1.0, "seeds": [0, 1, 2]}


def _save_runs(root, run: str, top1s: list[float]) -> None:
    for seed, top1 in enumerate(top1s):
        path = root / "mnist" / f"{run}-seed{seed}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        evals = [{"epoch": 1, "top1": top1 - 10}, {"epoch": 2, "top1": top1}]
        path.write_text(json.dumps({"dataset": "mnist", "run": run, "seed": seed, "recipe": RECIPE,
                                    "final": {"top1": top1, "ema_top1": top1 - 1}, "evals": evals, "seconds": 60.0,
                                    "machine": {"cpu": "test cpu", "cpus": 2}}))


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    _save_runs(root, "labels", [80.0, 81.0, 82.0])
    _save_runs(root, "kd-2t", [85.0, 86.0, 87.0])
    _save_runs(root, "kd-2t-kall", [86.0, 86.5, 87.0])
    _save_runs(root, "online-2t", [86.5, 86.0, 87.0])
    (root / "mnist" / "teacher-resnet10t.json").write_text(json.dumps(
        {"dataset": "mnist", "run": "teacher-resnet10t", "model": "resnet10t", "recipe": RECIPE,
         "final": {"top1": 93.9}, "seconds": 180.0}))
    (root / "mnist" / "stores.json").write_text(json.dumps({"v4-k5": {"seconds": 1.0}}))
    return root


def test_tables_are_computed_from_the_runs(report, results):
    page = report.render(report.studied(str(results)))
    rows = {line.split("|")[1].strip(): line for line in page.splitlines() if line.startswith("| `")}
    assert set(rows) == {"`labels`", "`kd-2t`", "`kd-2t-kall`", "`online-2t`"}
    assert "| 81.00 ± 1.00 (3) | 80.00 | - | -5.00 ± 1.63: worse |" in rows["`labels`"]
    # 86 - 81 = 5 points; standard error sqrt(1/3 + 1/3) = 0.816, twice that 1.63
    assert "| 86.00 ± 1.00 (3) | 85.00 | +5.00 ± 1.63: better | - |" in rows["`kd-2t`"]
    assert "Cached minus online, same teachers, same views, all classes: **+0.00 ± " in page
    assert "(within noise)" in page
    assert "Against labels only: better: `kd-2t`, `kd-2t-kall`, `online-2t`." in page
    assert "`resnet10t`: 93.90% val top-1 (2 epochs on labels, seed 0)" in page
    assert "Run time: 3 min for the teachers and 12 min for the 12 student runs" in page
    assert "Labels only gained +10.00 points of top-1 in its last epoch, mean over seeds (the students" in page


def test_a_difference_inside_twice_its_standard_error_is_within_noise(report):
    assert report.verdict(1.0, 0.6) == "within noise"
    assert report.verdict(1.3, 0.6) == "better" and report.verdict(-1.3, 0.6) == "worse"


def test_write_makes_the_page_and_its_plots(report, results, tmp_path):
    docs = tmp_path / "docs"
    path = report.write(str(results), str(docs))
    assert open(path).read() == report.render(report.studied(str(results)))
    for name in ("accuracy-vs-views.png", "accuracy-vs-topk.png", "curves.png"):
        assert (docs / "quality" / name).stat().st_size > 1000


def test_committed_page_is_the_one_the_committed_runs_give(report):
    results = os.path.join(BENCHMARKS, "results", "quality")
    page = os.path.join(BENCHMARKS, "..", "docs", "quality.md")
    assert open(page).read() == report.render(report.studied(results)), \
        "docs/quality.md is stale: run python benchmarks/quality_report.py"


def test_check_mode_reports_a_stale_page(tmp_path, results):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "quality.md").write_text("typed by hand\n")
    command = [sys.executable, os.path.join(BENCHMARKS, "quality_report.py"), "--results", str(results),
               "--docs", str(docs), "--check"]
    stale = subprocess.run(command, capture_output=True, text=True)
    assert stale.returncode == 1 and "is not current" in stale.stderr
    assert (docs / "quality.md").read_text() == "typed by hand\n"
