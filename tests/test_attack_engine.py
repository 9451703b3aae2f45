"""The projected-gradient engine: feasibility invariants, an analytic reference, and every inner
objective of the method table rising over the PGD steps on a small model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from mmard_jax import methods
from mmard_jax.attacks import engine

EPS, STEP = 8 / 255, 2 / 255


def images(key, shape=(4, 8, 8, 3)):
    """Random images with many pixels exactly at 0 and 1, where clipping matters."""
    x = jax.random.uniform(key, shape, minval=-0.3, maxval=1.3)
    return jnp.clip(x, 0.0, 1.0)


@pytest.mark.parametrize("init", engine.INITS)
def test_iterates_stay_feasible(init):
    x = images(jax.random.key(0))
    w = jax.random.normal(jax.random.key(1), x.shape)
    objective = lambda z: jnp.sum(jnp.sin(10 * z) * w)  # noqa: E731 - many sign changes
    x_adv = engine.pgd(objective, x, eps=EPS, step_size=STEP, steps=7, init=init, rng=jax.random.key(2))
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(jnp.max(jnp.abs(x_adv - x))) <= EPS + 1e-7
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    x0 = engine.initial_point(jax.random.key(2), x, EPS, init)
    assert float(jnp.max(jnp.abs(x0 - x))) <= EPS + 1e-7 and float(x0.min()) >= 0 and float(x0.max()) <= 1


def test_linear_objective_matches_closed_form():
    """For sum(w * x) the ascent moves every pixel by eps in the direction sign(w), clipped to [0,1]."""
    x = images(jax.random.key(3))
    w = np.asarray(jax.random.normal(jax.random.key(4), x.shape))
    x_adv = engine.pgd(lambda z: jnp.sum(z * w), x, eps=EPS, step_size=STEP, steps=5)
    want = np.clip(np.asarray(x) + EPS * np.sign(w), 0, 1)
    np.testing.assert_allclose(x_adv, want, atol=1e-6)


def test_fgsm_is_one_step_of_size_eps():
    x = images(jax.random.key(5))
    w = jax.random.normal(jax.random.key(6), x.shape)
    objective = lambda z: jnp.sum(jnp.cos(3 * z) * w)  # noqa: E731
    g = jax.grad(objective)(x)
    want = jnp.clip(x + EPS * jnp.sign(g), 0, 1)
    np.testing.assert_allclose(engine.pgd(objective, x, eps=EPS, step_size=EPS, steps=1), want, atol=1e-7)


def test_reproducible_and_rng_dependent():
    x = images(jax.random.key(7))
    f = lambda z: jnp.sum(z**2)  # noqa: E731
    run = lambda k: engine.pgd(f, x, eps=EPS, step_size=STEP, steps=2, init="uniform", rng=jax.random.key(k))  # noqa: E731
    np.testing.assert_array_equal(run(1), run(1))
    assert not np.array_equal(run(1), run(2))


def test_unroll_and_jit_give_same_result():
    x = images(jax.random.key(8))
    w = jax.random.normal(jax.random.key(9), x.shape)
    f = lambda z: jnp.sum(jnp.tanh(5 * z - 2) * w)  # noqa: E731
    kw = dict(eps=EPS, step_size=STEP, steps=4, init="gaussian", rng=jax.random.key(1))
    a = engine.pgd(f, x, **kw)
    b = jax.jit(lambda x: engine.pgd(f, x, unroll=True, **kw))(x)
    np.testing.assert_allclose(a, b, atol=1e-7)


def test_gradient_is_with_respect_to_x_only():
    """Differentiating through pgd w.r.t. closed-over parameters sees x' as a constant."""
    x = images(jax.random.key(10))

    def outer(theta):
        x_adv = engine.pgd(lambda z: jnp.sum(theta * z), x, eps=EPS, step_size=STEP, steps=2)
        return jnp.sum(x_adv)

    assert float(jax.grad(outer)(1.0)) == 0.0


def test_bad_init():
    with pytest.raises(ValueError, match="init must be one of"):
        engine.pgd(jnp.sum, jnp.zeros((1, 2)), eps=EPS, step_size=STEP, steps=1, init="normal", rng=jax.random.key(0))
    with pytest.raises(ValueError, match="needs an rng"):
        engine.pgd(jnp.sum, jnp.zeros((1, 2)), eps=EPS, step_size=STEP, steps=1, init="uniform")


class SmallNet(nn.Module):
    """A small CNN with BatchNorm, standing in for student and teacher."""

    width: int = 8

    @nn.compact
    def __call__(self, x, train=False):
        x = nn.Conv(self.width, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = nn.Conv(2 * self.width, (3, 3), strides=2)(x)
        x = nn.relu(x)
        return nn.Dense(10)(x.mean((1, 2)))


@pytest.mark.parametrize("name", [n for n, o in methods.INNER.items() if o.loss is not None])
def test_every_inner_objective_rises(name):
    inner = methods.INNER[name]
    x = jax.random.uniform(jax.random.key(0), (16, 8, 8, 3))
    y = jax.random.randint(jax.random.key(1), (16,), 0, 10)
    student, teacher = SmallNet(8), SmallNet(16)
    sv = student.init(jax.random.key(2), x)
    tv = teacher.init(jax.random.key(3), x)
    s = lambda z: student.apply(sv, z)  # noqa: E731
    t = lambda z: teacher.apply(tv, z)  # noqa: E731
    consts = dict(
        s_nat=s(x) if "s_nat" in inner.needs else None,
        t_nat=t(x) if "t_nat" in inner.needs else None,
        p_nat=t(x) if "p_nat" in inner.needs else None,  # PeerAiD's peer: any fixed second network
        # SAAD: the input gradient of the teacher's label logit at x
        t_grad=jax.grad(lambda z: jnp.sum(jnp.take_along_axis(t(z), y[:, None], 1)))(x)
        if "t_grad" in inner.needs else None,
    )

    def objective(z):
        t_adv = t(z) if "t_iter" in inner.needs else None
        delta = z - x if "t_grad" in inner.needs else None
        return jnp.sum(inner.loss(methods.InnerInputs(s(z), y, t_adv=t_adv, delta=delta, hp=dict(inner.defaults),
                                                      **consts)))

    @jax.jit
    def values_after():
        return jnp.stack([value_after(k) for k in (0, 2, 5, 10)])

    def value_after(steps):
        x_adv = engine.pgd(objective, x, eps=EPS, step_size=STEP, steps=steps, init="gaussian", rng=jax.random.key(4))
        return objective(x_adv)

    values = [float(v) for v in values_after()]
    # A random small net has a flat loss surface: ask for a clear, not a large, rise.
    assert values[-1] > values[0] + 0.005 * abs(values[0]) + 1e-6, (name, values)
    assert values[1] > values[0] and values[2] > values[1], (name, values)


def test_carry_threads_state_through_the_iterates():
    """With a carry the objective's state passes from iterate to iterate (the student's BatchNorm statistics
    when it attacks in train mode): here a counter that every gradient evaluation increments."""
    x = jax.random.uniform(jax.random.key(0), (4, 8, 8, 3))

    def objective(z, count):
        return jnp.sum(jnp.sin(3 * z)), count + 1

    x_adv, count = jax.jit(lambda x: engine.pgd(objective, x, eps=EPS, step_size=STEP, steps=7, carry=jnp.int32(0)))(x)
    assert int(count) == 7
    plain = engine.pgd(lambda z: jnp.sum(jnp.sin(3 * z)), x, eps=EPS, step_size=STEP, steps=7)
    # The two programs may round sin's gradient differently; only its sign moves an iterate, and every gradient
    # along the way is clear of 0 by far more than a rounding (so the iterates must be bitwise equal).
    for k in range(7):
        z = engine.pgd(lambda z: jnp.sum(jnp.sin(3 * z)), x, eps=EPS, step_size=STEP, steps=k)
        tolerances.assert_clear_of_zero(3 * jnp.cos(3 * z), 1e-4, f"gradient at iterate {k}")
    np.testing.assert_array_equal(x_adv, plain)  # the same iterates with or without a carry


# L2 ------------------------------------------------------------------------------------------------------------

EPS_L2 = 0.5


def l2(v) -> np.ndarray:
    """Per-example L2 norms of a batch, in float64."""
    v = np.asarray(v, np.float64)
    return np.sqrt(np.sum(v.reshape(len(v), -1) ** 2, axis=1))


@pytest.mark.parametrize("init", engine.INITS)
@pytest.mark.parametrize("per_example_keys", [False, True])
def test_l2_iterates_stay_feasible(init, per_example_keys):
    x = images(jax.random.key(0))
    w = jax.random.normal(jax.random.key(1), x.shape)
    objective = lambda z: jnp.sum(jnp.sin(10 * z) * w)  # noqa: E731
    rng = jax.random.split(jax.random.key(2), len(x)) if per_example_keys else jax.random.key(2)
    x_adv = engine.pgd(objective, x, eps=EPS_L2, step_size=0.2, steps=7, init=init, rng=rng, norm="L2")
    for x_out in (x_adv, engine.initial_point(rng, x, EPS_L2, init, norm="L2")):
        assert x_out.shape == x.shape and x_out.dtype == x.dtype
        assert l2(x_out - x).max() <= EPS_L2 + 1e-6
        assert float(x_out.min()) >= 0.0 and float(x_out.max()) <= 1.0
    assert l2(x_adv - x).min() > 0.1  # the ascent moved every example


@pytest.mark.parametrize("step_size", [0.2, 0.9], ids=["inside", "projected"])
def test_l2_step_matches_numpy_reference(step_size):
    """One L2 step from x: x + step * g / ||g||_2, its offset scaled back to norm eps when longer, then clipped
    to [0, 1]; g of sum(cos(3z) w) is -3 sin(3x) w."""
    x = images(jax.random.key(5))
    w = jax.random.normal(jax.random.key(6), x.shape)
    got = engine.pgd(lambda z: jnp.sum(jnp.cos(3 * z) * w), x, eps=EPS_L2, step_size=step_size, steps=1, norm="L2")
    xn, wn = np.asarray(x, np.float64), np.asarray(w, np.float64)
    g = -3 * np.sin(3 * xn) * wn
    d = step_size * g / l2(g).reshape(-1, 1, 1, 1)
    d *= np.minimum(1.0, EPS_L2 / l2(d)).reshape(-1, 1, 1, 1)
    want = np.clip(xn + d, 0, 1)
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert (l2(d) < EPS_L2 - 1e-3).all() == (step_size < EPS_L2)  # both branches of the projection exercised


def test_l2_uniform_start_is_uniform_in_the_ball():
    """In 2-D (no clipping: x = 0.5, eps 0.4), a uniform point of the disc falls within half the radius with
    probability 1/4, and in each quadrant with probability 1/4."""
    x = jnp.full((4000, 2), 0.5)
    noise = np.asarray(engine.initial_point(jax.random.key(3), x, 0.4, "uniform", norm="L2")) - 0.5
    radius = np.hypot(noise[:, 0], noise[:, 1])
    assert radius.max() <= 0.4 + 1e-6
    assert abs(np.mean(radius < 0.2) - 0.25) < 0.03
    assert abs(np.mean((noise[:, 0] > 0) & (noise[:, 1] > 0)) - 0.25) < 0.03


def test_bad_norm():
    with pytest.raises(ValueError, match="norm must be one of"):
        engine.pgd(jnp.sum, jnp.zeros((1, 2)), eps=EPS, step_size=STEP, steps=1, norm="L1")
