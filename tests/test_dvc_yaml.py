"""dvc.yaml declares, for each stage, exactly the code that computes its outputs, and outputs DVC's
run-cache can restore.

The rule: a stage depends on its own module and every `stages` module that module imports,
directly or through other stages modules, except the modules that only log (LOGGING_ONLY), which
are neither deps nor followed: what they import serves the logging alone. So editing the MLflow
code re-runs nothing, and editing anything that computes an output re-runs its stage.
"""

from __future__ import annotations

import ast

import yaml

from stages.demo import ROOT

#: Modules that only log to MLflow: no stage depends on them, and they write no DVC output.
LOGGING_ONLY = {"tracking", "serving"}
#: How the stages write their outputs: a logging-only module must call none of them.
WRITERS = ("write_json", "save_model", "atomic_path", "atomic_dir", "save_weights", "write_history")


def stages() -> dict:
    """dvc.yaml's stages by name; a `foreach` stage by its `do` template (one module for every item)."""
    return {
        name: spec.get("do", spec) for name, spec in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items()
    }


def imported_stage_modules(module: str) -> set[str]:
    """Names of the `stages` modules `module` imports anywhere in its code (functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / "stages" / f"{module}.py").read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "stages":
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[1] for a in node.names if a.name.startswith("stages.")}
    return names


def stage_deps(module: str) -> set[str]:
    """The stages/*.py files that compute what `module` writes, per the rule above."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen or name in LOGGING_ONLY:
            continue
        seen.add(name)
        pending += imported_stage_modules(name)
    return {f"stages/{name}.py" for name in seen}


def test_each_stage_depends_on_exactly_the_code_that_computes_its_outputs():
    for name, stage in stages().items():
        declared = {dep for dep in stage["deps"] if dep.startswith("stages/")}
        assert declared == stage_deps(name), f"dvc.yaml deps of stage '{name}'"
        assert stage["cmd"].startswith(f"python -m stages.{name} ")


def test_the_logging_modules_are_imported_by_stages_and_write_no_output():
    assert any("tracking" in imported_stage_modules(name) for name in stages()), "the rule's exception is in use"
    for module in LOGGING_ONLY:
        source = (ROOT / "stages" / f"{module}.py").read_text()
        assert not [w for w in WRITERS if w in source], f"stages/{module}.py writes files"


def test_the_package_file_changes_no_output():
    """stages/__init__.py runs in every stage but is no dep: besides its docstring it only sets
    environment defaults for log noise; it starts no process."""
    body = ast.parse((ROOT / "stages" / "__init__.py").read_text()).body
    imported = set()
    for node in ast.walk(ast.Module(body=body, type_ignores=[])):
        if isinstance(node, ast.Import):
            imported |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported |= {f"{node.module}.{alias.name}" for alias in node.names}
    assert imported == {"os"}
    calls = {
        ast.unparse(node.func)
        for node in ast.walk(ast.Module(body=body, type_ignores=[]))
        if isinstance(node, ast.Call)
    }
    assert calls == {"os.environ.setdefault"}, calls


def test_every_output_is_cached_or_a_metric():
    """DVC keeps a stage out of its run-cache when a plain output is not cached."""
    for name, stage in stages().items():
        for out in stage.get("outs", []):
            options = {} if isinstance(out, str) else next(iter(out.values())) or {}
            assert options.get("cache", True), f"stage '{name}': output {out} is not cached"
