"""CIARD, the row `ciard` (mmard_jax/methods/ciard.py): the loss, the push weight and the temperature update against
NumPy written from eminentgu/CIARD @93a9a2d CIARD.py:91-122, :212-251, the hyper-parameters, the forwards (S(x) and
R(x) before the attack), the robust teacher held before epoch 50, and the real step on 1 and 2 devices (the push
selection, the weight and the temperatures are of the global batch). Step equality with the script:
tests/test_published_steps.py::test_ciard_step_equals_the_published_script."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmard_jax import methods, parallel, train_step
from mmard_jax.methods import Logits, StepInfo
from test_train_step import IMG, CountingApply, SmallNet, init_vars, tiny

B, C = 12, 10
STATE = {"temp_adv": 2.0, "temp_nat": 1.5, "temp_rate": 1e-3}


def sm(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def log_sm(z):
    return np.log(sm(z))


def kl_script(a, b):
    return -a * b + np.log(b + 1e-5) * b  # CIARD.py:91-93


def scale(a, b, c):  # CIARD.py:99-109
    a, b, c = (v + 1e-7 if math.isclose(v, 0, rel_tol=1e-9) else v for v in (a, b, c))
    return 10 ** (min(math.floor(math.log10(abs(a))), math.floor(math.log10(abs(b)))) - math.floor(math.log10(abs(c))))


def ref(a, y, st, hp, epoch=3, main=True):
    """CIARD.py:212-251 and :290 in float64: (total, student loss, next temperatures, next rate)."""
    a = {k: v.astype(np.float64) for k, v in a.items()}
    pa, pn = sm(a["r_adv"] / st["temp_adv"]), sm(a["t2_nat"] / st["temp_nat"])
    kl1, kl2 = kl_script(log_sm(a["s_adv"]), pa).mean(), kl_script(log_sm(a["s_nat"]), pn).mean()
    ha, hn = (np.log(pa + 1e-5) * pa).mean(), (np.log(pn + 1e-5) * pn).mean()
    ta = min(max(st["temp_adv"] - st["temp_rate"] * np.sign(ha / hn - 1), hp["ciard_temp_min"]), hp["ciard_temp_max"])
    tn = min(max(st["temp_nat"] - st["temp_rate"] * np.sign(hn / ha - 1), hp["ciard_temp_min"]), hp["ciard_temp_max"])
    student = kl1 + kl2
    wrong = a["t2_adv"].argmax(1) != y
    if wrong.any():
        kl3 = kl_script(log_sm(a["s_adv"][wrong] / hp["push_temperature"]), sm(a["t2_adv"][wrong])).mean()
        student -= hp["ciard_push_lambda"] * scale(kl1, kl2, kl3) * kl3
    rate = st["temp_rate"] * (0.1 if epoch + 1 in (215, 260, 285) else 1.0)
    ce = -np.log(sm(a["r_adv"])[np.arange(len(y)), y]).mean()
    return student + (ce if main else 0.0), student, ta, tn, rate


@pytest.fixture
def lg():
    rng = np.random.default_rng(4)
    arrays = {k: rng.normal(0, 2.0, (B, C)).astype(np.float32) for k in ("s_adv", "s_nat", "r_adv", "t2_nat", "t2_adv")}
    y = rng.integers(0, C, B)
    y[:5] = arrays["t2_adv"][:5].argmax(1)  # the clean teacher right at x' on 5: pushed on the others
    return arrays, y


def loss_of(method, arrays, y, state=None, epoch=3, phase="main"):
    st = {k: jnp.asarray(v, jnp.float32) for k, v in (state or STATE).items()}
    info = StepInfo(epoch=jnp.asarray(epoch), lr_scale=jnp.asarray(1.0), phase=phase)
    return method.loss(Logits(**{k: jnp.asarray(v) for k, v in arrays.items()}), jnp.asarray(y), st, info)


@pytest.mark.parametrize("epoch,phase", [(3, "warmup"), (214, "main"), (230, "main")])
def test_loss_and_state_match_the_published_script(lg, epoch, phase):
    arrays, y = lg
    method = methods.get_method("ciard")
    assert method.phase(epoch) == phase
    loss, metrics, new = loss_of(method, arrays, y, epoch=epoch, phase=phase)
    total, student, ta, tn, rate = ref(arrays, y, STATE, method.hparams, epoch, main=phase == "main")
    np.testing.assert_allclose(float(loss), total, rtol=2e-5)
    np.testing.assert_allclose(float(metrics["student_loss"]), student, rtol=2e-5)
    pushed = int((arrays["t2_adv"].argmax(1) != y).sum())
    assert int(metrics["push_examples"]) == pushed and 0 < pushed < B and float(metrics["push_weight"]) > 0
    np.testing.assert_allclose([float(new["temp_adv"]), float(new["temp_nat"])], [ta, tn], rtol=1e-6)
    np.testing.assert_allclose(float(new["temp_rate"]), rate, rtol=1e-6)


def test_no_push_without_clean_teacher_mistakes(lg):
    arrays, y = lg
    y = arrays["t2_adv"].argmax(1)
    loss, metrics, _ = loss_of(methods.get_method("ciard"), arrays, y)
    assert float(metrics["push_weight"]) == 0 and int(metrics["push_examples"]) == 0 and np.isfinite(float(loss))
    np.testing.assert_allclose(float(metrics["student_loss"]),
                               float(metrics["kl_adv_radv"]) + float(metrics["kl_nat_t2nat"]), rtol=1e-6)


def test_every_hyper_parameter_changes_the_loss_or_is_refused(lg):
    """Each changes the loss, the next temperatures / rate, or the phase; bad values are refused."""
    arrays, y = lg
    base = methods.get_method("ciard")
    changed = {"push_temperature": 2.0, "ciard_push_lambda": 0.5, "ciard_temp_min": 0.5, "ciard_temp_max": 20.0,
               "ciard_temp_lr": 0.01, "ciard_temp_decay": "per_epoch", "ciard_temp_init": 1.5,
               "ciard_teacher_start": 10}
    # Temperatures at a bound: one of the two moves against it, where the bound decides.
    at_bound = {"ciard_temp_min": {"temp_adv": 1.0, "temp_nat": 1.0, "temp_rate": 0.01},
                "ciard_temp_max": {"temp_adv": 10.0, "temp_nat": 10.0, "temp_rate": 0.01}}
    assert set(changed) | {"train_forwards"} == set(base.hparams)
    for key, value in changed.items():
        m = methods.get_method("ciard", **{key: value})
        if key == "ciard_teacher_start":
            assert m.phase(20) != base.phase(20)
            continue
        if key in ("ciard_temp_init", "ciard_temp_lr"):  # the state training starts from
            assert not jax.tree.all(jax.tree.map(lambda a, b: bool(a == b), m.init_state(), base.init_state()))
            continue
        epoch = 215  # 1-based 216, after the first milestone: 'per_step' keeps the state's rate, 'per_epoch' cuts it
        out0 = loss_of(base, arrays, y, state=at_bound.get(key), epoch=epoch)
        out = loss_of(m, arrays, y, state=at_bound.get(key), epoch=epoch)
        assert not all(np.allclose(np.asarray(a), np.asarray(b)) for a, b in
                       zip(jax.tree.leaves((out[0], out[2])), jax.tree.leaves((out0[0], out0[2])))), key
    for bad in ({"ciard_temp_decay": "x"}, {"ciard_temp_min": 0.0}, {"ciard_temp_min": 5.0, "ciard_temp_max": 2.0},
                {"ciard_temp_lr": -1.0}, {"push_temperature": 0.0}, {"ciard_teacher_start": -1}):
        with pytest.raises(ValueError):
            methods.get_method("ciard", **bad)


def build(mesh, phase, student, rteacher, teacher2, steps=2):
    method = methods.get_method("ciard")
    schedule = train_step.make_lr_schedule(0.1, 4, 300, "cosine_exp", (149,))
    nets = train_step.Networks(student, teacher2=teacher2, rteacher=rteacher)
    txs = {"student": train_step.make_optimizer(schedule),
           "rteacher": train_step.make_optimizer(train_step.make_lr_schedule(0.05, 4, 300, "cosine_exp", (49,)),
                                                 momentum=0.1)}
    settings = train_step.StepSettings(steps=steps, crop_padding=2, unroll=1, **methods.attack_defaults("ciard"))
    fn = train_step.make_train_step(nets, method, phase, txs, schedule, settings, mesh, seed=0)
    initial = {"rteacher": init_vars(rteacher.module if hasattr(rteacher, "module") else rteacher, 5)}
    return fn, train_step.init_state(nets, method, txs, jax.random.key(1, impl="rbg"), IMG, initial=initial), initial


def test_only_declared_forwards_are_computed():
    """S(x) and R(x) in train mode before the attack (CIARD.py:201, :204), T2(x) (:203), the eval-mode attack's S(x'),
    then S(x'), R(x') in train mode and T2(x') (mtard_loss.py:60-62); R is never run in inference mode."""
    mesh = parallel.data_mesh(jax.devices()[:1])
    for phase in ("main",):
        student, rteacher, teacher2 = (CountingApply(tiny(parallel.AXIS)), CountingApply(tiny(parallel.AXIS)),
                                       CountingApply(tiny()))
        fn, state, _ = build(mesh, phase, student, rteacher, teacher2)
        for net in (student, rteacher):
            net.calls.clear()
        images, labels = np.zeros((16,) + IMG, np.uint8), np.zeros(16, np.int32)
        jax.eval_shape(fn, state, {"teacher2": init_vars(tiny(), 3)}, images, labels, jnp.arange(16), jnp.asarray(0))
        assert (sum(student.calls), len(student.calls) - sum(student.calls)) == (2, 1)
        assert rteacher.calls == [True, True]
        assert len(teacher2.calls) == 2 and not any(teacher2.calls)
    method = methods.get_method("ciard")
    assert method.networks() == {"student", "rteacher", "teacher2"}
    assert method.pre_attack_order("main") == ("s_nat", "r_nat") and method.train_order("main") == ("s_adv", "r_adv")
    needed = methods.get_method("ciard", train_forwards="needed")
    assert needed.pre_attack_order("main") == () and needed.train_order("main") == ("s_adv", "s_nat", "r_adv")


@pytest.fixture(scope="module")
def split():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (48,) + IMG, dtype=np.uint8), rng.integers(0, 10, 48).astype(np.int32)


def run(n_devices, split, phase="main", n_steps=2):
    mesh = parallel.data_mesh(jax.devices()[:n_devices])
    fn, state, initial = build(mesh, phase, SmallNet(bn_axis_name=parallel.AXIS),
                               SmallNet(width=4, bn_axis_name=parallel.AXIS), SmallNet(), steps=1)
    state = parallel.put_replicated(state, mesh)
    frozen = parallel.put_replicated({"teacher2": init_vars(SmallNet(), 8)}, mesh)
    images, labels = parallel.put_replicated(split, mesh)
    idx = parallel.put_batch(np.arange(32, dtype=np.int32).reshape(2, 16), mesh, axis=1)
    metrics = []
    for i in range(n_steps):
        state, m = fn(state, frozen, images, labels, idx[i], np.int32(100 if phase == "main" else 0))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics, initial


def test_one_device_equals_two(split):
    one, m1, initial = run(1, split)
    two, m2, _ = run(2, split)
    chex.assert_trees_all_close((one.nets, one.method_state), (two.nets, two.method_state), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(m1, m2, rtol=1e-5, atol=1e-5)
    assert int(one.bad_step) == -1 and all(m["push_examples"] > 0 for m in m1)
    # The robust teacher started from its given variables and trained (main phase).
    moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(one.nets["rteacher"].params),
                                                    jax.tree.leaves(initial["rteacher"]["params"])))
    assert moved > 1e-4


def test_warmup_holds_the_robust_teacher_but_moves_its_statistics(split):
    """Before 1-based epoch 51 the teacher is not stepped (CIARD.py:291-293: no update, no decay, no momentum) while
    its train-mode forwards move its BatchNorm statistics; its schedule's count advances with the run."""
    state, _, initial = run(1, split, phase="warmup")  # two steps
    chex.assert_trees_all_equal(state.nets["rteacher"].params, initial["rteacher"]["params"])
    trace = [a for a in jax.tree.leaves(state.nets["rteacher"].opt_state) if a.dtype != np.int32]
    assert all(np.all(a == 0) for a in trace)
    counts = [int(a) for a in jax.tree.leaves(state.nets["rteacher"].opt_state) if a.dtype == np.int32]
    assert counts and all(c == 2 for c in counts)
    stats = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(state.nets["rteacher"].batch_stats),
                                                    jax.tree.leaves(initial["rteacher"]["batch_stats"])))
    assert stats > 1e-4


def test_schedule_is_the_scripts():
    """CIARD.py:262-267 and :272-279 per 1-based epoch e, ours per 0-based epoch e - 1."""
    s = train_step.make_lr_schedule(0.1, 1, 300, "cosine_exp", (149,))
    t = train_step.make_lr_schedule(1e-4, 1, 300, "cosine_exp", (49,))
    for e in (1, 149, 150, 151, 215, 300):
        want = 0.1 if e < 150 else 0.1 * (0.5 + 0.5 * math.cos(math.pi * (e - 150) / 150)) * math.exp(
            -0.01 * (e - 150) ** 2 / 150 ** 2)
        np.testing.assert_allclose(float(s(e - 1)), want, rtol=1e-6, atol=1e-9)
    for e in (51, 100, 215, 300):
        want = 1e-4 * (0.5 + 0.5 * math.cos(math.pi * (e - 50) / 250)) * math.exp(-0.01 * (e - 50) ** 2 / 250 ** 2)
        np.testing.assert_allclose(float(t(e - 1)), want, rtol=1e-6, atol=1e-12)
