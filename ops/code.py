"""The project's own code a module runs, read from its imports.

Two things are made from it: a stage's code deps in dvc.yaml (its own file and every module of the
computing package it imports, directly or through other modules of that package; tests check
dvc.yaml against `code_deps`), and the code a logged model ships (`files_of`: the served model
carries only the modules it imports, not the whole project).

Imports are read from the source, functions' imports included (a module imported where it is
needed still runs), `if TYPE_CHECKING:` blocks excluded (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

#: The checkout: the folder that holds stages/, classifier/ and ops/.
ROOT = Path(__file__).resolve().parents[1]
#: The package that computes every output of the pipeline: the only code dvc.yaml lists.
COMPUTING = "classifier"
#: The project's top-level packages.
PACKAGES = ("stages", COMPUTING, "ops")


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """The source file of a project module (`classifier.model.heads`), None for anything else."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _runs(node: ast.AST) -> bool:
    """False for an `if TYPE_CHECKING:` block: what it imports is for type checkers only."""
    return not (isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test))


def imported(path: Path, root: Path = ROOT) -> set[str]:
    """The project modules the file at `path` imports, wherever in it (functions included)."""
    found: set[str] = set()
    pending: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                found |= {name for name in (f"{node.module}.{alias.name}", node.module) if module_file(name, root)}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if module_file(alias.name, root)}
        pending += [child for child in ast.iter_child_nodes(node) if _runs(child)]
    # `from classifier.model import heads` names the module, not the package's __init__ as well
    return {name for name in found if not any(other.startswith(name + ".") for other in found)}


def closure(module: str, follow: str = COMPUTING, root: Path = ROOT) -> set[str]:
    """`module` and the modules of the package `follow` it imports, directly or through them."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        name = pending.pop()
        path = module_file(name, root)
        if name in seen or path is None:
            continue
        seen.add(name)
        pending += [m for m in imported(path, root) if m == follow or m.startswith(follow + ".")]
    return seen


def files_of(modules: set[str], root: Path = ROOT) -> list[Path]:
    """The source files of `modules`, relative to `root`, with the __init__.py of every package
    above them (what an import of them needs), sorted."""
    files: set[Path] = set()
    for name in modules:
        path = module_file(name, root)
        if path is None:
            continue
        files.add(path.relative_to(root))
        parts = name.split(".")
        for depth in range(1, len(parts)):
            package = module_file(".".join(parts[:depth]), root)
            if package is not None:
                files.add(package.relative_to(root))
    return sorted(files)


def code_deps(stage: str, root: Path = ROOT) -> list[str]:
    """What dvc.yaml lists as the code of `stage`: stages/<stage>.py, then the computing package's
    modules it runs (not the packages' __init__.py files, which hold a docstring only)."""
    own = f"stages.{stage}"
    modules = closure(own, root=root) - {own}
    files = [path.as_posix() for path in files_of(modules, root) if path.name != "__init__.py"]
    return [f"stages/{stage}.py", *files]
