"""Shared test fixtures: peer architecture code from the installed RobustBench package, RNG seeds."""

import functools
import importlib.util
import os
import pathlib
import sys
import tempfile

# Tests run on the CPU; two simulated devices let the data-parallel tests compare 1 and 2 devices
# in one process. Must be set before jax is imported anywhere. Environment variables rather than
# chex.set_n_cpu_devices: the subprocesses of the CLI tests inherit them.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from mmard_jax import runtime, xla_env  # noqa: E402 - the entry point's CPU XLA defaults, before any backend starts

xla_env.apply_cpu_defaults()
# One persistent compilation cache for the whole session, shared by the xdist workers and inherited by the CLI
# tests' subprocesses: a program compiled by one test (the robust MLP's AutoAttack, a tiny trainer) is reused.
os.environ.setdefault("MMARD_XLA_CACHE", os.path.join(
    tempfile.gettempdir(), f"mmard_jax_test_xla_{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))
runtime.enable_compilation_cache(os.environ["MMARD_XLA_CACHE"])

import pytest  # noqa: E402

TESTS_DIR = pathlib.Path(__file__).resolve().parent
NODEPS_INSTALL = "pip install --no-deps -r requirements-nodeps.txt"


def import_peer(name: str):
    """Imports a peer package of requirements-nodeps.txt; a missing one fails (never skips) the tests that use it."""
    if importlib.util.find_spec(name) is None:
        # A missing peer must fail the suite, not skip it: the comparisons are the point of these tests.
        raise RuntimeError(f"{name} is not installed: {NODEPS_INSTALL}")
    return importlib.import_module(name)


def _robustbench_arch_dir() -> pathlib.Path:
    spec = importlib.util.find_spec("robustbench")
    if spec is None or not spec.submodule_search_locations:
        # A missing peer must fail the suite, not skip it: the comparisons are the point of these tests.
        raise RuntimeError(f"robustbench is not installed: {NODEPS_INSTALL}")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model_zoo" / "architectures"


def load_robustbench_arch(module: str):
    """Loads `robustbench/model_zoo/architectures/<module>.py` without importing `robustbench`.

    `import robustbench` pulls in torchvision, which does not import beside the CPU torch used here,
    so the file is executed on its own (docs/design.md, "Teachers and conversion").
    """
    name = f"_rb_arch_{module}"
    if name in sys.modules:
        return sys.modules[name]
    path = _robustbench_arch_dir() / f"{module}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_script(name: str):
    """scripts/<name>.py as a module (scripts/ is not a package), loaded once per session."""
    key = f"_script_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, TESTS_DIR.parent / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


@functools.cache
def torch_mobilenet_v2():
    """The kuangliu-layout PyTorch MobileNetV2 of tests/torch_refs (not a package), loaded once."""
    spec = importlib.util.spec_from_file_location("_torch_ref_mobilenetv2", TESTS_DIR / "torch_refs" / "mobilenetv2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def rb_arch():
    """Fixture form of `load_robustbench_arch`."""
    return load_robustbench_arch
