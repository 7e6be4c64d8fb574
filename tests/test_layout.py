"""The package layout: pipeline's phases import only down the data flow, and no module borrows another's privates."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "teachers", "jobs", "regla")
# What each part may import from the project; data <- cache <- train, teachers used by cache and train
# (and reading weights through data's storage locations).
ALLOWED = {
    "pipeline.data": {"pipeline.data"},
    "pipeline.cache": {"pipeline.data", "pipeline.cache", "teachers", "regla"},
    "pipeline.train": {"pipeline.data", "pipeline.cache", "pipeline.train", "teachers", "regla"},
    "teachers": {"teachers", "regla", "pipeline.data"},
    "regla": {"regla"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _project_imports(tree: ast.AST) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for every import of a project module, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, []) for alias in node.names)
    return [(module, names) for module, names in found if module.split(".")[0] in PACKAGES]


def _part(module: str) -> str | None:
    for part in ALLOWED:
        if module == part or module.startswith(part + "."):
            return part
    return None


def _sources() -> list[Path]:
    return [p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))]


def test_pipeline_is_grouped_by_phase():
    flat = sorted(p.name for p in (ROOT / "pipeline").glob("*.py"))
    assert flat == ["__init__.py", "cli.py", "model_stats.py"]
    for phase in ("data", "cache", "train"):
        init = ROOT / "pipeline" / phase / "__init__.py"
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


def test_imports_point_down_the_data_flow():
    wrong = []
    for path in _sources():
        source = _module_name(path)
        part = _part(source)
        if part is None:  # jobs/ and the CLI sit above everything
            continue
        for module, _ in _project_imports(ast.parse(path.read_text())):
            target = _part(module) or module
            if target not in ALLOWED[part]:
                wrong.append(f"{source} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_no_module_imports_another_modules_private_names():
    wrong = []
    for path in _sources():
        for module, names in _project_imports(ast.parse(path.read_text())):
            wrong.extend(f"{_module_name(path)} imports {module}.{name}" for name in names
                         if name.startswith("_") and not name.startswith("__"))
    assert not wrong, "\n".join(wrong)
