"""XLA flags measured to be faster for this workload, set in XLA_FLAGS before JAX starts its backend.

On XLA's CPU backend (jaxlib 0.10) convolutions are routed to YNNPACK fusions that ran on one thread of
this 2-core machine: 74 GFLOP/s for a 3x3 64->64 conv, against 155 GFLOP/s with the fusion off (Eigen,
all cores), and the whole MMARD step went from 1.98 s to 1.29 s (BENCHMARKS.md). The flag only exists
in the jaxlib versions listed here, and XLA aborts on unknown flags, so other versions are left alone.
They are a CPU measurement, so they are CPU-only by default: `apply_cpu_defaults` (called first in each entry
point's main, before JAX starts a backend, never by `import mmard_jax`) adds them when JAX will run on the CPU
(JAX_PLATFORMS=cpu, or no GPU plugin installed). The entry points' flag --xla_cpu_defaults=auto|on|off chooses
(`define_flags`); its default comes from $MMARD_JAX_XLA_DEFAULTS (1/on: always, 0/off: never, else auto). A value
the user already put in XLA_FLAGS always wins.
"""

import importlib.metadata
import importlib.util
import os
from typing import Mapping, Optional, Tuple

from absl import flags

CPU_FLAGS: Tuple[str, ...] = ("--xla_cpu_experimental_ynn_fusion_type=",)
JAXLIB_VERSIONS = ("0.10.",)  # where the flags were measured and exist
DEFAULTS_ENV = "MMARD_JAX_XLA_DEFAULTS"  # the documented default of --xla_cpu_defaults
MODES = ("auto", "on", "off")
_OFF = ("0", "off", "false", "no")


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


def default_mode(environ: Optional[Mapping[str, str]] = None) -> str:
    """The mode $MMARD_JAX_XLA_DEFAULTS names: 'off' for 0/off/false/no, 'auto' when unset or auto, else 'on'."""
    value = (os.environ if environ is None else environ).get(DEFAULTS_ENV, "").strip().lower()
    return "off" if value in _OFF else "auto" if value in ("", "auto") else "on"


def define_flags() -> None:
    """--xla_cpu_defaults, for the entry points (its default from the environment, `default_mode`)."""
    flags.DEFINE_enum("xla_cpu_defaults", default_mode(), MODES,
                      f"The measured XLA CPU flags {' '.join(CPU_FLAGS)}: auto (when JAX runs on the CPU), on, off "
                      f"(default: ${DEFAULTS_ENV}, else auto; a value in XLA_FLAGS wins).")


def apply_cpu_defaults(mode: Optional[str] = None) -> Tuple[str, ...]:
    """Appends the missing CPU flags to XLA_FLAGS in `mode` ('auto' | 'on' | 'off'; None: `default_mode()`), 'auto'
    when JAX will run on the CPU (no effect once a JAX backend has started: entry points call it first in main).
    Returns the flags added."""
    mode = default_mode() if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"xla_cpu_defaults must be one of {MODES}, got {mode!r}")
    if mode == "off" or (mode == "auto" and not cpu_backend_expected()):
        return ()
    current = os.environ.get("XLA_FLAGS", "")
    added = cpu_flags_to_add(current, _jaxlib_version())
    if added:
        os.environ["XLA_FLAGS"] = " ".join((current,) + added).strip()
    return added
