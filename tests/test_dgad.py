"""DGAD, the row `dgad` (mmard_jax/methods/dgad.py): the loss against NumPy written from kunsaram01/DGAD @a0329c8
main.py:390-447 (the split by the teacher's clean mistakes, the logit swaps on T(x) and T(x'), the consistency
term, the three forms), the swaps against the script's own in-place lines in torch, the hyper-parameters, the
forwards, and the real step on 1 and 2 devices (the split's counts are of the global batch)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmard_jax import config_lib, methods, parallel
from mmard_jax.methods import Logits, StepInfo, dgad
from test_methods import kl, sm
from test_train_step import (
    IMG,
    CountingApply,
    RecordingApply,
    assert_recorded_decisions_clear,
    build,
    init_vars,
    run_steps,
    tiny,
)

B, C = 12, 10
INFO = StepInfo(epoch=jnp.asarray(3), lr_scale=jnp.asarray(1.0))


def script_swaps(t_nat, t_adv, y):
    """main.py:409-427 literally, in NumPy: Lambda, n and the two swapped teachers (fancy-index assignment in the
    script's order)."""
    t_nat, t_adv = t_nat.copy(), t_adv.copy()
    rows = np.arange(len(y))
    lam = np.zeros(len(y))
    mis = t_nat.argmax(1) != y
    lam[mis] = 1.0
    ori_true, ori_max, ori_idx = t_nat[rows, y].copy(), t_nat.max(1), t_nat.argmax(1)
    t_nat[mis, y[mis]] = ori_max[mis]
    t_nat[mis, ori_idx[mis]] = ori_true[mis]
    correct = t_adv[rows, y].copy()
    others = t_adv.copy()
    others[rows, y] = -np.inf
    max_probs, max_idx = others.max(1), others.argmax(1)
    mask = correct - max_probs < 0
    t_adv[mask, y[mask]] = max_probs[mask]
    t_adv[mask, max_idx[mask]] = correct[mask]
    return lam, lam.sum(), t_nat, t_adv


def ref_loss(a, y, alp_beta=1.0, form="script"):
    """main.py:429-445 (the MobileNetV2 branch :440-441 as written; 'mobilenetv2_halved' its intent), float64."""
    a = {k: v.astype(np.float64) for k, v in a.items()}
    lam, n, t_nat, t_adv = script_swaps(a["t_nat"], a["t_adv"], y)
    bs = len(y)
    clean = (1 / (n + 1e-10)) * np.sum(lam * kl(a["s_nat"], t_nat))
    adv = (1 / (bs - n)) * np.sum((1 - lam) * kl(a["s_adv"], t_adv)) if n < bs else 0.0
    alp = np.mean((sm(a["s_adv"]) - sm(a["s_nat"])) ** 2)
    if form == "script":
        return (n / bs) * clean + ((bs - n) / bs) * adv + alp_beta * alp
    if form == "mobilenetv2_script":
        return 0.5 * ((n / bs) * clean + ((bs - n) / bs)) * adv + alp_beta * alp
    return 0.5 * ((n / bs) * clean + ((bs - n) / bs) * adv) + alp_beta * alp


@pytest.fixture
def lg():
    """Logits where the teacher is right at x on some examples and wrong on the others, and at x' likewise."""
    rng = np.random.default_rng(3)
    arrays = {k: rng.normal(0, 2.0, (B, C)).astype(np.float32) for k in ("s_adv", "s_nat", "t_nat", "t_adv")}
    y = rng.integers(0, C, B)
    y[:4] = arrays["t_nat"][:4].argmax(1)  # right at x on 4 (wrong on the rest: random labels)
    y[8:10] = arrays["t_nat"][8:10].argmax(1)
    arrays["t_adv"][[0, 3, 8], y[[0, 3, 8]]] += 10.0  # right at x' on these
    return arrays, y


def loss_of(method, arrays, y, info=INFO):
    logits = Logits(**{k: jnp.asarray(v) for k, v in arrays.items()})
    return method.loss(logits, jnp.asarray(y), method.init_state(), info)


@pytest.mark.parametrize("form", dgad.FORMS)
def test_loss_matches_the_published_script(lg, form):
    arrays, y = lg
    lam, n, _, _ = script_swaps(arrays["t_nat"], arrays["t_adv"], y)
    assert 0 < n < B and n == 6  # both groups present
    loss, metrics, _ = loss_of(methods.get_method("dgad", dgad_form=form), arrays, y)
    np.testing.assert_allclose(loss, ref_loss(arrays, y, form=form), rtol=2e-6)
    assert float(metrics["dgad_teacher_mistakes"]) == n
    for beta in (0.0, 3.0):
        got = loss_of(methods.get_method("dgad", dgad_form=form, alp_beta=beta), arrays, y)[0]
        np.testing.assert_allclose(got, ref_loss(arrays, y, beta, form), rtol=2e-6)


def test_swaps_are_the_scripts_in_place_lines():
    """The script's own torch lines (main.py:416-419, 422-427) on the same logits give our swapped teachers
    bitwise; only the rows the teacher gets wrong change, in exactly two entries."""
    rng = np.random.default_rng(5)
    t_nat, t_adv = (rng.normal(0, 2.0, (64, C)).astype(np.float32) for _ in range(2))
    y = rng.integers(0, C, 64)
    y[:20] = t_nat[:20].argmax(1)
    t_adv[30:50, :] += 8.0 * np.eye(C, dtype=np.float32)[y[30:50]]
    tn, ta, ty = torch.from_numpy(t_nat.copy()), torch.from_numpy(t_adv.copy()), torch.from_numpy(y)
    group = torch.argmax(tn, dim=1) != ty
    ori_true = torch.gather(tn, 1, ty.unsqueeze(1)).squeeze()
    ori_max, ori_idx = torch.max(tn, dim=1)
    tn[group, ty[group]] = ori_max[group]
    tn[group, ori_idx[group]] = ori_true[group]
    correct = torch.gather(ta, 1, ty.unsqueeze(1)).squeeze()
    max_probs, max_idx = torch.max(ta.scatter(1, ty.unsqueeze(1), -float("inf")), dim=1)
    mask = (correct - max_probs) < 0
    ta[mask, ty[mask]] = max_probs[mask]
    ta[mask, max_idx[mask]] = correct[mask]
    ours_nat = np.asarray(dgad.swap_clean(jnp.asarray(t_nat), jnp.asarray(y)))
    ours_adv = np.asarray(dgad.swap_adv(jnp.asarray(t_adv), jnp.asarray(y)))
    np.testing.assert_array_equal(ours_nat, tn.numpy())
    np.testing.assert_array_equal(ours_adv, ta.numpy())
    for ours, before, changed in ((ours_nat, t_nat, group.numpy()), (ours_adv, t_adv, mask.numpy())):
        assert 0 < changed.sum() < 64
        np.testing.assert_array_equal(ours[~changed], before[~changed])
        assert np.all((ours[changed] != before[changed]).sum(1) == 2)
        assert np.all(ours[changed].argmax(1) == y[changed])  # the label is now the teacher's first class
        np.testing.assert_array_equal(np.sort(ours, 1), np.sort(before, 1))  # a permutation of each row


def test_every_hyper_parameter_changes_the_loss_or_is_refused(lg):
    arrays, y = lg
    base = float(loss_of(methods.get_method("dgad"), arrays, y)[0])
    changes = {"alp_beta": 0.5, "dgad_form": "mobilenetv2_script"}
    for key, value in changes.items():
        got = float(loss_of(methods.get_method("dgad", **{key: value}), arrays, y)[0])
        assert got != pytest.approx(base, rel=1e-6), key
    halved = float(loss_of(methods.get_method("dgad", dgad_form="mobilenetv2_halved"), arrays, y)[0])
    assert halved != pytest.approx(base, rel=1e-6)
    assert set(methods.get_method("dgad").hparams) == {"alp_beta", "dgad_form", "train_forwards"}
    with pytest.raises(ValueError, match="dgad_form must be one of"):
        methods.get_method("dgad", dgad_form="paper")
    with pytest.raises(ValueError, match="takes no hyper-parameter"):
        methods.get_method("dgad", temperature=30.0)  # main.py:38 `--temp` is IAD's, not DGAD's


def test_groups_alone_and_the_gradient(lg):
    """A batch the teacher gets all right distils only at x' (clean term 0, the script's 1e-10); all wrong only at x
    (the script's 1 / (B - n) raises there; the term's weight is 0, so 0 here). The teachers carry no gradient."""
    arrays, y = lg
    m = methods.get_method("dgad")
    right = arrays["t_nat"].argmax(1)
    loss, metrics, _ = loss_of(m, arrays, right)
    assert float(metrics["dgad_clean"]) == 0.0 and float(metrics["dgad_teacher_mistakes"]) == 0.0
    np.testing.assert_allclose(loss, ref_loss(arrays, right), rtol=2e-6)
    wrong = (right + 1) % C
    loss, metrics, _ = loss_of(m, arrays, wrong)
    assert np.isfinite(float(loss)) and float(metrics["dgad_adv"]) == 0.0
    np.testing.assert_allclose(loss, ref_loss(arrays, wrong), rtol=2e-6)

    def f(t_nat, t_adv):
        return loss_of(m, {**arrays, "t_nat": t_nat, "t_adv": t_adv}, y)[0]

    grads = jax.grad(f, argnums=(0, 1))(jnp.asarray(arrays["t_nat"]), jnp.asarray(arrays["t_adv"]))
    assert not any(np.any(g) for g in grads)


def test_published_recipe():
    """main.py:64-70 (200 epochs, batch 128, SGD 0.1, momentum 0.9, wd 5e-4), :120-135, :55-57; AT_helper.py:20-27."""
    c = config_lib.apply_recipe(config_lib.base_config("dgad", "resnet18", "cifar10"), "dgad")
    got = (c.num_epochs, c.batch_size, c.optim.lr, c.optim.momentum, c.optim.weight_decay)
    assert got == (200, 128, 0.1, 0.9, 5e-4)
    assert (c.optim.schedule, tuple(c.optim.boundaries), c.optim.decay) == ("piecewise", (100, 150), 0.1)
    assert (c.attack.eps, c.attack.step_size, c.attack.steps) == (8 / 255, 2 / 255, 10)
    assert (c.attack.init, c.attack.student_bn) == ("gaussian", "eval")
    m = methods.get_method("dgad")
    assert m.inner is methods.INNER["kl_teacher_adv"] is methods.get_method("adaad").inner  # AdaAD's attack


def test_only_declared_forwards_are_computed():
    """T(x') at every iterate (the attack), T(x) and T(x') for the loss (main.py:405-406), the eval-mode attack's
    S(x'), then S(x) and S(x') in train mode (main.py:397-398)."""
    mesh = parallel.data_mesh(jax.devices()[:1])
    teacher, student = CountingApply(tiny()), CountingApply(tiny(parallel.AXIS))
    fn, state = build("dgad", mesh, student=student, teacher=teacher)
    student.calls.clear()
    images, labels = np.zeros((16,) + IMG, np.uint8), np.zeros(16, np.int32)
    jax.eval_shape(fn, state, {"teacher": init_vars(tiny(), 3)}, images, labels, jnp.arange(16), jnp.asarray(0))
    assert len(teacher.calls) == 3 and not any(teacher.calls)
    assert (sum(student.calls), len(student.calls) - sum(student.calls)) == (2, 1)
    method = methods.get_method("dgad")
    assert method.outer_needs("main") == {"s_nat", "s_adv", "t_nat", "t_adv"}
    assert method.networks() == {"student", "teacher"} and method.train_order("main") == ("s_nat", "s_adv")


@pytest.fixture(scope="module")
def split():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (48,) + IMG, dtype=np.uint8), rng.integers(0, 10, 48).astype(np.int32)


def test_one_device_equals_two(split):
    """The split's n and B are of the global batch (psum over the data axis): the same step on 1 and 2 devices.
    The groups are decisions (is the teacher right at x; at x'): every teacher forward of the one-device run is
    first checked clear of a tie, so that a near-tie on another machine is reported as one, not as a mismatch."""
    nets = []
    one, m1 = run_steps("dgad", 1, split, wrap=lambda m: nets.append(RecordingApply(m)) or nets[-1])
    teacher = nets[1]  # student, teacher, teacher2, peer (run_steps' order)
    labels = split[1][:48].reshape(3, 16)  # step i: examples 16 i .. 16 i + 15
    assert_recorded_decisions_clear(teacher.records, labels, 3, "DGAD's teacher (T(x), T(x'))")
    two, m2 = run_steps("dgad", 2, split)
    chex.assert_trees_all_close(one.nets, two.nets, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(m1, m2, rtol=1e-5, atol=1e-5)
    assert int(one.step) == 3 and int(one.bad_step) == -1
    assert [float(m["dgad_teacher_mistakes"]) for m in m1] == [float(m["dgad_teacher_mistakes"]) for m in m2]
