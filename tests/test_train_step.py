"""The fused train step: one device equals two, only declared forwards are computed, the optimizer and
schedules equal PyTorch's, non-finite updates are refused."""

import dataclasses
import functools
from typing import Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tolerances
from fast_compile import FastCompiled
from mmard_jax import checkpoints, config_lib, methods, models, parallel, train_step

IMG = (8, 8, 3)


def tiny(bn_axis_name=None, width=1):
    return models.create("wide_resnet", 10, depth=10, width=width, bn_axis_name=bn_axis_name)


class SmallNet(nn.Module):
    """Two convolutions, each with BatchNorm (synced over `bn_axis_name`): the smallest net that exercises
    everything the step does with BatchNorm, so the 1-vs-2-device tests compile in seconds."""

    num_classes: int = 10
    width: int = 8
    bn_axis_name: Optional[str] = None

    @nn.compact
    def __call__(self, x, train: bool = False):
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9, axis_name=self.bn_axis_name)
        x = nn.relu(norm()(nn.Conv(self.width, (3, 3))(x)))
        x = nn.relu(norm()(nn.Conv(2 * self.width, (3, 3), strides=2)(x)))
        return nn.Dense(self.num_classes)(x.mean((1, 2)))


def init_vars(module, seed):
    return jax.jit(lambda k: module.init(k, jnp.zeros((1,) + IMG), train=False))(jax.random.key(seed, impl="rbg"))


@pytest.fixture(scope="module")
def split():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (48,) + IMG, dtype=np.uint8), rng.integers(0, 10, 48).astype(np.int32)


class CountingApply:
    """Stands in for a module in the train step and counts the forwards traced through it."""

    def __init__(self, module):
        self.module, self.calls = module, []

    def apply(self, *args, **kwargs):
        self.calls.append(kwargs.get("train", False))
        return self.module.apply(*args, **kwargs)

    def init(self, *args, **kwargs):
        return self.module.init(*args, **kwargs)


class RecordingApply(CountingApply):
    """Stands in for a module in the train step and hands the logits of every forward it runs to the host, in call
    order (`records`): the values behind the step's decisions (correct or not), to check them clear of ties."""

    def __init__(self, module):
        super().__init__(module)
        self.records = []

    def apply(self, *args, **kwargs):
        out = super().apply(*args, **kwargs)
        logits = out[0] if isinstance(out, tuple) else out  # train mode: (logits, updated statistics)
        jax.debug.callback(lambda v: self.records.append(np.asarray(v)), logits)
        return out


def assert_recorded_decisions_clear(records, labels, n_steps, what):
    """Every logits a RecordingApply saw over `n_steps` steps of one device (step i: `labels[i]`, the same number of
    forwards each) decides correct/incorrect clear of float32 reordering (tolerances.assert_decisions_clear): counts
    of those decisions may then be compared exactly across device counts, and a near-tie says so."""
    jax.effects_barrier()
    assert records and len(records) % n_steps == 0, len(records)
    per_step = len(records) // n_steps
    for k, logits in enumerate(records):
        tolerances.assert_decisions_clear(logits, labels[k // per_step], f"{what}, step {k // per_step}, "
                                          f"forward {k % per_step}")


def build(method_name, mesh, student=None, teacher=None, teacher2=None, peer=None, steps=3, **hp):
    method = config_lib.resolve_method(config_lib.method_block(method_name, **hp))
    schedule = train_step.make_lr_schedule(0.1, 4, 2)
    student = student or tiny(parallel.AXIS)
    peer = (peer or tiny(parallel.AXIS)) if "peer" in method.networks() else None
    nets = train_step.Networks(student, teacher, teacher2, peer)
    txs = {n: train_step.make_optimizer(schedule) for n in nets.trained()}
    attack = methods.attack_defaults(method_name)
    settings = train_step.StepSettings(steps=steps, crop_padding=2, unroll=1, **attack)
    phase = method.phase(10**6)
    fn = train_step.make_train_step(nets, method, phase, txs, schedule, settings, mesh, seed=0)
    state = train_step.init_state(nets, method, txs, jax.random.key(1, impl="rbg"), IMG)
    return FastCompiled(fn), state


def small_frozen():
    return {"teacher": init_vars(SmallNet(width=16), 7), "teacher2": init_vars(SmallNet(), 8)}


def run_steps(method_name, n_devices, split, n_steps=3, wrap=lambda module: module):
    """`n_steps` steps of 16 examples (step i: examples 16 i .. 16 i + 15 of `split`) on SmallNets, each network
    passed through `wrap` (e.g. RecordingApply): (state, per-step metrics)."""
    mesh = parallel.data_mesh(jax.devices()[:n_devices])
    fn, state = build(method_name, mesh, student=wrap(SmallNet(bn_axis_name=parallel.AXIS)),
                      teacher=wrap(SmallNet(width=16)), teacher2=wrap(SmallNet()),
                      peer=wrap(SmallNet(width=4, bn_axis_name=parallel.AXIS)))
    state = parallel.put_replicated(state, mesh)
    frozen = parallel.put_replicated(small_frozen(), mesh)
    images, labels = parallel.put_replicated(split, mesh)
    idx = parallel.put_batch(np.arange(48, dtype=np.int32).reshape(3, 16), mesh, axis=1)
    metrics = []
    for i in range(n_steps):
        state, m = fn(state, frozen, images, labels, idx[i], np.int32(0))
        metrics.append(jax.device_get(m))
    return jax.device_get(state), metrics


# SAT/ARD-style attacks move the running statistics at every iterate (train-mode BN in the loop), PeerAiD
# trains a second network, IGDM reads mirrored points: each must give the same step on 1 and 2 devices.
@pytest.mark.parametrize("method_name", ["mmard", "mtard", "ard", "peeraid", "igdm"])
def test_one_device_equals_two(method_name, split):
    """Same parameters, BN statistics and metrics on 1 and 2 devices for the same global batch."""
    assert len(jax.devices()) >= 2, "conftest sets --xla_force_host_platform_device_count=2"
    one, m1 = run_steps(method_name, 1, split)
    two, m2 = run_steps(method_name, 2, split)
    chex.assert_trees_all_close((one.nets, one.method_state), (two.nets, two.method_state), rtol=1e-5, atol=1e-6)
    # Metrics within float32 rounding of the reductions (ARD's loss is T^2 / C = 90 x a KL of ~1e-4, so its
    # absolute rounding is ~1e-6).
    chex.assert_trees_all_close(m1, m2, rtol=1e-5, atol=1e-5)
    assert int(one.step) == 3 and int(one.bad_step) == -1
    # The run did train: parameters (of every trained network) moved away from their initial values.
    _, init = build(method_name, parallel.data_mesh(jax.devices()[:1]), student=SmallNet(bn_axis_name=parallel.AXIS),
                    teacher=SmallNet(width=16), teacher2=SmallNet(), peer=SmallNet(width=4, bn_axis_name=parallel.AXIS))
    for name in one.nets:
        moved = [np.abs(a - b).max() for a, b in zip(jax.tree.leaves(one.nets[name].params),
                                                     jax.tree.leaves(init.nets[name].params))]
        assert max(moved) > 1e-3, name


EXPECTED_FORWARDS = {
    # method: (teacher forwards, second-teacher forwards, student (train-mode, inference-mode) forwards,
    # peer (train-mode, inference-mode) forwards), as traced once (the PGD loop body counts once).
    "nature": (0, 0, (1, 0), None),
    "sat": (0, 0, (2, 0), None),  # the attack in train mode (Madry's one graph) + S(x')
    "trades": (0, 0, (3, 2), None),  # S(x), S(x'), S(x) (trades.py:79-82); the attack's S(x) and S(x')
    "ard": (1, 0, (3, 0), None),  # train-mode attack, S(x') and S(x) (main.py:124-126), even at alpha = 1
    "iad": (2, 0, (5, 0), None),  # train-mode attack, S(x') twice and S(x) twice (IAD-I.py:166-179)
    "rslad": (1, 0, (2, 1), None),  # T(x) computed once, shared by inner and outer
    "mtard": (1, 1, (2, 1), None),
    "mmard": (3, 0, (2, 1), None),  # T(x), T(x') inside the PGD loop, T(x') for the outer loss
    "adaad": (2, 0, (2, 1), None),  # S(x) runs for its BatchNorm statistics (main.py:333), unused at alpha = 1
    "adaiad": (2, 0, (4, 1), None),  # S(x), S(x'), S(x), S(x) (main.py:359-378)
    "igdm": (3, 0, (2, 1), None),  # S(x + d), S(x - d) only (saad igdm.py:55-56); T(x - d) beside AdaAD's
    "peeraid": (0, 0, (3, 1), (1, 1)),  # P(x) for the attack; P(x'), S(x') twice, S(x) (main.py:346-387)
}


@pytest.mark.parametrize("method_name", sorted(EXPECTED_FORWARDS))
def test_only_declared_forwards_are_computed(method_name, split):
    mesh = parallel.data_mesh(jax.devices()[:1])
    teacher, teacher2 = CountingApply(tiny()), CountingApply(tiny())
    student, peer = CountingApply(tiny(parallel.AXIS)), CountingApply(tiny(parallel.AXIS))
    fn, state = build(method_name, mesh, student=student, teacher=teacher, teacher2=teacher2, peer=peer)
    student.calls.clear(), peer.calls.clear()
    frozen = {"teacher": init_vars(tiny(), 3), "teacher2": init_vars(tiny(), 3)}
    jax.eval_shape(fn, state, frozen, *(jnp.asarray(a) for a in split), jnp.arange(16), jnp.asarray(0))
    want_t, want_t2, want_s, want_p = EXPECTED_FORWARDS[method_name]
    assert len(teacher.calls) == want_t
    assert len(teacher2.calls) == want_t2
    assert (sum(student.calls), len(student.calls) - sum(student.calls)) == want_s
    if want_p is not None:
        assert (sum(peer.calls), len(peer.calls) - sum(peer.calls)) == want_p
    assert not any(teacher.calls) and not any(teacher2.calls), "teachers always run in inference mode"


def test_needed_forwards_option_drops_published_repeats(split):
    """train_forwards='needed' computes each forward the loss reads once (ARD at alpha = 1: S(x') only)."""
    for option, want in (("published", 3), ("needed", 2)):
        student = CountingApply(tiny(parallel.AXIS))
        fn, state = build("ard", parallel.data_mesh(jax.devices()[:1]), student=student, teacher=tiny(),
                          train_forwards=option)
        student.calls.clear()
        frozen = {"teacher": init_vars(tiny(), 3)}
        jax.eval_shape(fn, state, frozen, *(jnp.asarray(a) for a in split), jnp.arange(16), jnp.asarray(0))
        assert sum(student.calls) == want, option


def test_iad_warmup_skips_the_teacher_at_x_adv(split):
    mesh = parallel.data_mesh(jax.devices()[:1])
    method = config_lib.resolve_method(config_lib.method_block("iad"))
    calls = {}
    for phase in ("warmup", "main"):
        teacher = CountingApply(tiny())
        schedule = train_step.make_lr_schedule(0.1, 4, 2)
        nets = train_step.Networks(tiny(parallel.AXIS), teacher)
        txs = {"student": train_step.make_optimizer(schedule)}
        fn = train_step.make_train_step(nets, method, phase, txs, schedule, train_step.StepSettings(steps=2), mesh,
                                        seed=0)
        state = train_step.init_state(nets, method, txs, jax.random.key(0, impl="rbg"), IMG)
        frozen = {"teacher": init_vars(tiny(), 3)}
        jax.eval_shape(fn, state, frozen, *(jnp.asarray(a) for a in split), jnp.arange(16), jnp.asarray(0))
        calls[phase] = len(teacher.calls)
    assert calls == {"warmup": 1, "main": 2}


def test_nonfinite_update_is_refused(split):
    """A NaN loss leaves parameters, statistics and optimizer state untouched and records the step."""
    mesh = parallel.data_mesh(jax.devices()[:1])
    fn, state = build("sat", mesh)
    images, labels = (jnp.asarray(a) for a in split)
    state, _ = fn(state, {}, images, labels, jnp.arange(16), jnp.asarray(0))
    before = jax.device_get(state)
    student = state.student
    poisoned = dataclasses.replace(student, params=jax.tree.map(lambda p: p * jnp.nan, student.params))
    bad = dataclasses.replace(state, nets={"student": poisoned})
    after, m = fn(bad, {}, images, labels, jnp.arange(16, 32), jnp.asarray(0))
    assert not np.isfinite(m["loss"])
    assert int(after.bad_step) == 1 and int(after.step) == 2
    chex.assert_trees_all_equal((after.student.batch_stats, after.student.opt_state),
                                (before.student.batch_stats, before.student.opt_state))
    # Once a step went bad, later steps do not update either (the run stops at the next check).
    again, _ = fn(after, {}, images, labels, jnp.arange(32, 48), jnp.asarray(0))
    assert int(again.bad_step) == 1


def test_all_finite_sees_one_bad_element_in_any_leaf():
    """The guard's check is one reduction over every leaf: a single inf or NaN in any leaf (of any float dtype)
    fails it; a finite tree (and an empty one) passes."""
    tree = {"a": jnp.ones((3, 2)), "b": [jnp.zeros(4, jnp.bfloat16), jnp.full((2, 2, 2), 5.0)]}
    assert bool(train_step._all_finite(tree)) and bool(train_step._all_finite({}))
    for path, value in ((("a",), jnp.inf), (("b", 0), jnp.nan), (("b", 1), -jnp.inf)):
        leaf = tree[path[0]] if len(path) == 1 else tree[path[0]][path[1]]
        bad = leaf.reshape(-1).at[-1].set(value).reshape(leaf.shape)
        broken = {"a": bad, "b": tree["b"]} if len(path) == 1 else {
            "a": tree["a"], "b": [bad if i == path[1] else x for i, x in enumerate(tree["b"])]}
        assert not bool(train_step._all_finite(broken)), path


def test_optimizer_matches_torch_sgd():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    w0, target = rng.normal(size=(5, 3)).astype(np.float32), rng.normal(size=(5, 3)).astype(np.float32)
    schedule = train_step.make_lr_schedule(0.1, 3, 2)  # cosine over 2 epochs of 3 steps
    tx = train_step.make_optimizer(schedule, momentum=0.9, weight_decay=2e-4)
    params, opt_state = jnp.asarray(w0), None
    opt_state = tx.init(params)
    w = torch.tensor(w0, requires_grad=True)
    sgd = torch.optim.SGD([w], lr=0.1, momentum=0.9, weight_decay=2e-4)
    for step in range(6):
        g = jax.grad(lambda p: jnp.sum((p - target) ** 2 * jnp.arange(1, 4)))(params)
        updates, opt_state = tx.update(g, opt_state, params)
        params = params + updates
        for group in sgd.param_groups:
            group["lr"] = float(schedule(step))
        sgd.zero_grad()
        torch.sum((w - torch.tensor(target)) ** 2 * torch.arange(1, 4)).backward()
        sgd.step()
    np.testing.assert_allclose(params, w.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_schedules_match_torch():
    torch = pytest.importorskip("torch")
    spe, epochs = 4, 10
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    cos = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    ours = train_step.make_lr_schedule(0.1, spe, epochs, "cosine", per_epoch=True)
    for epoch in range(epochs):
        for s in range(spe):
            np.testing.assert_allclose(float(ours(epoch * spe + s)), opt.param_groups[0]["lr"], rtol=1e-5, atol=1e-9)
        opt.step()
        cos.step()
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    multi = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[75, 90], gamma=0.1)
    piece = train_step.make_lr_schedule(0.1, spe, 100, "piecewise", boundaries_epochs=(75, 90))
    for epoch in range(100):
        np.testing.assert_allclose(float(piece(epoch * spe + 1)), opt.param_groups[0]["lr"], rtol=1e-5)
        opt.step()
        multi.step()
    smooth = train_step.make_lr_schedule(0.1, spe, epochs, "cosine")
    assert float(smooth(0)) == pytest.approx(0.1) and float(smooth(spe * epochs)) == pytest.approx(0.0, abs=1e-9)
    assert float(smooth(1)) < 0.1  # anneals within the first epoch
    with pytest.raises(ValueError, match="unknown lr schedule"):
        train_step.make_lr_schedule(0.1, spe, epochs, "linear")


def test_batch_must_divide_by_devices():
    mesh = parallel.data_mesh(jax.devices()[:2])
    with pytest.raises(ValueError, match="batch_size 63 does not divide by the 2 devices"):
        parallel.check_divisible(63, mesh, "batch_size")
    assert parallel.check_divisible(64, mesh) == 32


def test_peer_is_saved_and_resumed_bitwise_with_the_student(split, tmp_path):
    """PeerAiD's peer (a second trained network with its own optimizer) goes through the trainer's checkpoint class
    with the student: the step after a save/restore is bitwise the step without it."""
    mesh = parallel.data_mesh(jax.devices()[:1])
    fn, state = build("peeraid", mesh, student=SmallNet(bn_axis_name=parallel.AXIS),
                      peer=SmallNet(width=4, bn_axis_name=parallel.AXIS))
    frozen = parallel.put_replicated({}, mesh)
    images, labels = parallel.put_replicated(split, mesh)
    idx = parallel.put_batch(np.arange(32, dtype=np.int32).reshape(2, 16), mesh, axis=1)
    state, _ = fn(parallel.put_replicated(state, mesh), frozen, images, labels, idx[0], np.int32(0))
    host = jax.device_get(state)
    assert set(host.nets) == {"student", "peer"} and host.nets["peer"].opt_state is not None
    ckpt = checkpoints.TrainCheckpoints(tmp_path, "clean", say=lambda _: None)
    ckpt.save_latest(state, {"best_value": 0.0, "best_epoch": 0})
    ckpt.close()
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state)
    restored, _ = checkpoints.TrainCheckpoints(tmp_path, "clean", say=lambda _: None).restore(abstract)
    after_restore, _ = fn(restored, frozen, images, labels, idx[1], np.int32(0))
    uninterrupted, _ = fn(parallel.put_replicated(host, mesh), frozen, images, labels, idx[1], np.int32(0))
    for a, b in zip(jax.tree.leaves(jax.device_get(uninterrupted)), jax.tree.leaves(jax.device_get(after_restore)),
                    strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("method_name", ["sat", "mmard"])
def test_l2_inner_maximization_stays_in_the_l2_ball(method_name, split):
    """config.attack.norm='L2': x' of the method's inner maximization lies in the L2 ball of radius eps and in
    [0, 1], moves out towards its border (normalised steps of 15/255, Rice et al.'s rule), and is not the L-inf
    attack's point (some pixel moves past 8/255)."""
    method = config_lib.resolve_method(config_lib.method_block(method_name))
    student, teacher = SmallNet(), SmallNet(width=16)
    nets = train_step.Networks(student, teacher if "teacher" in method.networks() else None, None, None)
    state = train_step.init_state(nets, method, {"student": train_step.make_optimizer(0.1)},
                                  jax.random.key(1, impl="rbg"), IMG)
    frozen = {"teacher": init_vars(teacher, 7)}
    images, labels = split
    x, y = jnp.asarray(images[:8] / 255.0, jnp.float32), jnp.asarray(labels[:8])
    keys = parallel.example_keys(jax.random.key(2), jnp.arange(8))
    consts = train_step.inner_constants(nets, method.forwards(method.phase(10**6)), state, frozen, x)
    attack = dict(methods.attack_defaults(method_name), **config_lib.L2_ATTACK)
    runs = {}
    for norm in ("L2", "Linf"):
        eps = attack["eps"] if norm == "L2" else 8 / 255
        step = attack["step_size"] if norm == "L2" else 2 / 255
        settings = train_step.StepSettings(**dict(attack, eps=eps, step_size=step), norm=norm, unroll=1)
        runs[norm] = np.asarray(train_step.adversarial_input(nets, method, settings, state, frozen, x, y, consts,
                                                             keys)[0])
    dist = lambda a: np.sqrt(((a - np.asarray(x)).reshape(8, -1).astype(np.float64) ** 2).sum(1))  # noqa: E731
    assert dist(runs["L2"]).max() <= attack["eps"] + 1e-5 and dist(runs["L2"]).min() > 0.5 * attack["eps"]
    assert runs["L2"].min() >= 0 and runs["L2"].max() <= 1
    linf = lambda a: np.abs(a - np.asarray(x)).reshape(8, -1).max(1)  # noqa: E731
    assert linf(runs["Linf"]).max() <= 8 / 255 + 1e-6 < linf(runs["L2"]).max()  # not the L-inf attack's point
