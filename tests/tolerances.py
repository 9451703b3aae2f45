"""When two float32 results may differ, and by how much (docs/design.md, "Reproducibility: what is bitwise").

Bitwise equality is asserted only where the same program runs on the same shapes: the same step twice, a resumed
run against an uninterrupted one, a jitted function called again. Across batch shapes, device counts or process
counts the arithmetic is the same but its order is not: XLA's CPU matrix and convolution kernels block a reduction
by the batch size and by the processor (vector width, cache sizes), so a logit computed in a batch of 356 and in a
batch of 32 may differ in its last bits (seen on an AMD EPYC: 1.2e-6 on margins of logits of size ~3). Those
comparisons use the tolerances below, sized from float32's rounding, and the decisions taken from such values
(fooled or not, correct or not) are compared exactly only where the values are clear of the decision's threshold.
"""

import jax
import numpy as np

EPS = float(np.finfo(np.float32).eps)  # 2^-23: one unit in the last place of a float32 in [1, 2)
# Reordering a float32 dot product of n terms moves it by at most (n - 1) * EPS * sum|terms| (Higham, "Accuracy and
# Stability of Numerical Algorithms", 2nd ed., section 3.1); in practice the error is a random walk of ~sqrt(n)
# roundings of the partial sums. 64 units of the result's scale covers a random walk over 768 features
# (sqrt(768) = 28) with room for a second layer, and stays far below the differences a changed decision inside an
# attack would cause.
REORDER_ULPS = 64


def reorder_atol(scale: float, ulps: int = REORDER_ULPS) -> float:
    """Absolute tolerance for values built from reordered float32 sums whose partial sums are of size `scale`."""
    return ulps * EPS * float(scale)


def assert_close_reordered(actual, desired, scale: float, what: str = "", ulps: int = REORDER_ULPS):
    """`actual` equals `desired` up to the rounding of float32 sums of size `scale` added in another order."""
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), rtol=0, atol=reorder_atol(scale, ulps),
                               err_msg=what)


def assert_clear_of_zero(values, atol: float, what: str = ""):
    """Every value is farther than `atol` from 0, so a decision by its sign cannot flip under that much rounding."""
    values = np.asarray(values)
    near = np.flatnonzero(np.abs(values) <= atol)
    assert near.size == 0, f"{what}: {near.size} values within {atol:.2g} of 0 (e.g. {values[near[:5]]})"


def assert_trees_close(a, b, rtol: float, atol: float):
    """Two pytrees of arrays with the same structure agree leaf by leaf within (rtol, atol)."""
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b) and len(leaves_a) > 0
    for i, (x, y) in enumerate(zip(leaves_a, leaves_b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol, err_msg=f"leaf {i}")


def logit_margins(logits, labels):
    """Per example, the true class's logit minus the largest other: its sign is the 'correct' decision."""
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels)
    true = logits[np.arange(len(labels)), labels]
    others = logits.copy()
    others[np.arange(len(labels)), labels] = -np.inf
    return true - others.max(-1)


def assert_decisions_clear(logits, labels, what: str = "", ulps: int = REORDER_ULPS):
    """Every example's correct/incorrect decision survives a reordering of the sums behind its logits."""
    logits = np.asarray(logits)
    assert_clear_of_zero(logit_margins(logits, labels), reorder_atol(np.abs(logits).max(), ulps), what)
