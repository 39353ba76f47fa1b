"""dvc.yaml declares, for each stage, exactly the code that computes its outputs, outputs DVC's
run-cache can restore, and the layout keeps that true.

The rule: a stage depends on its own module, stages/<name>.py, and on every module of the
computing package (classifier/) it imports, directly or through other modules of that package
(`ops.code.code_deps`). What records and serves results (ops/) is never a dep and never followed:
it imports the computing package, never the other way round, so editing the MLflow code re-runs
nothing, and editing anything that computes an output re-runs the stages that run it.
"""

from __future__ import annotations

import ast

import yaml

from ops.code import COMPUTING, PACKAGES, ROOT, closure, code_deps, imported, module_file

#: How stages write their outputs: a module of ops/ that a stage runs must call none of them.
WRITERS = ("write_json", "save_model", "atomic_path", "atomic_dir", "save_weights", "write_history")
#: The most lines a module may hold: past it, it holds more than one concern.
MAX_LINES = 420


def stages() -> dict:
    """dvc.yaml's stages by name; a `foreach` stage by its `do` template (one module for every item)."""
    return {
        name: spec.get("do", spec) for name, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()
    }


def modules(package: str) -> dict[str, object]:
    """Every module of `package`, by dotted name, with its file."""
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def test_each_stage_depends_on_exactly_the_code_that_computes_its_outputs():
    for name, stage in stages().items():
        declared = [dep for dep in stage["deps"] if dep.startswith(("stages/", f"{COMPUTING}/", "ops/"))]
        assert declared == code_deps(name), f"dvc.yaml deps of stage '{name}'"
        assert stage["cmd"].startswith(f"python -m stages.{name} ")


def test_stages_holds_the_stage_entry_points_only_and_none_imports_another():
    entry_points = {f"stages.{name}" for name in stages()} | {"stages"}
    assert set(modules("stages")) == entry_points
    for name, path in modules("stages").items():
        others = {m for m in imported(path) if m.startswith("stages.")}
        assert not others, f"{name} imports {others}"


def test_the_computing_package_imports_neither_the_stages_nor_ops():
    for name, path in modules(COMPUTING).items():
        outside = {m for m in imported(path) if not m.startswith(COMPUTING)}
        assert not outside, f"{name} imports {outside}"


def test_no_import_circle():
    graph = {name: imported(path) for package in PACKAGES for name, path in modules(package).items()}
    for start, imports in graph.items():
        reached, pending = set(), list(imports)
        while pending:
            name = pending.pop()
            if name not in reached:
                reached.add(name)
                pending += graph.get(name, ())
        assert start not in reached, f"{start} imports itself through {sorted(reached)}"


def test_no_module_holds_several_concerns():
    for package in PACKAGES:
        for name, path in modules(package).items():
            lines = len(path.read_text().splitlines())
            assert lines <= MAX_LINES, f"{name}: {lines} lines"


def test_what_a_stage_runs_of_ops_writes_no_output():
    """The stages run ops.runner (exit codes, messages) and ops.tracking (MLflow): no DVC output."""
    ran = set().union(*(closure(f"stages.{name}", follow="ops") for name in stages()))
    ops_modules = {name for name in ran if name.startswith("ops.")}
    assert "ops.tracking.runs" in ops_modules, "the rule's exception is in use"
    for name in ops_modules:
        source = module_file(name).read_text()
        assert not [w for w in WRITERS if f"{w}(" in source], f"{name} writes files"


def test_the_packages_init_files_change_no_output():
    """stages/__init__.py runs in every stage but is no dep: it holds its docstring alone. The other
    packages' __init__.py files hold a docstring, or (ops.tracking) the names they gather from their
    modules."""
    assert [type(s) for s in ast.parse((ROOT / "stages" / "__init__.py").read_text()).body] == [ast.Expr]
    for package in (COMPUTING, "ops"):
        for init in (ROOT / package).rglob("__init__.py"):
            statements = ast.parse(init.read_text()).body
            assert isinstance(statements[0], ast.Expr), f"{init} starts with its docstring"
            rest = [s for s in statements[1:] if not isinstance(s, ast.ImportFrom | ast.Assign)]
            assert not rest, f"{init} holds more than a docstring and names"


def test_every_output_is_cached_or_a_metric():
    """DVC keeps a stage out of its run-cache when a plain output is not cached."""
    for name, stage in stages().items():
        for out in stage.get("outs", []):
            options = {} if isinstance(out, str) else next(iter(out.values())) or {}
            assert options.get("cache", True), f"stage '{name}': output {out} is not cached"
