"""The package's dependencies point one way (docs/design.md, "Direction of dependencies"): no import circle, and
files <- models <- checkpoints <- train / evaluate / interop, read from the source (every import, also inside
functions), so a new import that turns an arrow around fails here. Around the package: scripts import the package
(and tests/peers), never the reverse; tests import the package and tests/peers, never a script."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "mmard_jax"
TESTS = pathlib.Path(__file__).resolve().parent
SCRIPTS = PACKAGE.parent / "scripts"
SCRIPT_MODULES = {p.stem for p in SCRIPTS.glob("*.py")}


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


def top_level_imports(path: pathlib.Path) -> set:
    """The first component of every absolute import in `path` (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_the_package_imports_no_script_and_no_test_peer():
    """scripts/ and tests/ (tests/peers: PyTorch peers, test oracles) sit above the package: it never imports them."""
    assert SCRIPT_MODULES and (TESTS / "peers" / "__init__.py").is_file()
    outside = {"scripts", "tests", "peers", "conftest"} | SCRIPT_MODULES
    wrong = {str(p.relative_to(PACKAGE)): sorted(top_level_imports(p) & outside) for p in PACKAGE.rglob("*.py")}
    assert not any(wrong.values()), {k: v for k, v in wrong.items() if v}


def test_the_package_never_imports_torch_at_module_level():
    """PyTorch is optional for the package (convert/export import it where they need it)."""
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            wrong += [f"{path.relative_to(PACKAGE)}: {n}" for n in names if n.split(".")[0] == "torch"]
    assert not wrong, wrong


def test_tests_import_no_script():
    """Tests use the package and tests/peers; a script is a program (a test may run one as a subprocess)."""
    files = list(TESTS.rglob("*.py"))
    assert any(p.parent.name == "peers" for p in files)
    wrong = {str(p.relative_to(TESTS)): sorted(top_level_imports(p) & (SCRIPT_MODULES | {"scripts"})) for p in files}
    assert not any(wrong.values()), {k: v for k, v in wrong.items() if v}


LOADERS = ("spec_from_file_location", "SourceFileLoader", "load_source", "run_path")


def test_no_test_loads_a_script_by_file_path():
    """No call in tests/ that executes a file (importlib, runpy) names scripts/; the RobustBench loader of tests/peers
    is the one file loader there."""
    wrong = []
    for path in TESTS.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call):
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                if name in LOADERS and "scripts" in ast.unparse(node):
                    wrong.append(f"{path.relative_to(TESTS)}:{node.lineno}: {ast.unparse(node)}")
    assert not wrong, wrong


def test_no_script_loads_a_file_by_path():
    """A script is a thin program: it imports the package and tests/peers, and loads no script or other file by
    path (RobustBench's architecture files: peers.robustbench)."""
    for path in SCRIPTS.glob("*.py"):
        text = path.read_text()
        assert "spec_from_file_location" not in text and "load_script" not in text, path.name
