"""The package's dependencies point one way (docs/design.md, "Direction of dependencies"): no import circle, and
files <- models <- checkpoints <- train / evaluate / interop, read from the source (every import, also inside
functions), so a new import that turns an arrow around fails here."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mmard_jax"


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path, modules) -> set:
    """The package's modules that `path` imports; `from pkg import sub` counts as `pkg.sub` (pkg already runs)."""
    name, found = module_name(path), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & modules
            found |= subs if subs else {base}
    return {m for m in found if m in modules and m != name}


@pytest.fixture(scope="module")
def graph():
    paths = list(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports(p, modules) for p in paths}


def reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_no_import_circle(graph):
    circles = {m: sorted(d for d in graph[m] if m in reachable(graph, d)) for m in graph if m in reachable(graph, m)}
    assert not circles, circles


@pytest.mark.parametrize("lower,higher", [
    ("mmard_jax.files", "mmard_jax.models"),
    ("mmard_jax.models", "mmard_jax.checkpoints"),
    ("mmard_jax.checkpoints", "mmard_jax.train"),
    ("mmard_jax.checkpoints", "mmard_jax.evaluate"),
    ("mmard_jax.evaluate", "mmard_jax.train"),
    ("mmard_jax.attacks", "mmard_jax.evaluator"),
    ("mmard_jax.models", "mmard_jax.interop"),
    ("mmard_jax.methods", "mmard_jax.train_step"),
    ("mmard_jax.methods", "mmard_jax.models"),  # methods see logits only
    ("mmard_jax.attacks", "mmard_jax.methods"),  # attacks see apply_fn and labels
    ("mmard_jax.errors", "mmard_jax"),  # errors.py imports nothing of the package
    ("mmard_jax.tensorstore_errors", "mmard_jax"),
    ("mmard_jax.distributed", "mmard_jax.stopping"),  # start-up knows nothing of stopping
    ("mmard_jax.models.store", "mmard_jax.checkpoints"),  # model directories know no training layout
])
def test_dependencies_point_one_way(graph, lower, higher):
    """Nothing in `lower` (a module or package) reaches anything in `higher`."""
    inside = [m for m in graph if m == lower or m.startswith(lower + ".")]
    wrong = {m: sorted(d for d in reachable(graph, m) if d == higher or d.startswith(higher + ".")) for m in inside}
    assert inside and not any(wrong.values()), {m: d for m, d in wrong.items() if d}


def test_reporting_files_and_train_do_not_speak_orbax():
    for name in ("files.py", "reporting.py", "train.py"):  # train.py leaves orbax to checkpoints.py
        tree = ast.parse((PACKAGE / name).read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert not any(n.startswith("orbax") for n in names), name


def test_private_jax_api_only_behind_its_adapter():
    """`jax._src` is imported by jax_internal.py alone (the one place that names the JAX version it was checked
    against); every other module uses public JAX API."""
    users = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if any(n == "jax._src" or n.startswith("jax._src.") for n in names):
                users.add(path.name)
    assert users == {"jax_internal.py"}, users
