"""dvc.yaml lists, for each stage, exactly the code it runs, so DVC re-runs a stage when its code changes."""

from __future__ import annotations

import ast

import yaml

from stages.demo import ROOT


def stage_imports(module: str) -> set[str]:
    """The stages/*.py files `module` imports, directly or through other stages modules."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((ROOT / "stages" / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "stages":
                pending += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("stages."):
                pending.append(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                pending += [a.name.split(".")[1] for a in node.names if a.name.startswith("stages.")]
    return {f"stages/{name}.py" for name in seen}


def test_each_stage_depends_on_exactly_the_code_it_imports():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        declared = {dep for dep in stage["deps"] if dep.startswith("stages/")}
        assert declared == stage_imports(name), f"dvc.yaml deps of stage '{name}'"
        assert stage["cmd"].startswith(f"python -m stages.{name} ")
