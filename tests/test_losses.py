"""Losses against NumPy formulas written from the paper (float64), plus gradient checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from mmard_jax import losses

B, C = 6, 10


def np_softmax(z):
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def np_onehot(y, c):
    return np.eye(c)[y]


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    s_nat, s_adv, t_nat, t_adv = (rng.normal(0, 2, (B, C)) for _ in range(4))
    y = rng.integers(0, C, B)
    return s_nat, s_adv, t_nat, t_adv, y


def test_cross_entropy_matches_numpy(data):
    s, _, _, _, y = data
    want = -np.log(np_softmax(s)[np.arange(B), y])
    np.testing.assert_allclose(losses.cross_entropy(jnp.asarray(s, jnp.float32), jnp.asarray(y)), want, rtol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 4.0, 30.0])
def test_kl_div_matches_numpy(data, temperature):
    s, _, t, _, _ = data
    ps, pt = np_softmax(s / temperature), np_softmax(t / temperature)
    want = np.sum(pt * (np.log(pt) - np.log(ps)), axis=-1)
    got = losses.kl_div(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temperature)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    assert np.all(np.asarray(got) >= -1e-6)


def test_kl_div_matches_torch_kldivloss(data):
    torch = pytest.importorskip("torch")
    s, _, t, _, _ = data
    ref = torch.nn.KLDivLoss(reduction="none")(
        torch.log_softmax(torch.tensor(s), 1), torch.softmax(torch.tensor(t), 1)
    ).sum(1).numpy()
    np.testing.assert_allclose(losses.kl_div(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)), ref,
                               rtol=1e-4, atol=1e-6)


def test_kl_div_is_zero_for_equal_inputs_and_finite_when_saturated():
    z = jnp.array([[100.0, -100.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(losses.kl_div(z, z), 0.0, atol=1e-6)
    assert np.all(np.isfinite(losses.kl_div(z[::-1], z)))


def np_psi(nat, adv, y):
    """Eq. 5 literally: cosine between (p(x) - y) and (p(x') - y)."""
    oh = np_onehot(y, nat.shape[-1])
    d1, d2 = np_softmax(nat) - oh, np_softmax(adv) - oh
    e1 = d1 / np.linalg.norm(d1, axis=-1, keepdims=True)
    e2 = d2 / np.linalg.norm(d2, axis=-1, keepdims=True)
    return np.sum(e1 * e2, -1)


def test_triangular_cos_matches_eq5(data):
    s_nat, s_adv, _, _, y = data
    got = losses.triangular_cos(jnp.asarray(s_nat, jnp.float32), jnp.asarray(s_adv, jnp.float32), jnp.asarray(y))
    np.testing.assert_allclose(got, np_psi(s_nat, s_adv, y), rtol=1e-5, atol=1e-6)
    # Same inputs give cos 0 = 1.
    np.testing.assert_allclose(losses.triangular_cos(jnp.asarray(s_nat), jnp.asarray(s_nat), jnp.asarray(y)), 1.0,
                               rtol=1e-6)


def test_triangular_cos_logit_option_matches_numpy(data):
    s_nat, s_adv, _, _, y = data
    oh = np_onehot(y, C)
    d1, d2 = s_nat - oh, s_adv - oh
    want = np.sum(d1 * d2, -1) / np.linalg.norm(d1, axis=-1) / np.linalg.norm(d2, axis=-1)
    got = losses.triangular_cos(jnp.asarray(s_nat), jnp.asarray(s_adv), jnp.asarray(y), use_probs=False)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_triangular_cos_finite_when_saturated():
    # p_y rounds to exactly 1 in float32: the literal formula divides 0 by 0; ours takes the limit.
    nat = jnp.array([[200.0, 3.0, 1.0, 0.0]])
    adv = jnp.array([[150.0, 0.0, 2.0, 1.0]])
    y = jnp.array([0])
    psi = losses.triangular_cos(nat, adv, y)
    g = jax.grad(lambda a: losses.triangular_cos(nat, a, y).sum())(adv)
    assert np.all(np.isfinite(psi)) and np.all(np.isfinite(g))
    # The limit direction only depends on the wrong-class logits: check it in float64 numpy.
    want = np_psi(np.array([[20.0, 3.0, 1.0, 0.0]]), np.array([[25.0, 0.0, 2.0, 1.0]]), np.array([0]))
    np.testing.assert_allclose(psi, want, rtol=1e-5)


def np_huber(r, delta):
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


@pytest.mark.parametrize("delta", [1.0, 0.05])
def test_trd_loss_matches_numpy(data, delta):
    s_nat, s_adv, t_nat, t_adv, y = data
    want = np.mean(np_huber(np_psi(s_nat, s_adv, y) - np_psi(t_nat, t_adv, y), delta))
    args = [jnp.asarray(a, jnp.float32) for a in (s_nat, s_adv, t_nat, t_adv)]
    got = losses.trd_loss(*args, jnp.asarray(y), delta)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    got_sum = losses.trd_loss(*args, jnp.asarray(y), delta, reduction="sum")
    np.testing.assert_allclose(got_sum, want * B, rtol=1e-5)
    with pytest.raises(ValueError, match="reduction"):
        losses.trd_loss(*args, jnp.asarray(y), delta, reduction="max")


def test_huber_is_smooth_l1():
    torch = pytest.importorskip("torch")
    r = np.linspace(-3, 3, 41)
    ref = torch.nn.functional.smooth_l1_loss(torch.tensor(r), torch.zeros(41, dtype=torch.float64), reduction="none",
                                             beta=1.0)
    np.testing.assert_allclose(losses.huber(jnp.asarray(r), 1.0), ref.numpy(), rtol=1e-6, atol=1e-7)


def test_trd_teacher_side_is_constant(data):
    s_nat, s_adv, t_nat, t_adv, y = (jnp.asarray(a) for a in data)
    grads = jax.grad(losses.trd_loss, argnums=(0, 1, 2, 3))(s_nat, s_adv, t_nat, t_adv, y)
    assert np.abs(grads[0]).sum() > 0 and np.abs(grads[1]).sum() > 0
    np.testing.assert_array_equal(grads[2], 0.0)
    np.testing.assert_array_equal(grads[3], 0.0)


def test_cw_margin_matches_numpy(data):
    s, _, _, _, y = data
    s = s * 40  # make some margins hit -kappa
    zy = s[np.arange(B), y]
    other = np.where(np_onehot(y, C) > 0, -np.inf, s).max(-1)
    want = np.maximum(zy - other, -50.0)
    np.testing.assert_allclose(losses.cw_margin(jnp.asarray(s, jnp.float32), jnp.asarray(y)), want, rtol=1e-5)


def test_dlr_losses_match_numpy(data):
    s, _, _, _, y = data
    zs = np.sort(s, -1)
    zy = s[np.arange(B), y]
    other = np.where(np_onehot(y, C) > 0, -np.inf, s).max(-1)
    want = -(zy - other) / (zs[:, -1] - zs[:, -3] + 1e-12)
    np.testing.assert_allclose(losses.dlr_loss(jnp.asarray(s, jnp.float32), jnp.asarray(y)), want, rtol=1e-4)
    t = (y + 1) % C
    want_t = -(zy - s[np.arange(B), t]) / (zs[:, -1] - 0.5 * (zs[:, -3] + zs[:, -4]) + 1e-12)
    np.testing.assert_allclose(
        losses.dlr_loss_targeted(jnp.asarray(s, jnp.float32), jnp.asarray(y), jnp.asarray(t)), want_t, rtol=1e-4
    )


def test_reduce_kl_class_mean():
    v = jnp.array([1.0, 3.0])
    assert float(losses.reduce_kl(v, 10, False)) == 2.0
    assert float(losses.reduce_kl(v, 10, True)) == pytest.approx(0.2)


def test_gradients(data):
    s_nat, s_adv, t_nat, t_adv, y = data
    y = jnp.asarray(y)
    with jax.enable_x64(True):
        a, b, c, d = (jnp.asarray(v, jnp.float64) for v in (s_nat, s_adv, t_nat, t_adv))
        kw = dict(order=1, modes=("rev",), atol=1e-5, rtol=1e-5)
        check_grads(lambda s: losses.cross_entropy(s, y).sum(), (a,), **kw)
        check_grads(lambda s, t: losses.kl_div(s, t, 2.0).sum(), (a, c), **kw)
        check_grads(lambda u, v: losses.triangular_cos(u, v, y).sum(), (a, b), **kw)
        check_grads(lambda u, v: losses.triangular_cos(u, v, y, use_probs=False).sum(), (a, b), **kw)
        check_grads(lambda u, v: losses.trd_loss(u, v, c, d, y), (a, b), **kw)
        check_grads(lambda s: losses.cw_margin(s, y).sum(), (a,), **kw)
        check_grads(lambda s: losses.dlr_loss(s, y).sum(), (a,), **kw)
        check_grads(lambda s: losses.dlr_loss_targeted(s, y, (y + 1) % C).sum(), (a,), **kw)


def test_shape_contract_is_checked_at_the_boundary():
    """The public losses refuse logits that are not [B, C] floats or labels that are not [B] integers."""
    logits, labels = jnp.zeros((4, 10)), jnp.zeros((4,), jnp.int32)
    with pytest.raises(AssertionError):
        losses.cross_entropy(jnp.zeros((4, 10, 1)), labels)
    with pytest.raises(AssertionError):
        losses.cross_entropy(logits, jnp.zeros((5,), jnp.int32))
    with pytest.raises(AssertionError):
        losses.cross_entropy(logits, jnp.zeros((4,)))  # float labels
    with pytest.raises(AssertionError):
        losses.kl_div(logits, jnp.zeros((4, 9)))
    assert losses.cross_entropy(logits, labels).shape == (4,)
