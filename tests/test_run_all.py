"""benchmarks/run_all.py: which steps run, what a quick run starts from, and how failures are reported."""
import importlib.util
import os
import sys

import pytest

_spec = importlib.util.spec_from_file_location(
    "run_all", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "run_all.py"))
run_all = importlib.util.module_from_spec(_spec)
sys.modules["run_all"] = run_all  # its dataclasses resolve their annotations through sys.modules
_spec.loader.exec_module(run_all)


def test_every_quick_command_writes_under_the_quick_folder():
    for step in run_all.select(None, quick=True):
        outputs = [arg for flag, arg in zip(step.quick, step.quick[1:]) if flag == "--out"]
        assert all(out.startswith(run_all.QUICK) for out in outputs), step.name
        assert (run_all.ROOT / step.script).exists(), step.name


def test_only_refuses_unknown_steps_and_steps_without_a_quick_run():
    assert [s.name for s in run_all.select("train,cache", quick=True)] == ["cache", "train"]
    with pytest.raises(SystemExit, match="unknown step"):
        run_all.select("nope", quick=False)
    with pytest.raises(SystemExit, match="not in --quick"):
        run_all.select("quickstart", quick=True)


def test_quick_run_starts_fresh_and_a_failing_step_is_reported(tmp_path):
    earlier = tmp_path / "earlier-output"
    earlier.mkdir()
    (earlier / "run.json").write_text("{}")
    script = tmp_path / "bench.py"
    script.write_text("import os, sys\nsys.exit(0 if not os.path.exists(sys.argv[1]) else 3)\n")
    step = run_all.Step("probe", None, str(script), (str(earlier),), (str(earlier),), quick_fresh=(str(earlier),))

    full = run_all.run_step(step, quick=False)  # the full run resumes: the earlier output is kept
    assert full["status"] == "failed" and full["exit_code"] == 3 and earlier.exists()
    quick = run_all.run_step(step, quick=True)
    assert quick["status"] == "ok" and not earlier.exists()
