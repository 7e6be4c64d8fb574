"""The docs' measured numbers are rendered from benchmarks/results/*.json by benchmarks/tables.py.

Every committed page with generated regions must match the committed results; a changed result
changes its own region and nothing else; a target counts as met only when its whole measured
spread clears it.
"""
import importlib.util
import json
import os
import shutil

import pytest

_spec = importlib.util.spec_from_file_location(
    "benchmark_tables", os.path.join(os.path.dirname(__file__), "..", "benchmarks", "tables.py"))
tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tables)


def _regions(text: str) -> dict[str, list[str]]:
    return {name: lines for name, lines in tables.split_regions(text, "page") if name}


@pytest.fixture
def copies(tmp_path):
    """A copy of the page and of the results, to change freely."""
    results, doc = tmp_path / "results", tmp_path / "benchmarks.md"
    shutil.copytree(tables.RESULTS, results)
    shutil.copy(tables.DOC, doc)
    return doc, results


def test_committed_page_matches_the_results(capsys):
    assert tables.main(["--check"]) == 0, capsys.readouterr().out


def test_every_page_with_generated_regions_is_checked_by_default():
    pages = [tables.README, *sorted(tables.DOCS.glob("*.md"))]
    with_regions = {page for page in pages if tables.OPEN.search(page.read_text())}
    assert with_regions <= set(tables.PAGES), sorted(str(p) for p in with_regions - set(tables.PAGES))


def test_a_changed_result_changes_exactly_its_region(copies):
    doc, results = copies
    path = results / "driver-scale.json"
    data = json.loads(path.read_text())
    data["steps"]["import_only"]["peak_rss_mb"] = 999.0
    path.write_text(json.dumps(data))
    before = doc.read_text()

    assert tables.main(["--check", "--doc", str(doc), "--results", str(results)]) == 1
    assert doc.read_text() == before  # --check writes nothing
    assert tables.main(["--doc", str(doc), "--results", str(results)]) == 0

    after = doc.read_text()
    changed = [(old, new) for old, new in zip(before.splitlines(), after.splitlines()) if old != new]
    assert len(before.splitlines()) == len(after.splitlines())
    assert len(changed) == 1 and "999 MB" in changed[0][1] and "999" not in changed[0][0]
    old_regions, new_regions = _regions(before), _regions(after)
    assert [n for n in old_regions if old_regions[n] != new_regions[n]] == ["driver-table"]
    assert tables.main(["--check", "--doc", str(doc), "--results", str(results)]) == 0


def test_unknown_region_and_missing_result_are_one_line_errors(tmp_path, capsys):
    doc = tmp_path / "page.md"
    doc.write_text("prose\n<!-- generated: no-such-table -->\n<!-- /generated: no-such-table -->\n")
    assert tables.main(["--check", "--doc", str(doc), "--results", str(tables.RESULTS)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown region 'no-such-table'" in err

    doc.write_text("<!-- generated: driver-table -->\n<!-- /generated: driver-table -->\n")
    assert tables.main(["--doc", str(doc), "--results", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "missing result file" in err and "driver-scale.json" in err


def test_a_target_is_met_only_when_the_whole_spread_clears_it():
    verdict, not_shown = tables.verdict, tables.NOT_SHOWN
    assert verdict([1.01, 1.30], ">", 1) == "met"
    assert verdict([0.99, 1.30], ">", 1) == not_shown
    assert verdict([1.00, 1.30], ">", 1) == not_shown  # touching the target is not clearing it
    assert verdict([0.80, 0.99], ">", 1) == "missed"
    assert verdict([0.85, 0.90], ">=", 0.85) == "met"
    assert verdict([3.2, 4.7], "<=", 4.6) == not_shown
    assert verdict([4.7], "<=", 4.6) == "missed"
    with pytest.raises(ValueError):
        verdict([], ">", 1)
    # A median speed-up of 1.003 whose reps overlap is not shown, whatever its median.
    regla = {"median_ms": 229.6, "times_ms": [207.0, 229.6, 244.0]}
    iformer = {"median_ms": 230.3, "times_ms": [213.0, 230.3, 265.0]}
    median, low, high = tables.ratio_spread(iformer, regla)
    assert median == pytest.approx(1.003, abs=1e-3)
    assert verdict([low, high], ">", 1) == not_shown


def test_quickstart_says_which_recipe_its_result_comes_from(copies):
    _, results = copies
    path = results / "quickstart-cpu.json"
    data = json.loads(path.read_text())
    data.pop("recipe", None)
    path.write_text(json.dumps(data))
    assert tables.REGIONS["quickstart"](results)[0] == tables.EARLIER_RECIPE
    path.write_text(json.dumps(data | {"recipe": "students 3 epochs"}))
    assert tables.REGIONS["quickstart"](results)[0] == "Recipe: students 3 epochs."
