"""Session set-up shared by every test: two simulated CPU devices, XLA defaults, one compilation cache.

The PyTorch peers and test oracles are the package `peers` (tests/peers/), importable because pytest puts
this folder on sys.path."""

import os
import tempfile

# Tests run on the CPU; two simulated devices let the data-parallel tests compare 1 and 2 devices
# in one process. Must be set before jax is imported anywhere. Environment variables rather than
# chex.set_n_cpu_devices: the subprocesses of the CLI tests inherit them.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# One OpenMP thread for the PyTorch peers (read when torch starts): three xdist workers share two cores, and
# torch's waiting threads spin on them (three step-equality tests: 59 s of CPU with the default, 42 s with 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from mmard_jax import runtime, xla_env  # noqa: E402 - the entry point's CPU XLA defaults, before any backend starts

xla_env.apply_cpu_defaults()
# One persistent compilation cache for the whole session, shared by the xdist workers and inherited by the CLI
# tests' subprocesses: a program compiled by one test (the robust MLP's AutoAttack, a tiny trainer) is reused.
os.environ.setdefault("MMARD_XLA_CACHE", os.path.join(
    tempfile.gettempdir(), f"mmard_jax_test_xla_{os.environ.get('PYTEST_XDIST_TESTRUNUID', os.getpid())}"))
runtime.enable_compilation_cache(os.environ["MMARD_XLA_CACHE"])

# The slowest files first (CPU seconds of a quiet single-process run, 2026-12-06: tests/durations in the notes of
# issue 25; test_reliability.py's one reference run and test_swa.py's resume since), so that with
# `--dist loadfile --no-loadscope-reorder` no long file starts last while the other xdist workers sit idle (xdist's
# own reorder sorts files by their number of tests, which put a 53 s file near the end).
SLOWEST_FIRST = ("test_configs.py", "test_benchmark.py", "test_train_step.py", "test_reliability.py",
                 "test_published_steps.py", "test_models.py", "test_autoattack.py", "test_ciard.py",
                 "test_autoattack_original_l2.py", "test_robustness.py", "test_absld.py", "test_fair.py",
                 "test_swa.py", "test_autoattack_original.py", "test_convert.py", "test_gpu_check.py",
                 "test_models_any_size.py")


def pytest_collection_modifyitems(items):
    """Orders the files by SLOWEST_FIRST (the others after them, as collected); tests inside a file keep their
    order."""
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
