"""XLA flags measured to be faster for this workload, set in XLA_FLAGS before JAX starts its backend.

On XLA's CPU backend (jaxlib 0.10) convolutions are routed to YNNPACK fusions that ran on one thread of
this 2-core machine: 74 GFLOP/s for a 3x3 64->64 conv, against 155 GFLOP/s with the fusion off (Eigen,
all cores), and the whole MMARD step went from 1.98 s to 1.29 s (BENCHMARKS.md). The flag only exists
in the jaxlib versions listed here, and XLA aborts on unknown flags, so other versions are left alone.
Opt out with MMARD_JAX_XLA_DEFAULTS=0; a value the user already put in XLA_FLAGS always wins.
"""

import importlib.metadata
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


def apply_cpu_defaults() -> Tuple[str, ...]:
    """Appends the missing CPU flags to XLA_FLAGS (no effect once a JAX backend has started). Returns them."""
    if os.environ.get("MMARD_JAX_XLA_DEFAULTS", "1").lower() in ("0", "off", "false", "no"):
        return ()
    current = os.environ.get("XLA_FLAGS", "")
    added = cpu_flags_to_add(current, _jaxlib_version())
    if added:
        os.environ["XLA_FLAGS"] = " ".join((current,) + added).strip()
    return added
