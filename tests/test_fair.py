"""Fair-ARD, the plug-in `fair` (mmard_jax/methods/fair.py), and the method state that lives across epochs
(methods.core.EpochState): the class-weight formula and the weighted ARD/IAD/RSLAD/MTARD losses against NumPy
written from NISP-official/Fair-ARD @910c8cd, the refusals, the counts of the real step on 1 and 2 devices, and two
short epochs through the real trainer (the weights of epoch 2 from epoch 1's counts; resumed bitwise)."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import PartitionSpec as P

from epoch_runs import final_state, records, tiny_config, train_resumed_at_the_boundary, train_uninterrupted
from fast_compile import FastCompiled
from mmard_jax import config_lib, methods, parallel, train_step
from mmard_jax.methods import Logits, StepInfo
from test_methods import kl, sm
from test_train_step import (
    IMG,
    CountingApply,
    RecordingApply,
    SmallNet,
    assert_recorded_decisions_clear,
    init_vars,
    small_frozen,
    tiny,
)

B, C = 8, 10
INFO = StepInfo(epoch=jnp.asarray(100), lr_scale=jnp.asarray(1.0))
FORWARDS = ("s_adv", "s_nat", "t_nat", "t_adv", "t2_nat")


def ref_weights(correct, examples, beta=2.0, lo=5 / 6, hi=5 / 2, eps=1e-5):
    """Fair-ARD.py:116-125, 166: Kappa = counts / (N / C); (1 / (Kappa + eps))^beta scaled to sum C, clipped."""
    kappa = np.asarray(correct, np.float64) / (np.sum(examples) / len(correct))
    w = (1.0 / (kappa + eps)) ** beta
    return np.clip(w * len(correct) / w.sum(), lo, hi)


def epoch_state(weights):
    sums = {k: jnp.zeros((len(weights),), jnp.int32) for k in ("correct", "examples")}  # distinct (donated) buffers
    return {"fair": {"sums": sums, "value": {"weights": jnp.asarray(weights)}}}


@pytest.fixture
def lg():
    rng = np.random.default_rng(3)
    arrays = {k: rng.normal(0, 1.5, (B, C)) for k in FORWARDS}
    y = rng.integers(0, C, B)
    w = rng.uniform(5 / 6, 5 / 2, C).astype(np.float32)
    return arrays, y, w


def run(method, arrays, y, w, phase="main", state=None, info=INFO):
    needs = method.outer_needs(phase)
    logits = Logits(**{k: (jnp.asarray(v, jnp.float32) if k in needs else None) for k, v in arrays.items()})
    state = method.init_state() if state is None else state
    return method.loss(logits, jnp.asarray(y), state, info._replace(phase=phase), epoch_state(w))


def ref_loss(name, a, y, w, phase="main", nat_teacher="t_adv"):
    """The weighted losses of the four scripts: weight each example's terms by w[y], then the plain batch mean."""
    wy = w[y]
    s_adv, s_nat, t_nat, t_adv = a["s_adv"], a["s_nat"], a["t_nat"], a["t_adv"]
    if name == "ard":  # Fair-ARD.py:141-148: KLDivLoss() of one example is its KL / C; alpha 1; T 30
        return 900.0 * np.mean(wy * kl(s_adv, t_nat, 30.0) / C)
    if name == "iad":  # Fair-IAD.py:176-199: KL summed over classes, T 1, alpha 1, trust softmax(T(x'))_y^0.1
        if phase == "warmup":
            return np.mean(wy * kl(s_adv, t_nat))
        trust = sm(t_adv)[np.arange(B), y] ** 0.1
        return np.mean(wy * kl(s_adv, t_nat)) + np.mean(wy * (1 - trust) * kl(s_adv, s_nat))
    if name == "rslad":  # Fair-RSLAD.py:129-138: torch.mean over B*C
        return 5 / 6 * np.mean(wy * kl(s_adv, t_nat) / C) + 1 / 6 * np.mean(wy * kl(s_nat, t_nat) / C)
    if name == "mtard":  # Fair-MTARD.py:143-171 at the first batch: the weights stay 1/2 (r_adv = r_nat = 1)
        nat_t = t_adv if nat_teacher == "t_adv" else a["t2_nat"]
        return 0.5 * np.mean(wy * kl(s_adv, t_adv) / C) + 0.5 * np.mean(wy * kl(s_nat, nat_t) / C)
    raise KeyError(name)


def test_class_weights_follow_the_published_formula():
    rng = np.random.default_rng(0)
    examples = rng.integers(20, 40, C).astype(np.int32)
    correct = (examples * rng.uniform(3.0, 8.0, C)).astype(np.int32)  # up to 10 iterates per example
    correct[3] = examples[3]  # a class robust at one iterate of ten on average: clipped to 5/2
    for name, eps in (("ard", 1e-5), ("rslad", 0.0)):  # Fair-RSLAD.py:99 has no eps
        m = methods.get_method(name, plugins=("fair",))
        state = {"sums": {"correct": jnp.asarray(correct), "examples": jnp.asarray(examples)},
                 "value": {"weights": jnp.ones(C)}}
        new = m.epoch_update({"fair": state})["fair"]
        np.testing.assert_allclose(new["value"]["weights"], ref_weights(correct, examples, eps=eps), rtol=2e-6)
        assert not np.any(new["sums"]["correct"]) and not np.any(new["sums"]["examples"])
        weights = np.asarray(new["value"]["weights"])
        assert weights[3] == np.float32(2.5) and weights.min() >= np.float32(5 / 6) and len(set(weights)) > 3
    # Never robust: (1 / 0)^beta = inf, so that class's weight is inf * 0 = NaN, the others 0 -> 5/6, in torch
    # and here (Fair-RSLAD.py:99-103); the step then refuses its non-finite loss.
    correct[3] = 0
    state["sums"]["correct"] = jnp.asarray(correct)
    weights = np.asarray(m.epoch_update({"fair": state})["fair"]["value"]["weights"])
    t = (1 / torch.tensor(correct / (examples.sum() / C), dtype=torch.float32)) ** 2.0
    np.testing.assert_array_equal(weights, torch.clamp(t * (C / torch.sum(t)), min=5 / 6, max=5 / 2).numpy())
    assert np.isnan(weights[3]) and np.all(weights[np.arange(C) != 3] == np.float32(5 / 6))
    # Every fair hyper-parameter changes the weights (and so the next epoch's loss) or is refused.
    state["sums"]["correct"] = jnp.asarray(examples * np.linspace(3, 8, C)).astype(jnp.int32)
    base = methods.get_method("ard", plugins=("fair",)).epoch_update({"fair": state})["fair"]["value"]["weights"]
    for key, value in {"fair_beta": 1.0, "fair_min": 0.9, "fair_max": 1.2, "fair_eps": 0.5}.items():
        new = methods.get_method("ard", plugins=("fair",), **{key: value}).epoch_update({"fair": state})
        assert not np.allclose(new["fair"]["value"]["weights"], base), key


@pytest.mark.parametrize("name", ["ard", "iad", "rslad", "mtard"])
def test_weighted_losses_match_the_published_scripts(lg, name):
    arrays, y, w = lg
    m = methods.get_method(name, plugins=("fair",))
    for phase in m.phases:
        loss, metrics, _ = run(m, arrays, y, w, phase)
        np.testing.assert_allclose(loss, ref_loss(name, arrays, y, w, phase), rtol=2e-5)
        # Uniform weights give the row's own loss (MTARD: with its own natural teacher).
        plain = methods.get_method(name, **({"iad_form": "iad1"} if name == "iad" else {}))
        arr = dict(arrays, t2_nat=arrays["t_adv"]) if name == "mtard" else arrays
        ones, _, _ = run(m, arr, y, np.ones(C, np.float32), phase)
        own = plain.loss(Logits(**{k: (jnp.asarray(v, jnp.float32) if k in plain.outer_needs(phase) else None)
                                   for k, v in arr.items()}), jnp.asarray(y), plain.init_state(),
                         INFO._replace(phase=phase))[0]
        np.testing.assert_allclose(ones, own, rtol=2e-6)
    if name == "mtard":  # the other reading: MTARD's own natural teacher T_nat(x)
        m2 = methods.get_method(name, plugins=("fair",), fair_mtard_nat_teacher="t2_nat")
        assert "t2_nat" in m2.outer_needs("main") and "t2_nat" not in m.outer_needs("main")
        np.testing.assert_allclose(run(m2, arrays, y, w)[0], ref_loss(name, arrays, y, w, nat_teacher="t2_nat"),
                                   rtol=2e-5)


def test_fair_applies_to_its_four_rows_only():
    for name in ("ard", "iad", "rslad", "mtard"):
        m = methods.get_method(name, plugins=("fair",))
        assert m.tallies() == {"correct_iterates"} and m.epoch_terms[0].name == "fair"
    for name in ("mmard", "adaad", "adaiad", "trades", "sat", "igdm", "peeraid"):
        with pytest.raises(ValueError, match="plug-in 'fair' applies to the rows ard, iad, rslad, mtard"):
            methods.get_method(name, plugins=("fair",))
    with pytest.raises(ValueError, match="with outer 'mmard'"):
        methods.get_method("ard", outer="mmard", plugins=("fair",))
    with pytest.raises(ValueError, match="fair_mtard_nat_teacher='t2_nat' is not read"):
        methods.get_method("rslad", plugins=("fair",), fair_mtard_nat_teacher="t2_nat")
    with pytest.raises(ValueError, match="alpha=0.5 is not read"):
        methods.get_method("iad", plugins=("fair",), alpha=0.5)
    # Fair-IAD's published sequence of train-mode forwards (Fair-IAD.py:94, 165, 170); Fair-RSLAD's eps 0.
    assert methods.get_method("iad", plugins=("fair",)).train_order("main") == ("s_adv", "s_nat", "s_adv")
    assert methods.get_method("rslad", plugins=("fair",)).hparams["fair_eps"] == 0.0
    # A forward the loss does not read is never computed: Fair-MTARD's unused T_nat(x) (Fair-MTARD.py:134).
    assert "t2_nat" not in methods.get_method("mtard", plugins=("fair",)).forwards("main")


@pytest.mark.parametrize("name", ["ard", "iad", "rslad", "mtard"])
def test_weighted_loss_does_not_depend_on_how_the_batch_is_split(lg, name):
    arrays, y, w = lg
    m = methods.get_method(name, plugins=("fair",))
    needs = sorted(m.outer_needs("main"))
    mesh = parallel.data_mesh(jax.devices()[:2])

    def local(y, *logits):
        info = INFO._replace(axis_name=parallel.AXIS)
        loss, _, state = m.loss(Logits(**dict(zip(needs, logits))), y, m.init_state(), info, epoch_state(w))
        return jax.lax.pmean(loss, parallel.AXIS), state

    inputs = [jnp.asarray(arrays[k], jnp.float32) for k in needs]
    split = jax.shard_map(local, mesh=mesh, in_specs=(P(parallel.AXIS),) * (1 + len(inputs)), out_specs=(P(), P()))
    two, state_two = jax.jit(split)(jnp.asarray(y), *inputs)
    one, _, state_one = run(m, arrays, y, w)
    np.testing.assert_allclose(two, one, rtol=2e-5)
    chex.assert_trees_all_close(state_two, state_one, rtol=2e-5)


# ----------------------------------------------------------------------------- the real step


def fair_steps(n_devices, images, labels, weights, n_steps=3, name="ard", student=None):
    """The train step of `name`+fair on SmallNets (the student: `student`, e.g. a RecordingApply of one): the state
    after `n_steps` of 16 examples."""
    mesh = parallel.data_mesh(jax.devices()[:n_devices])
    method = config_lib.resolve_method(config_lib.method_block(name, plugins=("fair",)))
    schedule = train_step.make_lr_schedule(0.1, 4, 2)
    nets = train_step.Networks(student or SmallNet(bn_axis_name=parallel.AXIS), SmallNet(width=16), SmallNet())
    txs = {"student": train_step.make_optimizer(schedule)}
    settings = train_step.StepSettings(steps=3, crop_padding=2, unroll=1, **methods.attack_defaults(name))
    fn = FastCompiled(train_step.make_train_step(nets, method, method.phase(10**6), txs, schedule, settings, mesh,
                                                 seed=0))
    state = train_step.init_state(nets, method, txs, jax.random.key(1, impl="rbg"), IMG, num_classes=C)
    state = state.replace(epoch_state=epoch_state(weights))
    state = parallel.put_replicated(state, mesh)
    frozen = parallel.put_replicated(small_frozen(), mesh)
    imgs, labs = parallel.put_replicated((images, labels), mesh)
    idx = parallel.put_batch(np.arange(48, dtype=np.int32).reshape(3, 16), mesh, axis=1)
    for i in range(n_steps):
        state, _ = fn(state, frozen, imgs, labs, idx[i], np.int32(0))
    return jax.device_get(state)


# (teacher, second teacher, student (train-mode, inference-mode)) forwards as traced once (the PGD body once).
FAIR_FORWARDS = {
    "ard": (1, 0, (3, 0)),  # as ARD: the train-mode attack, S(x'), S(x) (Fair-ARD.py:66, :78, :137)
    "iad": (2, 0, (4, 0)),  # T(x), T(x'); the attack, S(x'), S(x), S(x') (Fair-IAD.py:82, :94, :165, :170-171)
    "rslad": (1, 0, (2, 1)),  # as RSLAD (Fair-RSLAD.py:58, :78, :125)
    "mtard": (1, 0, (2, 1)),  # T_adv(x') only: the unused T_nat(x) (Fair-MTARD.py:134) is not computed
}


@pytest.mark.parametrize("name", sorted(FAIR_FORWARDS))
def test_only_declared_forwards_are_computed(name):
    mesh = parallel.data_mesh(jax.devices()[:1])
    teacher, teacher2, student = CountingApply(tiny()), CountingApply(tiny()), CountingApply(tiny(parallel.AXIS))
    method = config_lib.resolve_method(config_lib.method_block(name, plugins=("fair",)))
    nets = train_step.Networks(student, teacher, teacher2)
    schedule = train_step.make_lr_schedule(0.1, 4, 2)
    txs = {"student": train_step.make_optimizer(schedule)}
    settings = train_step.StepSettings(steps=3, crop_padding=2, unroll=1, **methods.attack_defaults(name))
    fn = FastCompiled(train_step.make_train_step(nets, method, method.phase(10**6), txs, schedule, settings, mesh,
                                                 seed=0))
    state = train_step.init_state(nets, method, txs, jax.random.key(1, impl="rbg"), IMG, num_classes=C)
    student.calls.clear()
    frozen = {"teacher": init_vars(tiny(), 3), "teacher2": init_vars(tiny(), 3)}
    images = np.zeros((16,) + IMG, np.uint8)
    jax.eval_shape(fn, state, frozen, images, np.zeros(16, np.int32), jnp.arange(16), jnp.asarray(0))
    want_t, want_t2, want_s = FAIR_FORWARDS[name]
    assert (len(teacher.calls), len(teacher2.calls)) == (want_t, want_t2)
    assert (sum(student.calls), len(student.calls) - sum(student.calls)) == want_s


def test_step_counts_are_summed_over_devices_and_one_device_equals_two():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48,) + IMG, dtype=np.uint8)
    labels = rng.integers(0, C, 48).astype(np.int32)
    weights = rng.uniform(5 / 6, 5 / 2, C).astype(np.float32)
    student = RecordingApply(SmallNet(bn_axis_name=parallel.AXIS))
    one, two = fair_steps(1, images, labels, weights, student=student), fair_steps(2, images, labels, weights)
    # The counts are decisions (is the student right at the iterate): every student forward of the one-device run
    # (the attack's iterates and the loss's) is first checked clear of a tie, so that a near-tie on another machine
    # is reported as one, not as a mismatch of the counts.
    assert_recorded_decisions_clear(student.records, labels.reshape(3, 16), 3, "Fair-ARD's student")
    chex.assert_trees_all_equal(one.epoch_state, two.epoch_state)  # integer sums: exactly equal
    chex.assert_trees_all_close(one.nets, two.nets, rtol=1e-5, atol=1e-6)
    sums = one.epoch_state["fair"]["sums"]
    np.testing.assert_array_equal(sums["examples"], np.bincount(labels, minlength=C))
    assert 0 < sums["correct"].sum() and np.all(sums["correct"] <= 3 * sums["examples"])  # 3 iterates each
    np.testing.assert_array_equal(one.epoch_state["fair"]["value"]["weights"], weights)  # only epochs change them


# ----------------------------------------------------------------------------- two epochs through the trainer


def tiny_fair_config(root):
    config = tiny_config(root, config_lib.method_block("ard", plugins=("fair",), dataset="digits"))
    config.attack.init, config.attack.student_bn = "uniform", "train"
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_uninterrupted(tmp_path_factory, "fair", tiny_fair_config)


def test_epoch_two_weights_come_from_epoch_one_counts(trained):
    root, _ = trained
    first, second = records(root / "run")
    assert first["fair_weights"] == [1.0] * C  # ones in the first epoch (Fair-ARD.py:161)
    kappa = np.asarray(first["fair_kappa"])
    assert np.all(kappa >= 0) and np.all(kappa <= 2 * C)  # 2 iterates per example, classes nearly balanced
    np.testing.assert_allclose(second["fair_weights"], ref_weights(kappa, np.full(C, 1.0)), rtol=1e-5)
    assert len(set(second["fair_weights"])) > 1  # the classes are not equally robust: the weights moved


def test_resume_across_the_epoch_boundary_is_bitwise(trained, tmp_path, monkeypatch):
    """Stopped (and saved) after epoch 1's last step, before the weights of epoch 2 exist; the rerun ends equal."""
    root, config = trained
    train_resumed_at_the_boundary(config, tmp_path / "run", monkeypatch)
    a, b = final_state(root / "run"), final_state(tmp_path / "run")
    assert set(a) == {"step", "nets", "method_state", "bad_step", "epoch_state"}
    chex.assert_trees_all_equal(a, b)
    assert records(root / "run")[1]["fair_weights"] == records(tmp_path / "run")[-1]["fair_weights"]
