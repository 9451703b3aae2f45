"""XLA flags measured to be faster for this workload, set in XLA_FLAGS before JAX starts its backend.

On XLA's CPU backend (jaxlib 0.10) convolutions are routed to YNNPACK fusions that ran on one thread of
this 2-core machine: 74 GFLOP/s for a 3x3 64->64 conv, against 155 GFLOP/s with the fusion off (Eigen,
all cores), and the whole MMARD step went from 1.98 s to 1.29 s (BENCHMARKS.md). The flag only exists
in the jaxlib versions listed here, and XLA aborts on unknown flags, so other versions are left alone.
They are a CPU measurement, so they are CPU-only by default: `apply_cpu_defaults` (called by each entry point
before JAX starts, never by `import mmard_jax`) adds them when JAX will run on the CPU (JAX_PLATFORMS=cpu, or
no GPU plugin installed). MMARD_JAX_XLA_DEFAULTS=1 adds them anyway, 0 never; a value the user already put in
XLA_FLAGS always wins.
"""

import importlib.metadata
import importlib.util
import os
from typing import Tuple

CPU_FLAGS: Tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=",)
JAXLIB_VERSIONS = ("0.10.",)  # where the flags were measured and exist


def _jaxlib_version() -> str:
    try:
        return importlib.metadata.version("jaxlib")
    except importlib.metadata.PackageNotFoundError:
        return ""


def cpu_flags_to_add(current: str, jaxlib_version: str) -> Tuple[str, ...]:
    """The CPU_FLAGS that `current` (an XLA_FLAGS value) does not set already, if this jaxlib has them."""
    if not jaxlib_version.startswith(JAXLIB_VERSIONS):
        return ()
    present = {token.split("=", 1)[0] for token in current.split()}
    return tuple(f for f in CPU_FLAGS if f.split("=", 1)[0] not in present)


def cpu_backend_expected() -> bool:
    """Whether JAX will compute on the CPU: JAX_PLATFORMS names cpu first, or no GPU plugin is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip().lower()
    if platforms:
        return platforms.split(",")[0] == "cpu"
    return not any(importlib.util.find_spec(m) for m in ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm7_plugin"))


def apply_cpu_defaults() -> Tuple[str, ...]:
    """Appends the missing CPU flags to XLA_FLAGS when JAX will run on the CPU (no effect once a JAX backend has
    started; entry points call it first). Returns the flags added."""
    mode = os.environ.get("MMARD_JAX_XLA_DEFAULTS", "auto").lower()
    if mode in ("0", "off", "false", "no") or (mode == "auto" and not cpu_backend_expected()):
        return ()
    current = os.environ.get("XLA_FLAGS", "")
    added = cpu_flags_to_add(current, _jaxlib_version())
    if added:
        os.environ["XLA_FLAGS"] = " ".join((current,) + added).strip()
    return added
