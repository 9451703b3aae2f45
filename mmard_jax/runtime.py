"""Process-level settings for the command-line programs: the XLA compilation cache and loop unrolling."""

import os
import pathlib
from typing import Optional, Union

import jax
from absl import flags, logging

CACHE_ENV = "MMARD_XLA_CACHE"  # the documented default of --compilation_cache


def default_cache_dir() -> str:
    """--compilation_cache's default: $MMARD_XLA_CACHE, else ~/.cache/mmard_jax/xla."""
    return os.environ.get(CACHE_ENV) or str(pathlib.Path.home() / ".cache/mmard_jax/xla")


def define_flags() -> None:
    """--compilation_cache, for the entry points that compile (its default from the environment)."""
    flags.DEFINE_string("compilation_cache", default_cache_dir(),
                        f"Directory of JAX's persistent compilation cache; 'off' disables it (default: ${CACHE_ENV}, "
                        f"else ~/.cache/mmard_jax/xla).")


def enable_compilation_cache(directory: Optional[str] = None) -> Optional[pathlib.Path]:
    """Turns on JAX's persistent compilation cache (also on CPU), so a rerun or a second model of the same
    architecture skips XLA compilation (measured: 11.6 s -> 3.9 s for a ResNet-18 PGD-20 evaluator on CPU).

    Directory: the argument (the entry points' --compilation_cache), else `default_cache_dir()`; 'off' disables.
    """
    directory = directory or default_cache_dir()
    if directory.lower() in ("off", "0", "none", ""):
        return None
    path = pathlib.Path(directory).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    return path


def resolve_unroll(setting: Union[str, int, bool]) -> Union[int, bool]:
    """The `unroll` of the PGD `lax.fori_loop`: 'auto' | 'full' | a positive integer (as int or string).

    'auto' keeps the loop rolled (1) everywhere. On this CPU kind with jaxlib 0.10 the rolled loop took 0.89-0.91x
    the unrolled one's step time for MMARD's WRN case, 0.91-0.97x for RSLAD's, 1.01x for MobileNetV2's, whose compile
    fell 34 -> 27 s (BENCHMARKS.md, 2026-12-07; the 1.6-4.4x the other way measured on 2026-11-22 predates the Eigen
    convolutions and the hand-written VJPs); on a GPU it waits for a measurement.
    """
    if isinstance(setting, bool):
        return setting
    text = str(setting).strip().lower()
    if text == "auto":
        return 1
    if text in ("full", "true"):
        return True
    if text.isdigit() and int(text) > 0:
        return int(text)
    raise ValueError(f"unroll must be 'auto', 'full' or a positive integer, got {setting!r}")


def quiet_logging() -> None:
    """absl INFO lines (orbax logs every checkpoint operation) only when the user asked with --verbosity."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
