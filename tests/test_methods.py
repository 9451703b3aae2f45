"""The method table: each outer loss against a NumPy formula from DESIGN §2, needs, phases, lookup."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmard_jax import methods
from mmard_jax.methods import InnerInputs, Logits, StepInfo

B, C = 8, 10
INFO = StepInfo(epoch=jnp.asarray(100), lr_scale=jnp.asarray(1.0))


def sm(z, t=1.0):
    z = z / t
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def kl(s, t, tau=1.0):
    """KL(S, T) per example = sum p_T (log p_T - log p_S), DESIGN §2."""
    ps, pt = sm(s, tau), sm(t, tau)
    return np.sum(pt * (np.log(pt) - np.log(ps)), -1)


def ce(s, y):
    return -np.log(sm(s)[np.arange(len(y)), y])


def psi(nat, adv, y):
    oh = np.eye(nat.shape[-1])[y]
    d1, d2 = sm(nat) - oh, sm(adv) - oh
    return np.sum(d1 * d2, -1) / np.linalg.norm(d1, axis=-1) / np.linalg.norm(d2, axis=-1)


def huber(r, d=1.0):
    a = np.abs(r)
    return np.where(a <= d, 0.5 * r * r, d * (a - 0.5 * d))


@pytest.fixture
def lg():
    rng = np.random.default_rng(1)
    arrays = {k: rng.normal(0, 1.5, (B, C)) for k in ("s_adv", "s_nat", "t_nat", "t_adv", "t2_nat")}
    y = rng.integers(0, C, B)
    return arrays, y


def run_outer(method, arrays, y, phase="main", state=None, info=INFO):
    needs = method.outer_needs(phase)
    logits = Logits(**{k: (jnp.asarray(v, jnp.float32) if k in needs else None) for k, v in arrays.items()})
    state = method.init_state() if state is None else state
    return method.outer.loss(logits, jnp.asarray(y), state, method.hparams, info)


def reference(name, a, y):
    """Outer losses written from DESIGN §2's table and the baselines' published reductions."""
    s_adv, s_nat, t_nat, t_adv = a["s_adv"], a["s_nat"], a["t_nat"], a["t_adv"]
    if name == "nature":
        return ce(s_nat, y).mean()
    if name == "sat":
        return ce(s_adv, y).mean()
    if name == "trades":
        return ce(s_nat, y).mean() + 6.0 * kl(s_adv, s_nat).mean()
    if name == "ard":
        return 30.0**2 * kl(s_adv, t_nat, 30.0).mean() / C
    if name == "iad":
        trust = sm(t_adv)[np.arange(B), y] ** 0.1
        return np.mean(trust * kl(s_adv, t_nat) + (1 - trust) * kl(s_adv, s_nat))
    if name == "rslad":
        return (1 / 6) * kl(s_nat, t_nat).mean() / C + (5 / 6) * kl(s_adv, t_nat).mean() / C
    if name == "mmard":
        return kl(s_adv, t_adv).mean() + np.mean(huber(psi(s_nat, s_adv, y) - psi(t_nat, t_adv, y)))
    raise KeyError(name)


@pytest.mark.parametrize("name", ["nature", "sat", "trades", "ard", "iad", "rslad", "mmard"])
def test_outer_matches_reference(lg, name):
    arrays, y = lg
    loss, metrics, _ = run_outer(methods.get_method(name), arrays, y)
    np.testing.assert_allclose(loss, reference(name, arrays, y), rtol=2e-5)
    assert all(np.isfinite(v) for v in metrics.values())


def test_ard_with_alpha_below_one_adds_ce(lg):
    arrays, y = lg
    m = methods.get_method("ard", alpha=0.25, tau=4.0)
    want = 0.25 * 16.0 * kl(arrays["s_adv"], arrays["t_nat"], 4.0).mean() / C + 0.75 * ce(arrays["s_nat"], y).mean()
    np.testing.assert_allclose(run_outer(m, arrays, y)[0], want, rtol=2e-5)
    assert "s_nat" in m.outer_needs("main") and "s_nat" not in methods.get_method("ard").outer_needs("main")


def test_iad_warmup_phase_and_published_variant(lg):
    arrays, y = lg
    m = methods.get_method("iad")
    assert m.phase(59) == "warmup" and m.phase(60) == "main"
    assert m.outer_needs("warmup") == {"s_adv", "t_nat"}
    np.testing.assert_allclose(run_outer(m, arrays, y, "warmup")[0], kl(arrays["s_adv"], arrays["t_nat"]).mean(), rtol=2e-5)
    # IAD-I.py: the teacher term is not weighted by the trust.
    m1 = methods.get_method("iad", iad_weight_teacher_term=False)
    trust = sm(arrays["t_adv"])[np.arange(B), y] ** 0.1
    want = np.mean(kl(arrays["s_adv"], arrays["t_nat"]) + (1 - trust) * kl(arrays["s_adv"], arrays["s_nat"]))
    np.testing.assert_allclose(run_outer(m1, arrays, y)[0], want, rtol=2e-5)


def test_mmard_alpha_zero_is_eq4_and_needs_less(lg):
    arrays, y = lg
    m = methods.get_method("mmard", alpha=0.0)
    assert m.outer_needs("main") == {"s_adv", "t_adv"}
    np.testing.assert_allclose(run_outer(m, arrays, y)[0], kl(arrays["s_adv"], arrays["t_adv"]).mean(), rtol=2e-5)
    m2 = methods.get_method("mmard", alpha=2.0, trd_reduction="sum")
    want = kl(arrays["s_adv"], arrays["t_adv"]).mean() + 2.0 * np.sum(
        huber(psi(arrays["s_nat"], arrays["s_adv"], y) - psi(arrays["t_nat"], arrays["t_adv"], y))
    )
    np.testing.assert_allclose(run_outer(m2, arrays, y)[0], want, rtol=2e-5)


def test_mtard_weights_follow_published_update():
    """Three batches of MTARD against a plain-Python transcription of the published weight rule."""
    rng = np.random.default_rng(3)
    m = methods.get_method("mtard")
    state = m.init_state()
    w_nat, init_adv, init_nat, lr_w = 0.5, None, None, 0.025
    for step in range(3):
        a = {k: rng.normal(0, 1 + step, (B, C)) for k in ("s_adv", "s_nat", "t_nat", "t_adv", "t2_nat")}
        y = rng.integers(0, C, B)
        l_adv = kl(a["s_adv"], a["t_adv"]).mean() / C
        l_nat = kl(a["s_nat"], a["t2_nat"]).mean() / C
        init_adv = l_adv if init_adv is None else init_adv
        init_nat = l_nat if init_nat is None else init_nat
        r_adv, r_nat = l_adv / init_adv, l_nat / init_nat
        w_nat = w_nat - lr_w * 0.5 * (w_nat - r_nat / (r_adv + r_nat))
        loss, metrics, state = run_outer(m, a, y, state=state, info=StepInfo(jnp.asarray(0), jnp.asarray(0.5)))
        np.testing.assert_allclose(metrics["w_nat"], w_nat, rtol=1e-5)
        np.testing.assert_allclose(loss, (1 - w_nat) * l_adv + w_nat * l_nat, rtol=2e-5)
    assert w_nat != 0.5


def test_outer_uses_only_declared_forwards(lg):
    """Every outer runs when given only its declared forwards (others None), in every phase/variant."""
    arrays, y = lg
    variants = [methods.get_method(n) for n in methods.METHODS] + [
        methods.get_method("ard", alpha=0.5), methods.get_method("mmard", alpha=0.0)
    ]
    for m in variants:
        for phase in {m.phase(0), m.phase(10**6)}:
            loss, _, _ = run_outer(m, arrays, y, phase)
            assert np.isfinite(loss), (m.outer.name, phase)


def test_outer_gradient_reaches_declared_student_forwards(lg):
    arrays, y = lg
    for name in methods.METHODS:
        m = methods.get_method(name)
        needs = m.outer_needs("main")
        student = sorted(n for n in needs if n.startswith("s_"))

        def f(*s):
            full = {k: jnp.asarray(v, jnp.float32) for k, v in arrays.items()}
            full.update(dict(zip(student, s)))
            logits = Logits(**{k: (v if k in needs else None) for k, v in full.items()})
            return m.outer.loss(logits, jnp.asarray(y), m.init_state(), m.hparams, INFO)[0]

        grads = jax.grad(f, argnums=tuple(range(len(student))))(*(jnp.asarray(arrays[k]) for k in student))
        for k, g in zip(student, grads):
            assert np.abs(g).sum() > 0, (name, k)


def test_inner_objectives_use_only_declared_forwards(lg):
    arrays, y = lg
    assert methods.INNER["nature"].loss is None
    for name, inner in methods.INNER.items():
        if inner.loss is None:
            continue
        inp = InnerInputs(
            s_adv=jnp.asarray(arrays["s_adv"]), labels=jnp.asarray(y),
            t_adv=jnp.asarray(arrays["t_adv"]) if "t_iter" in inner.needs else None,
            s_nat=jnp.asarray(arrays["s_nat"]) if "s_nat" in inner.needs else None,
            t_nat=jnp.asarray(arrays["t_nat"]) if "t_nat" in inner.needs else None,
        )
        out = inner.loss(inp)
        assert out.shape == (B,) and np.all(np.isfinite(out)), name
    np.testing.assert_allclose(
        methods.INNER["mmard"].loss(InnerInputs(jnp.asarray(arrays["s_adv"]), jnp.asarray(y), t_adv=jnp.asarray(arrays["t_adv"]))),
        kl(arrays["s_adv"], arrays["t_adv"]), rtol=1e-5,
    )


def test_inner_and_outer_are_independent():
    m = methods.get_method("ard", inner="mmard")  # Table 6
    assert m.inner.name == "mmard" and m.outer.name == "ard" and m.inner.init == "gaussian"
    assert "inner:t_iter" in m.forwards("main") and "t_nat" in m.forwards("main")
    m = methods.get_method("mmard", inner="rslad")  # Figure 4, variant B
    assert m.inner.needs == {"t_nat"} and m.outer.name == "mmard"


def test_starts_follow_published_code():
    starts = {n: methods.INNER[n].init for n in methods.INNER}
    assert starts == {
        "nature": "none", "sat": "uniform", "trades": "gaussian", "ard": "uniform",
        "iad": "uniform", "rslad": "gaussian", "mtard": "gaussian", "mmard": "gaussian",
    }


def test_lookup_errors():
    with pytest.raises(ValueError, match="unknown method 'madry'.*mmard"):
        methods.get_method("madry")
    with pytest.raises(ValueError, match="unknown inner objective 'x'"):
        methods.get_method("ard", inner="x")
    with pytest.raises(ValueError, match="takes no hyper-parameter \\['gamma'\\].*alpha"):
        methods.get_method("mmard", gamma=1.0)
    with pytest.raises(ValueError, match="none"):
        methods.get_method("sat", beta=1.0)


def test_every_pair_resolves():
    for inner, outer in itertools.product(methods.INNER, methods.OUTER):
        m = methods.get_method(outer, inner=inner)
        assert m.forwards(m.phase(10**6)) >= m.outer_needs(m.phase(10**6))
