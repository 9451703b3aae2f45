"""ABSLD, the row `absld` (mmard_jax/methods/absld.py): the loss, the attack's target and the per-class temperature
update against NumPy written from zhaoshiji123/ABSLD (resnet18_absld_cifar10.py, absld_loss.py), the script's
aliased teacher targets against its own in-place loop in torch, the refusals, the forwards, the real step on 1 and
2 devices, and two short epochs through the real trainer (epoch 2's temperatures from epoch 1's per-class losses;
resumed bitwise across the boundary)."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from epoch_runs import final_state, records, tiny_config, train_resumed_at_the_boundary, train_uninterrupted
from fast_compile import FastCompiled
from mmard_jax import config_lib, methods, parallel, train_step
from mmard_jax.methods import Logits, StepInfo
from test_methods import ce, kl
from test_train_step import IMG, CountingApply, SmallNet, init_vars, small_frozen, tiny

B, C = 8, 10
INFO = StepInfo(epoch=jnp.asarray(3), lr_scale=jnp.asarray(1.0))


def ref_targets(t, y, ta, tn, reading="aliased"):
    """resnet18_absld_cifar10.py:96-100: T / tau_adv[y] / tau_nat[y] for both terms (aliased), or the paper's
    T / tau_adv[y] and T / tau_nat[y]."""
    if reading == "aliased":
        both = t / ta[y][:, None] / tn[y][:, None]
        return both, both
    return t / ta[y][:, None], t / tn[y][:, None]


def ref_loss(a, y, ta, tn, reading="aliased", alpha=5 / 6):
    """resnet18_absld_cifar10.py:121-125: 5/6 mean_{B,C} kl(S(x'), T_adv) + 1/6 mean_{B,C} kl(S(x), T_nat)."""
    t_adv, t_nat = ref_targets(a["t_nat"], y, ta, tn, reading)
    return alpha * np.mean(kl(a["s_adv"], t_adv)) / C + (1 - alpha) * np.mean(kl(a["s_nat"], t_nat)) / C


def ref_update(temp, class_loss, rate, lo=0.5, hi=5.0):
    """resnet18_absld_cifar10.py:178-180, 187-189: tau - rate (L - mean L) / max|L - mean L|, clipped to [lo, hi]."""
    gap = np.asarray(class_loss, np.float64) - np.mean(class_loss)
    return np.clip(np.asarray(temp, np.float64) - rate * gap / np.max(np.abs(gap)), lo, hi)


def epoch_state(ta, tn, loss_adv=None, loss_nat=None):
    zeros = np.zeros(len(ta), np.float32)
    sums = {"loss_adv": jnp.asarray(zeros if loss_adv is None else loss_adv, jnp.float32),
            "loss_nat": jnp.asarray(zeros if loss_nat is None else loss_nat, jnp.float32)}
    return {"absld": {"sums": sums, "value": {"temp_adv": jnp.asarray(ta, jnp.float32),
                                             "temp_nat": jnp.asarray(tn, jnp.float32)}}}


@pytest.fixture
def lg():
    rng = np.random.default_rng(4)
    arrays = {k: rng.normal(0, 2.0, (B, C)).astype(np.float32) for k in ("s_adv", "s_nat", "t_nat")}
    y = rng.integers(0, C, B)
    ta, tn = (rng.uniform(0.5, 5.0, C).astype(np.float32) for _ in range(2))
    return arrays, y, ta, tn


def loss_of(method, arrays, y, ta, tn, info=INFO):
    logits = Logits(**{k: jnp.asarray(v) for k, v in arrays.items()})
    return method.loss(logits, jnp.asarray(y), method.init_state(), info, epoch_state(ta, tn))


def test_aliased_targets_are_what_the_scripts_in_place_loop_makes(lg):
    """The script's `teacher_logits_new_adv`/`_nat` are `.detach()` views of one tensor (resnet18_absld_cifar10.py:
    95-100): its loop divides each row by tau_adv[y] and again by tau_nat[y]; both names then hold that."""
    arrays, y, ta, tn = lg
    teacher_logits = torch.from_numpy(arrays["t_nat"].copy())
    new_adv, new_nat = teacher_logits.detach(), teacher_logits.detach()
    t_ta, t_tn, t_y = torch.from_numpy(ta), torch.from_numpy(tn), torch.from_numpy(y)
    for i in range(B):
        new_adv[i] = new_adv[i] / t_ta[t_y[i]]
        new_nat[i] = new_nat[i] / t_tn[t_y[i]]
    m = methods.get_method("absld")
    value = epoch_state(ta, tn)["absld"]["value"]
    ours_adv, ours_nat = absld_targets(m, value, arrays["t_nat"], y)
    # Within an ulp: torch divides a row by a scalar tensor as a multiplication by its reciprocal.
    np.testing.assert_allclose(ours_adv, new_adv.numpy(), rtol=3e-7)
    np.testing.assert_allclose(ours_nat, new_nat.numpy(), rtol=3e-7)
    # The attack's target is `teacher_logits_new_adv` (resnet18_absld_cifar10.py:104): the same tensor.
    np.testing.assert_array_equal(m.attack_teacher(epoch_state(ta, tn), jnp.asarray(arrays["t_nat"]),
                                                   jnp.asarray(y)), ours_adv)
    # The paper's reading: separate temperatures.
    sep = methods.get_method("absld", absld_teacher_temps="separate")
    refs = ref_targets(arrays["t_nat"], y, ta, tn, "separate")
    for ours, ref in zip(absld_targets(sep, value, arrays["t_nat"], y), refs):
        np.testing.assert_allclose(ours, ref, rtol=1e-6)
        assert not np.allclose(ours, ours_adv, rtol=1e-3)
    np.testing.assert_allclose(sep.attack_teacher(epoch_state(ta, tn), jnp.asarray(arrays["t_nat"]), jnp.asarray(y)),
                               arrays["t_nat"] / ta[y][:, None], rtol=1e-6)
    # RSLAD's attack reads T(x) itself.
    t = jnp.asarray(arrays["t_nat"])
    assert methods.get_method("rslad").attack_teacher(None, t, jnp.asarray(y)) is t


def absld_targets(method, value, t_nat, y):
    from mmard_jax.methods import absld  # noqa: PLC0415

    return absld.tempered_teachers(value, jnp.asarray(t_nat), jnp.asarray(y), method.hparams)


@pytest.mark.parametrize("reading", ["aliased", "separate"])
def test_loss_matches_the_published_script(lg, reading):
    arrays, y, ta, tn = lg
    m = methods.get_method("absld", absld_teacher_temps=reading)
    loss, metrics, _ = loss_of(m, arrays, y, ta, tn)
    np.testing.assert_allclose(loss, ref_loss(arrays, y, ta, tn, reading), rtol=2e-6)
    t_adv, t_nat = ref_targets(arrays["t_nat"], y, ta, tn, reading)
    np.testing.assert_allclose(metrics["kl_adv_tnat"], np.mean(kl(arrays["s_adv"], t_adv)) / C, rtol=2e-6)
    np.testing.assert_allclose(metrics["kl_nat_tnat"], np.mean(kl(arrays["s_nat"], t_nat)) / C, rtol=2e-6)
    # At temperatures 1 (the first epoch, resnet18_absld_cifar10.py:66-67) it is RSLAD's loss.
    ones = np.ones(C, np.float32)
    rslad = methods.get_method("rslad")
    own = rslad.loss(Logits(**{k: jnp.asarray(v) for k, v in arrays.items()}), jnp.asarray(y), {}, INFO)[0]
    np.testing.assert_allclose(loss_of(m, arrays, y, ones, ones)[0], own, rtol=1e-7)


def test_every_hyper_parameter_changes_the_loss_or_the_temperatures_or_is_refused(lg):
    arrays, y, ta, tn = lg
    base = methods.get_method("absld")
    base_loss = float(loss_of(base, arrays, y, ta, tn)[0])
    changes = {"alpha": 0.5, "kl_class_mean": False, "kl_scale": 10.0, "absld_teacher_temps": "separate"}
    for key, value in changes.items():
        m = methods.get_method("absld", **{key: value})
        assert float(loss_of(m, arrays, y, ta, tn)[0]) != pytest.approx(base_loss, rel=1e-6), key
    # The initial temperatures change the first epoch's loss.
    init = methods.get_method("absld", absld_temp_init=2.0)
    logits = Logits(**{k: jnp.asarray(v) for k, v in arrays.items()})
    first = [float(mm.loss(logits, jnp.asarray(y), {}, INFO)[0]) for mm in (base, init)]
    assert first[0] != pytest.approx(first[1], rel=1e-6)
    np.testing.assert_allclose(first[1], ref_loss(arrays, y, np.full(C, 2.0), np.full(C, 2.0)), rtol=2e-6)
    # The update's rate and bounds change the next temperatures (and so the next epoch's loss).
    rng = np.random.default_rng(1)
    state = epoch_state(ta, tn, rng.uniform(10, 60, C), rng.uniform(5, 30, C))
    after = base.epoch_update(state)["absld"]["value"]
    for key, value in {"absld_temp_lr": 0.3, "absld_temp_min": 0.9, "absld_temp_max": 3.0}.items():
        new = methods.get_method("absld", **{key: value}).epoch_update(state)["absld"]["value"]
        assert not np.allclose(new["temp_adv"], after["temp_adv"]), key
    # Refused: an unknown reading, temperatures out of order or not positive, a negative rate.
    for bad, match in (({"absld_teacher_temps": "paper"}, "absld_teacher_temps must be one of"),
                       ({"absld_temp_min": 0.0}, "0 < absld_temp_min <= absld_temp_init"),
                       ({"absld_temp_init": 6.0}, "absld_temp_init <= absld_temp_max"),
                       ({"absld_temp_min": 2.0}, "absld_temp_min <= absld_temp_init"),
                       ({"absld_temp_lr": -0.1}, "absld_temp_lr must be >= 0")):
        with pytest.raises(ValueError, match=match):
            methods.get_method("absld", **bad)


def test_temperature_update_follows_the_published_rule(lg):
    _, _, ta, tn = lg
    rng = np.random.default_rng(2)
    loss_adv, loss_nat = rng.uniform(10, 60, C).astype(np.float32), rng.uniform(5, 30, C).astype(np.float32)
    m = methods.get_method("absld")
    for lr_scale in (1.0, 0.1, 0.01):  # the rate x0.1 with the learning rate (resnet18_absld_cifar10.py:173-176)
        new = m.epoch_update(epoch_state(ta, tn, loss_adv, loss_nat), lr_scale)["absld"]
        np.testing.assert_allclose(new["value"]["temp_adv"], ref_update(ta, loss_adv, 0.1 * lr_scale), rtol=1e-6)
        np.testing.assert_allclose(new["value"]["temp_nat"], ref_update(tn, loss_nat, 0.1 * lr_scale), rtol=1e-6)
        assert not np.any(new["sums"]["loss_adv"]) and not np.any(new["sums"]["loss_nat"])
    # From ones: the worst class (largest loss) gets the lowest temperature, 1 - rate exactly (sharper soft label).
    ones = np.ones(C, np.float32)
    first = m.epoch_update(epoch_state(ones, ones, loss_adv, loss_nat))["absld"]["value"]["temp_adv"]
    assert float(first[np.argmax(loss_adv)]) == pytest.approx(0.9, rel=1e-6)
    assert float(first[np.argmin(loss_adv)]) > 1.0
    # The bounds bind: a temperature at 0.5 stays there when its class is still the worst.
    low = np.full(C, 0.5, np.float32)
    clipped = m.epoch_update(epoch_state(low, low, loss_adv, loss_nat))["absld"]["value"]["temp_adv"]
    assert float(clipped[np.argmax(loss_adv)]) == np.float32(0.5)
    # Every class's loss equal: the script's 0 / 0 makes the temperatures NaN (followed).
    same = m.epoch_update(epoch_state(ones, ones, np.full(C, 3.0), np.full(C, 3.0)))["absld"]["value"]
    assert np.all(np.isnan(same["temp_adv"]))


def test_accumulate_sums_the_cross_entropy_per_class(lg):
    """resnet18_absld_cifar10.py:113-119: per class, the sum of CE(S(x'), y) and of CE(S(x), y)."""
    arrays, y, _, _ = lg
    m = methods.get_method("absld")
    tally = methods.core.Tally(jnp.asarray(y), Logits(**{k: jnp.asarray(v) for k, v in arrays.items()}))
    state = m.accumulate(m.init_epoch_state(C), tally)
    state = m.accumulate(state, tally)  # two steps add
    for part, key in (("loss_adv", "s_adv"), ("loss_nat", "s_nat")):
        want = 2 * np.bincount(y, weights=ce(arrays[key].astype(np.float64), y), minlength=C)
        np.testing.assert_allclose(state["absld"]["sums"][part], want, rtol=2e-6)
    np.testing.assert_array_equal(state["absld"]["value"]["temp_adv"], np.ones(C, np.float32))


def test_published_recipe():
    """resnet18_absld_cifar10.py:20-21 (300 epochs, batch 128), :54 (SGD 0.1, momentum 0.9, wd 2e-4), :173-175."""
    c = config_lib.apply_recipe(config_lib.base_config("absld", "resnet18", "cifar10"), "absld")
    got = (c.num_epochs, c.batch_size, c.optim.lr, c.optim.momentum, c.optim.weight_decay)
    assert got == (300, 128, 0.1, 0.9, 2e-4)
    assert (c.optim.schedule, tuple(c.optim.boundaries), c.optim.decay) == ("piecewise", (215, 260, 285), 0.1)
    assert (c.attack.eps, c.attack.step_size, c.attack.steps) == (8 / 255, 2 / 255, 10)  # :22, :104
    assert (c.attack.init, c.attack.student_bn) == ("gaussian", "eval")  # absld_loss.py:37, :40


# ----------------------------------------------------------------------------- the real step


def build_step(nets, mesh, method):
    schedule = train_step.make_lr_schedule(0.1, 4, 2)
    txs = {"student": train_step.make_optimizer(schedule)}
    settings = train_step.StepSettings(steps=3, crop_padding=2, unroll=1, **methods.attack_defaults("absld"))
    fn = FastCompiled(train_step.make_train_step(nets, method, "main", txs, schedule, settings, mesh, seed=0))
    state = train_step.init_state(nets, method, txs, jax.random.key(1, impl="rbg"), IMG, num_classes=C)
    return fn, state, settings


def test_only_declared_forwards_are_computed():
    """As RSLAD: T(x) once, shared by the attack and the loss (resnet18_absld_cifar10.py:95); the eval-mode attack
    (absld_loss.py:37, :45), S(x') (absld_loss.py:58) and S(x) (resnet18_absld_cifar10.py:106) in train mode."""
    mesh = parallel.data_mesh(jax.devices()[:1])
    teacher, student = CountingApply(tiny()), CountingApply(tiny(parallel.AXIS))
    method = methods.get_method("absld")
    fn, state, _ = build_step(train_step.Networks(student, teacher), mesh, method)
    student.calls.clear()
    images = np.zeros((16,) + IMG, np.uint8)
    jax.eval_shape(fn, state, {"teacher": init_vars(tiny(), 3)}, images, np.zeros(16, np.int32), jnp.arange(16),
                   jnp.asarray(0))
    assert len(teacher.calls) == 1 and not any(teacher.calls)
    assert (sum(student.calls), len(student.calls) - sum(student.calls)) == (2, 1)
    assert method.networks() == {"student", "teacher"} and method.train_order("main") == ("s_adv", "s_nat")


def test_attack_targets_the_tempered_teacher():
    """ABSLD's x' is RSLAD's x' against T(x) / tau_adv[y] / tau_nat[y] (absld_loss.py:45-46 given the tempered
    logits, resnet18_absld_cifar10.py:104): the same iterates, bitwise."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.uniform(0, 1, (B,) + IMG), jnp.float32)
    y = jnp.asarray(rng.integers(0, C, B))
    ta, tn = (rng.uniform(0.5, 5.0, C).astype(np.float32) for _ in range(2))
    nets = train_step.Networks(SmallNet(), SmallNet(width=16))
    mesh = parallel.data_mesh(jax.devices()[:1])
    absld, rslad = methods.get_method("absld"), methods.get_method("rslad")
    _, state, settings = build_step(nets, mesh, absld)
    state = state.replace(epoch_state=epoch_state(ta, tn))
    frozen = small_frozen()
    keys = jax.random.split(jax.random.key(3), B)

    @jax.jit  # one program for the three attacks (compiling dominates)
    def attacks(state, frozen, x, y, keys):
        t_nat = nets.teacher.apply(frozen["teacher"], x, train=False)
        tempered = t_nat / jnp.asarray(ta)[y][:, None] / jnp.asarray(tn)[y][:, None]
        return tuple(train_step.adversarial_input(nets, m, settings, state, frozen, x, y, {"t_nat": t}, keys)[0]
                     for m, t in ((absld, t_nat), (rslad, tempered), (rslad, t_nat)))

    ours, theirs, untempered = attacks(state, frozen, x, y, keys)
    np.testing.assert_array_equal(ours, theirs)
    assert not np.array_equal(ours, untempered)  # the temperatures do move the attack


def absld_steps(n_devices, images, labels, ta, tn, n_steps=3):
    """The train step of `absld` on SmallNets: the state after `n_steps` of 16 examples from given temperatures."""
    mesh = parallel.data_mesh(jax.devices()[:n_devices])
    method = config_lib.resolve_method(config_lib.method_block("absld"))
    nets = train_step.Networks(SmallNet(bn_axis_name=parallel.AXIS), SmallNet(width=16))
    fn, state, _ = build_step(nets, mesh, method)
    state = parallel.put_replicated(state.replace(epoch_state=epoch_state(ta, tn)), mesh)
    frozen = parallel.put_replicated(small_frozen(), mesh)
    imgs, labs = parallel.put_replicated((images, labels), mesh)
    idx = parallel.put_batch(np.arange(48, dtype=np.int32).reshape(3, 16), mesh, axis=1)
    for i in range(n_steps):
        state, _ = fn(state, frozen, imgs, labs, idx[i], np.int32(0))
    return jax.device_get(state)


def test_per_class_losses_are_summed_over_devices_and_one_device_equals_two():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48,) + IMG, dtype=np.uint8)
    labels = rng.integers(0, C, 48).astype(np.int32)
    ta, tn = (rng.uniform(0.5, 5.0, C).astype(np.float32) for _ in range(2))
    one, two = absld_steps(1, images, labels, ta, tn), absld_steps(2, images, labels, ta, tn)
    # Float sums: equal to float32 rounding (the order of the additions depends on the split).
    chex.assert_trees_all_close(one.epoch_state, two.epoch_state, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(one.nets, two.nets, rtol=1e-5, atol=1e-6)
    sums = one.epoch_state["absld"]["sums"]
    present = np.bincount(labels, minlength=C) > 0
    for part in ("loss_adv", "loss_nat"):  # every example's CE is > 0; a class with no example sums to 0
        assert np.all(np.asarray(sums[part])[present] > 0) and not np.any(np.asarray(sums[part])[~present])
    np.testing.assert_array_equal(one.epoch_state["absld"]["value"]["temp_adv"], ta)  # only epochs change them


# ----------------------------------------------------------------------------- two epochs through the trainer


def tiny_absld_config(root):
    config = tiny_config(root, config_lib.method_block("absld", dataset="digits"))
    config.attack.init, config.attack.student_bn = "gaussian", "eval"
    config.optim.schedule, config.optim.boundaries = "piecewise", (1,)  # the rate of the boundary: 0.1 x 0.1
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_uninterrupted(tmp_path_factory, "absld", tiny_absld_config)


def test_epoch_two_temperatures_come_from_epoch_one_losses(trained):
    root, _ = trained
    first, second = records(root / "run")
    assert first["absld_temp_adv"] == [1.0] * C and first["absld_temp_nat"] == [1.0] * C  # :66-67
    for part in ("adv", "nat"):
        losses = np.asarray(first[f"absld_loss_{part}"])
        assert np.all(losses > 0)  # 256 examples over 10 classes: every class seen
        # The learning rate drops x0.1 at the boundary, and the rate with it (resnet18_absld_cifar10.py:173-176).
        want = ref_update(np.ones(C), losses, 0.1 * 0.1)
        np.testing.assert_allclose(second[f"absld_temp_{part}"], want, rtol=1e-6)
        assert len(set(second[f"absld_temp_{part}"])) > 1  # the classes' losses differ: the temperatures moved
    assert first["absld_loss_adv"] != second["absld_loss_adv"]


def test_resume_across_the_epoch_boundary_is_bitwise(trained, tmp_path, monkeypatch):
    """Stopped (and saved) after epoch 1's last step, before epoch 2's temperatures exist; the rerun ends equal."""
    root, config = trained
    train_resumed_at_the_boundary(config, tmp_path / "run", monkeypatch)
    a, b = final_state(root / "run"), final_state(tmp_path / "run")
    assert set(a["epoch_state"]["absld"]) == {"sums", "value"}
    chex.assert_trees_all_equal(a, b)
    assert records(root / "run")[1]["absld_temp_adv"] == records(tmp_path / "run")[-1]["absld_temp_adv"]
