"""CIARD, the row `ciard` (mmard_jax/methods/ciard.py): the loss, the push weight and the temperature update against
NumPy written from eminentgu/CIARD @93a9a2d CIARD.py:91-122, :212-251, the hyper-parameters, the forwards (S(x) and
R(x) before the attack) and the real step on 1 and 2 devices (the push selection, the weight and the temperatures are
of the global batch) from one shared 1-device run; through the real trainer (tests/epoch_runs.py), the robust teacher
held in the first epoch and trained in the second, and a resume at that boundary bitwise. Step equality with the
script:
tests/test_published_steps.py::test_ciard_step_equals_the_published_script."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from epoch_runs import STEPS_PER_EPOCH, final_state, tiny_config, train_resumed_at_the_boundary, train_uninterrupted
from fast_compile import FastCompiled
from mmard_jax import config_lib, methods, parallel, train_step
from mmard_jax.methods import Logits, StepInfo
from mmard_jax.models import store
from test_train_step import IMG, CountingApply, SmallNet, init_vars

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


def build(mesh, student, rteacher, teacher2):
    """CIARD's main-phase step (its robust teacher trained) with 1-step attacks, and its initial state."""
    method = methods.get_method("ciard")
    schedule = train_step.make_lr_schedule(0.1, 4, 300, "cosine_exp", (149,))
    nets = train_step.Networks(student, teacher2=teacher2, rteacher=rteacher)
    txs = {"student": train_step.make_optimizer(schedule),
           "rteacher": train_step.make_optimizer(train_step.make_lr_schedule(0.05, 4, 300, "cosine_exp", (49,)),
                                                 momentum=0.1)}
    settings = train_step.StepSettings(steps=1, crop_padding=2, unroll=1, **methods.attack_defaults("ciard"))
    fn = FastCompiled(train_step.make_train_step(nets, method, "main", txs, schedule, settings, mesh, seed=0))
    initial = {"rteacher": init_vars(rteacher.module if hasattr(rteacher, "module") else rteacher, 5)}
    return fn, train_step.init_state(nets, method, txs, jax.random.key(1, impl="rbg"), IMG, initial=initial), initial


@pytest.fixture(scope="module")
def split():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (48,) + IMG, dtype=np.uint8), rng.integers(0, 10, 48).astype(np.int32)


def run(n_devices, split, count=False):
    """Two main-phase steps on `n_devices` (with `count`, through CountingApply: the forwards of its one trace)."""
    mesh = parallel.data_mesh(jax.devices()[:n_devices])
    wrap = CountingApply if count else (lambda m: m)
    nets = (wrap(SmallNet(bn_axis_name=parallel.AXIS)), wrap(SmallNet(width=4, bn_axis_name=parallel.AXIS)),
            wrap(SmallNet()))
    fn, state, initial = build(mesh, *nets)
    for net in nets:
        getattr(net, "calls", []).clear()  # the initializations' forwards
    state = parallel.put_replicated(state, mesh)
    frozen = parallel.put_replicated({"teacher2": init_vars(SmallNet(), 8)}, mesh)
    images, labels = parallel.put_replicated(split, mesh)
    idx = parallel.put_batch(np.arange(32, dtype=np.int32).reshape(2, 16), mesh, axis=1)
    metrics = []
    for i in range(2):
        state, m = fn(state, frozen, images, labels, idx[i], np.int32(100))
        metrics.append(jax.device_get(m))
    calls = [list(net.calls) for net in nets] if count else None
    return jax.device_get(state), metrics, initial, calls


@pytest.fixture(scope="module")
def one_device(split):
    """The 1-device run, shared by the forwards count and the 1 == 2 devices test (one compilation)."""
    return run(1, split, count=True)


def test_only_declared_forwards_are_computed(one_device):
    """S(x) and R(x) in train mode before the attack (CIARD.py:201, :204), T2(x) (:203), the eval-mode attack's S(x'),
    then S(x'), R(x') in train mode and T2(x') (mtard_loss.py:60-62); R is never run in inference mode."""
    student, rteacher, teacher2 = one_device[3]
    assert (sum(student), len(student) - sum(student)) == (2, 1)
    assert rteacher == [True, True]
    assert len(teacher2) == 2 and not any(teacher2)
    method = methods.get_method("ciard")
    assert method.networks() == {"student", "rteacher", "teacher2"}
    assert method.pre_attack_order("main") == ("s_nat", "r_nat") and method.train_order("main") == ("s_adv", "r_adv")
    needed = methods.get_method("ciard", train_forwards="needed")
    assert needed.pre_attack_order("main") == () and needed.train_order("main") == ("s_adv", "s_nat", "r_adv")


def test_one_device_equals_two(one_device, split):
    one, m1, initial, _ = one_device
    two, m2, _, _ = run(2, split)
    chex.assert_trees_all_close((one.nets, one.method_state), (two.nets, two.method_state), rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(m1, m2, rtol=1e-5, atol=1e-5)
    assert int(one.bad_step) == -1 and all(m["push_examples"] > 0 for m in m1)
    # The robust teacher started from its given variables and trained (main phase).
    moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(one.nets["rteacher"].params),
                                                    jax.tree.leaves(initial["rteacher"]["params"])))
    assert moved > 1e-4


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


# ----------------------------------------------------------------------------- two epochs through the trainer


def tiny_ciard_config(root):
    """The tiny trainer run as CIARD (both teachers its WRN-10-1 teacher): the robust teacher held in epoch 1
    (ciard_teacher_start 1) and trained in epoch 2 at the rate of the script's schedule (300 epochs) x 100."""
    config = tiny_config(root, config_lib.method_block("ciard", dataset="digits", ciard_teacher_start=1))
    config.teacher2.checkpoint = config.teacher.checkpoint
    config.attack.init, config.attack.student_bn = "gaussian", "eval"
    config.rteacher.optim.lr, config.rteacher.optim.schedule_epochs = 0.01, 300
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_uninterrupted(tmp_path_factory, "ciard", tiny_ciard_config)


def test_warmup_holds_the_robust_teacher_but_moves_its_statistics(trained):
    """Before 1-based epoch 51 (here: the first epoch) the teacher is not stepped (CIARD.py:291-293: no update, no
    decay, no momentum) while its train-mode forwards move its BatchNorm statistics; its schedule's count advances
    with the run; then it trains from config.teacher's variables."""
    root, config = trained
    start = jax.device_get(store.load_model(config.teacher.checkpoint)[1])
    held = jax.device_get(final_state(root / "run", STEPS_PER_EPOCH)["nets"]["rteacher"])
    chex.assert_trees_all_equal(held["params"], start["params"])
    assert all(np.all(a == 0) for a in jax.tree.leaves(held["opt_state"]) if a.dtype != np.int32)
    counts = [int(a) for a in jax.tree.leaves(held["opt_state"]) if a.dtype == np.int32]
    assert counts and all(c == STEPS_PER_EPOCH for c in counts)
    stats = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(held["batch_stats"]),
                                                    jax.tree.leaves(start["batch_stats"])))
    assert stats > 1e-4
    end = jax.device_get(final_state(root / "run"))
    moved = max(np.abs(a - b).max() for a, b in zip(jax.tree.leaves(end["nets"]["rteacher"]["params"]),
                                                    jax.tree.leaves(start["params"])))
    assert moved > 1e-4
    # The temperatures moved from 1 (one of the two rises at each step, the other stays clipped at 1).
    assert max(float(end["method_state"][k]) for k in ("temp_adv", "temp_nat")) > 1.0


def test_resume_across_the_epoch_boundary_is_bitwise(trained, tmp_path, monkeypatch):
    """Stopped (and saved) after the held epoch's last step; the rerun trains the robust teacher in epoch 2 and ends
    equal: the student, the robust teacher's parameters, statistics and optimizer state, the temperatures."""
    root, config = trained
    train_resumed_at_the_boundary(config, tmp_path / "run", monkeypatch)
    a, b = final_state(root / "run"), final_state(tmp_path / "run")
    assert set(a["nets"]) == {"student", "rteacher"} and set(a["method_state"]) == {"temp_adv", "temp_nat", "temp_rate"}
    chex.assert_trees_all_equal(a, b)
