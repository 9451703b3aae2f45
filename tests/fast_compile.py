"""Jitted functions of the tests compiled with less XLA:CPU optimisation effort: their programs (tiny networks, a
few steps) take longer to compile than to run, and the lower effort compiles them ~1.5x faster (test_train_step.py:
147 -> 104 s of CPU). Not for programs that run long: the AutoAttack comparisons got slower with it, and the
tiny trainer runs of test_reliability.py (subprocesses, flags in XLA_FLAGS) gained nothing (132 vs 132 s of CPU)."""

from typing import Any, Callable, Dict

import jax
import numpy as np

# Also the options of the step-equality and step-memory tests' explicit compiles.
OPTIONS = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _signature(args) -> Any:
    """What a compiled executable is specific to: the pytree, each leaf's shape, dtype and placement."""
    leaves, tree = jax.tree.flatten(args)
    return tree, tuple((np.shape(a), str(getattr(a, "dtype", type(a))), str(getattr(a, "sharding", None)))
                       for a in leaves)


class FastCompiled:
    """`jitted`, compiled once per argument signature with OPTIONS (called under a trace: `jitted` itself); other
    attributes are the jitted function's."""

    def __init__(self, jitted: Callable):
        self._jitted = jitted
        self._compiled: Dict[Any, Callable] = {}

    def __call__(self, *args):
        if any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(args)):
            return self._jitted(*args)  # traced (eval_shape, make_jaxpr): nothing to compile
        key = _signature(args)
        if key not in self._compiled:
            self._compiled[key] = self._jitted.lower(*args).compile(compiler_options=OPTIONS)
        return self._compiled[key](*args)

    def __getattr__(self, name):
        return getattr(self._jitted, name)
