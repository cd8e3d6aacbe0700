"""No private name of a third-party library is used outside lit_qlp/compat.

Two checks: a scan of the source for ``obj._name`` (and ``getattr(obj, "_name")``, ``from lib._private import``)
whose ``_name`` lit_qlp does not define itself; and, on the imported classes, that no lit_qlp class defines a
private name that one of its third-party base classes already has (which would silently override a library
internal, as a ``_setup_optimizer`` on a Lightning strategy did).
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import lit_qlp

PACKAGE = Path(lit_qlp.__file__).parent
COMPAT = PACKAGE / "compat"
# Documented public API despite the underscore: namedtuple methods.
PUBLIC_UNDERSCORED = {"_replace", "_asdict", "_fields", "_make"}


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def sources() -> list[tuple[Path, ast.Module]]:
    return [(path, ast.parse(path.read_text(), str(path))) for path in sorted(PACKAGE.rglob("*.py"))]


def own_names(trees: list[tuple[Path, ast.Module]]) -> set[str]:
    """Private names lit_qlp defines: functions, classes, module globals, and attributes it sets on self/cls."""
    names: set[str] = set()
    for _, tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    names.add(node.attr)
    return {name for name in names if is_private(name)}


def private_uses(path: Path, tree: ast.Module, own: set[str]) -> list[str]:
    found = []
    for node in ast.walk(tree):
        name = None
        if isinstance(node, ast.Attribute) and is_private(node.attr):
            name = node.attr
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1:
                argument = node.args[1]
                if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                    name = argument.value if is_private(argument.value) else None
        elif isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith("lit_qlp"):
            parts = node.module.split(".") + [alias.name for alias in node.names]
            if any(is_private(part) for part in parts):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)}")
            continue
        if name is not None and name not in own and name not in PUBLIC_UNDERSCORED:
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {ast.unparse(node)[:100]}")
    return found


def test_the_scan_finds_a_private_third_party_name():
    tree = ast.parse(
        "import x\nfrom lightning.fabric.utilities.types import _PATH\n"
        "def f(trainer):\n    trainer._logger_connector.reset()\n    getattr(trainer, '_every_n_epochs')\n"
        "    return trainer._mine\n"
    )
    uses = private_uses(PACKAGE / "example.py", tree, own={"_mine"})
    assert len(uses) == 3, uses
    assert "_PATH" in uses[0] or "_PATH" in "".join(uses)


def test_no_private_third_party_name_outside_compat():
    trees = sources()
    own = own_names(trees)
    uses = [use for path, tree in trees if COMPAT not in path.parents for use in private_uses(path, tree, own)]
    assert not uses, "private third-party names outside lit_qlp/compat (move them there):\n" + "\n".join(uses)


def body_names(node: ast.ClassDef) -> set[str]:
    """Private names a class statement defines in its own body."""
    names = set()
    for statement in node.body:
        if isinstance(statement, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(statement.name)
        elif isinstance(statement, (ast.Assign, ast.AnnAssign)):
            targets = statement.targets if isinstance(statement, ast.Assign) else [statement.target]
            names.update(target.id for target in targets if isinstance(target, ast.Name))
    return {name for name in names if is_private(name)}


def test_no_lit_qlp_class_overrides_a_private_name_of_a_third_party_base():
    clashes = []
    for path, tree in sources():
        if path.stem == "__main__":  # runs the CLI when imported
            continue
        module = importlib.import_module(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for node in tree.body:
            if not isinstance(node, ast.ClassDef) or not body_names(node):
                continue
            cls = getattr(module, node.name)
            foreign = [base for base in cls.__mro__[1:] if not base.__module__.startswith("lit_qlp")]
            for name in sorted(body_names(node)):
                owners = [base.__qualname__ for base in foreign if name in base.__dict__]
                if owners:
                    clashes.append(f"{cls.__module__}.{cls.__qualname__}.{name} overrides {owners[0]}.{name}")
    assert not clashes, "lit_qlp classes override private names of their third-party bases:\n" + "\n".join(clashes)
