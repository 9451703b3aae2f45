"""The PyTorch step (peers.torch_step) computes what ours does; the flop count and the same-work check of
scripts/benchmark.py (mmard_jax.tools.bench_*).

No timing assertions: performance numbers come from `scripts/benchmark.py` runs recorded in BENCHMARKS.md.
"""

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import fast_compile
from mmard_jax import methods, models, parallel, train_step
from mmard_jax.data.augment import crop_and_flip, to_float
from mmard_jax.interop import naming, published
from mmard_jax.tools import bench_cases, bench_driver, bench_report, bench_step
from mmard_jax.tools.bench_cases import CASES, CPU_LATER, CPU_TINY_IMAGENET, transcription
from peers import published_steps, torch_bench, torch_step
from peers.architectures import build_model
from peers.interop import copy_into_torch
from peers.published_losses import kl_loss_rslad

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMG = (8, 8, 3)


def to_torch(flax_variables, module):
    """`module` (a PyTorch peer) with the Flax variables copied in by the naming rule."""
    return copy_into_torch(flax_variables, module).train()


# The whole script end to end (JAX and PyTorch rows, JSON, Markdown, equal first losses) runs in
# tests/test_gpu_check.py, as part (b) of scripts/gpu_check.sh --dry.


def test_same_work_flags_a_differing_loss():
    """A PyTorch row whose first-step loss is off by more than the dtypes' rounding, or that did not start from the
    JAX row's weights, is marked not comparable."""
    jax_row = {"first_loss": 1.0, "dtype": "float32", "backend": "cpu"}
    row = {"first_loss": 1.0 + 5e-5, "dtype": "float32", "backend": "cpu", "weights": "the JAX row's"}
    assert bench_report.same_work(row, jax_row)["comparable"] is True
    assert bench_report.same_work(dict(row, first_loss=1.001), jax_row)["comparable"] is False
    assert bench_report.same_work(dict(row, weights="own (random)"), jax_row)["comparable"] is False
    assert bench_report.same_work(dict(row, first_loss=1.01, dtype="bfloat16"), jax_row)["comparable"] is True
    assert bench_report.same_work(dict(row, first_loss=1.005, backend="cuda"), jax_row)["comparable"] is True
    # float64 rows on both sides: a difference float32 rounding allows is one float64 does not
    f64_jax = dict(jax_row, dtype="float64")
    assert bench_report.same_work(dict(row, dtype="float64", first_loss=1.0 + 5e-6), f64_jax)["comparable"] is True
    assert bench_report.same_work(dict(row, dtype="float64"), f64_jax)["comparable"] is False


def test_match_dtype_gives_each_case_the_forms_of_its_dtype():
    """--match_dtype: bfloat16 cases get the forms with bf16, float64 cases (*_f64) those with f64, float32 ones the
    rest; every case's first JAX row writes the start file its PyTorch rows read."""
    options = bench_driver.Options(torch_forms="eager,cl+compile+bf16,f64", match_dtype=True)
    plan = bench_driver.plan_rows(["tiny", "tiny_bf16", "tiny_f64"], options)
    assert [(name, kind, option) for name, kind, option, _, _ in plan] == [
        ("tiny", "jax", "auto"), ("tiny", "torch", "eager"), ("tiny_bf16", "jax", "auto"),
        ("tiny_bf16", "torch", "cl+compile+bf16"), ("tiny_f64", "jax", "auto"), ("tiny_f64", "torch", "f64")]
    assert [writes for *_, writes in plan] == [True, False] * 3
    assert bench_cases.case_names("cpu_f64") == [f"{name}_f64" for name in bench_cases.F64_CASES[:-1]]
    assert all(CASES[n].dtype == "float64" and dataclasses.replace(CASES[n], dtype="float32") == CASES[n[:-4]]
               for n in bench_cases.case_names("cpu_f64") + ["tiny_f64"])


def test_tiny_imagenet_case_first_step_losses_agree(tmp_path, monkeypatch):
    """The 64x64, 200-class case of scripts/benchmark.py (shrunk: `tiny_64px`) through both workers: the PyTorch row
    (SAAD's published pResNet18 and DM-Improves-AT's Tiny-ImageNet WideResNet class) starts from the JAX row's
    weights and first draws, and its first-step loss agrees within the benchmark's rule (1e-4 relative)."""
    case, full = CASES["tiny_64px"], CASES[CPU_TINY_IMAGENET]
    shape = ("adaad", "preact_resnet18_saad", "dm_wide_resnet", 64, 200)
    assert (case.method, case.student, case.teacher, case.size, case.num_classes) == shape
    assert (full.method, full.student, full.teacher, full.size, full.num_classes) == shape
    # The benchmarked teacher is the published Tiny-ImageNet teacher's class, only shallower and narrower.
    assert {**full.teacher_kwargs, "depth": 28, "width": 10} == dict(published.PUBLISHED["tiny_linf_wrn28-10"].kwargs)
    _first_step_losses_agree(case, tmp_path, monkeypatch)


def _first_step_losses_agree(case, tmp_path, monkeypatch, form="eager", count_flops=False):
    """One step of `case` through both workers of scripts/benchmark.py (PyTorch in `form`): the PyTorch row starts
    from the JAX row's weights and first draws, and its first-step loss agrees within the benchmark's rule.
    Returns (JAX row, PyTorch row, the same-work check)."""
    if not count_flops:
        monkeypatch.setattr(bench_step, "step_flops", lambda case: 0.0)  # counted in test_flop_count_matches_...
    start = str(tmp_path / "start.npz")
    jax_row = bench_step.jax_worker(case, warmup=1, steps=1, unroll="1", start_file=start,
                                    compiler_options=FAST_COMPILE)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small ops: one thread is faster on a loaded 2-core machine (test_attacks_peer.py)
    try:
        torch_row = torch_bench.torch_worker(case, warmup=1, steps=1, form_text=form, start_file=start)
    finally:
        torch.set_num_threads(threads)
    check = bench_report.same_work(torch_row, jax_row)
    assert torch_row["weights"] == "the JAX row's" and check["comparable"] is True, (jax_row["first_loss"], check)
    # The JAX row counts the kernels XLA compiled (one per fusion of the optimized HLO) and the table shows them.
    assert jax_row["kernels"] > 10 and bench_report._fmt_kernels(jax_row) == f" ({jax_row['kernels']} kernels)"
    return jax_row, torch_row, check


def test_float64_case_first_step_losses_agree_to_float64_rounding(tmp_path, monkeypatch):
    """`tiny_f64` (the tiny MMARD case with every network in float64 on both sides: ours under jax.enable_x64, PyTorch's
    'f64' form) through both workers: the first-step losses agree within the float64 rule, 10x tighter than
    float32's, both rows say float64, the FLOP count traces the float64 step, and the worker leaves x64 off."""
    jax_row, torch_row, check = _first_step_losses_agree(CASES["tiny_f64"], tmp_path, monkeypatch, form="f64",
                                                         count_flops=True)
    assert jax_row["flops_per_step"] > 0
    assert jax_row["dtype"] == torch_row["dtype"] == "float64" and check["loss_rtol"] == 1e-5
    assert check["loss_rel_diff"] < 1e-6, check
    assert not jax.config.jax_enable_x64


def test_cpu_sota_has_a_case_per_later_method_against_its_transcription():
    """`--cases=cpu_sota` runs a CPU case of every 2023-2026 method (SAAD, DGAD, ABSLD, Fair-ARD on ARD and RSLAD,
    CIARD) besides those of AdaAD, AdaIAD, IGDM and PeerAiD, each sized as the other CPU cases and timed against the
    PyTorch transcription of its published script (the method, prefixed by its plug-ins: `fair_ard`; CIARD's own
    loop, published_steps.LOOPS), which uses the networks ours does. CIARD's case runs in its main phase (the robust
    teacher trained) on both sides: ours builds the robust teacher from the teacher's start weights with the
    trainer's config.rteacher optimizer and the clean teacher from other weights (the state's shapes only:
    `jax.eval_shape`), and the PyTorch step is CiardScript's."""
    names = bench_cases.case_names("cpu_sota")
    assert {"saad", "dgad", "absld", "fair_ard", "fair_rslad", "ciard"} <= set(CPU_LATER)
    assert [transcription(CASES[n]) for n in names] == ["adaad", "adaiad", "igdm", "peeraid", *CPU_LATER]
    size = lambda c: (c.student, c.student_kwargs, c.batch, c.size, c.dtype, c.pgd_steps)  # noqa: E731
    for name in names:
        case, peer = CASES[name], transcription(CASES[name])
        assert size(case) == size(CASES["cpu_adaad_wrn16_2_wrn10_1_16px"]), name
        assert case.teacher in ("", "wide_resnet") and case.teacher_kwargs in ({}, {"depth": 16, "width": 2}), name
        assert peer in published_steps.STEPS or peer in published_steps.LOOPS, name
        used = methods.get_method(case.method, plugins=case.plugins).networks()
        assert used == {"student", *published_steps.NETWORKS.get(peer, ())}, name
    _ciard_case_builds_both_teachers(CASES["cpu_ciard_wrn16_2_wrn10_1_16px"])


def _ciard_case_builds_both_teachers(case):
    """CIARD's benchmark step, abstractly: the robust teacher trained with its own optimizer from the teacher's start
    (the same weights, sharpened alike), the clean teacher frozen with other weights; the PyTorch side's step is
    CiardScript's on the three networks, its loss the student's plus the robust teacher's CE in the main phase."""
    _, nets, method, txs, _ = bench_step.jax_step_builder(case)
    assert method.phase(bench_cases.EPOCH) == "main" and nets.trained() == ("student", "rteacher")
    assert nets.teacher is None and nets.teacher2 is not None
    one = {"w": jnp.ones(())}
    first_update = lambda tx: float(tx.update(one, tx.init(one), one)[0]["w"])  # noqa: E731 - gradient 1 at w = 1
    # The robust teacher's own rate (1e-4, CIARD.py:148; the student's 0.1), both with weight decay 2e-4.
    np.testing.assert_allclose(first_update(txs["rteacher"]), -1e-4 * (1 + 2e-4), rtol=1e-6)
    np.testing.assert_allclose(first_update(txs["student"]), -0.1 * (1 + 2e-4), rtol=1e-6)
    init = lambda m, salt: {"params": {"fc": {"kernel": jnp.full((2, 2), 1.0 + salt)}}}  # noqa: E731
    start = bench_step.sharpen_teacher(dataclasses.replace(case, teacher_scale=3.0),
                                       bench_step.frozen_variables(case, nets, init))
    frozen, initial = bench_step.split_start(start)
    assert set(frozen) == {"teacher2"} and set(initial) == {"rteacher"}
    assert float(initial["rteacher"]["params"]["fc"]["kernel"][0, 0]) == 3.0  # the teacher's start (salt 0), x3
    assert float(frozen["teacher2"]["params"]["fc"]["kernel"][0, 0]) == 2.0  # other weights, not sharpened
    shapes = bench_step._abstract_args(case, nets, method, txs, n_images=512)
    assert set(shapes[0].nets) == {"student", "rteacher"} and set(shapes[1]) == {"teacher2"}
    torch_nets = {n: build_model("wide_resnet", 10, WRN10_1) for n in ("student", "rteacher", "teacher2")}
    settings = torch_step.Settings(method=transcription(case), steps=1)
    step = torch_step.make_step(settings, torch_nets)
    assert isinstance(step.script, published_steps.CiardScript)
    assert (step.script.teacher, step.script.teacher_nat) == (torch_nets["rteacher"], torch_nets["teacher2"])


def test_later_method_case_first_step_losses_agree(tmp_path, monkeypatch):
    """Fair-ARD's CPU case shrunk (`tiny_fair_ard`: a WRN-10-1 teacher, 8x8, batch 8, PGD-2) through both workers:
    the plug-in reaches both sides (ours `plugins=fair`, the transcription of Fair-ARD.py), and so does the case's
    sharpened teacher (its classifier x30, through the start file)."""
    case = CASES["tiny_fair_ard"]
    full = CASES["cpu_fair_ard_wrn16_2_wrn10_1_16px"]
    assert (case.method, case.plugins, case.teacher_scale) == (full.method, full.plugins, full.teacher_scale)
    assert (transcription(case), case.teacher_scale) == ("fair_ard", 30.0)
    _first_step_losses_agree(case, tmp_path, monkeypatch)


def test_flop_count_matches_unrolled_program():
    """f(0) + steps * (f(1) - f(0)) equals the cost analysis of the fully unrolled step."""
    case = CASES["tiny"]
    mesh = parallel.data_mesh(jax.devices()[:1])
    student = models.create(case.student, 10, bn_axis_name=parallel.AXIS, **case.student_kwargs)
    teacher = models.create(case.teacher, 10, **case.teacher_kwargs)
    nets = train_step.Networks(student, teacher)
    shape = (case.size, case.size, 3)
    t_vars = jax.eval_shape(lambda: teacher.init(jax.random.key(0), jnp.zeros((1,) + shape), train=False))
    method = methods.get_method(case.method)
    schedule = train_step.make_lr_schedule(0.1, 4, 2)
    txs = {"student": train_step.make_optimizer(schedule)}
    state = jax.eval_shape(lambda: train_step.init_state(nets, method, txs, jax.random.key(0), shape))
    args = (state, {"teacher": t_vars}, jax.ShapeDtypeStruct((16,) + shape, jnp.uint8),
            jax.ShapeDtypeStruct((16,), jnp.int32), jax.ShapeDtypeStruct((case.batch,), jnp.int32),
            jax.ShapeDtypeStruct((), jnp.int32))

    def flops(steps, unroll):
        settings = train_step.StepSettings(steps=steps, unroll=unroll)
        fn = train_step.make_train_step(nets, method, "main", txs, schedule, settings, mesh, 0)
        return fn.lower(*args).cost_analysis()["flops"]

    extrapolated = flops(0, 1) + 3 * (flops(1, 1) - flops(0, 1))
    assert flops(3, 1) < extrapolated  # a rolled loop's body is counted once
    np.testing.assert_allclose(flops(3, True), extrapolated, rtol=1e-5)  # the loop counter's few flops


def test_augment_equals_ours():
    """The PyTorch crop + flip equals data.augment's on the same offsets and flips."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6,) + IMG, dtype=np.uint8)
    offsets = rng.integers(0, 5, (6, 2)).astype(np.int32)
    flips = np.array([True, False, True, True, False, False])
    ours = np.asarray(to_float(crop_and_flip(jnp.asarray(images), jnp.asarray(offsets), jnp.asarray(flips), padding=2)))
    theirs = torch_step.augment(torch.from_numpy(images).permute(0, 3, 1, 2), torch.arange(6),
                                torch.from_numpy(offsets).long(), torch.from_numpy(flips), padding=2)
    np.testing.assert_array_equal(ours, theirs.permute(0, 2, 3, 1).numpy())



# ----------------------------------------------------------------------------- one step, every method

WRN10_1 = {"depth": 10, "width": 1}
# The published form of each method where ours has several: IAD-I.py's loss (ours defaults to the MMARD paper's
# Table 1 form, which peers.published_steps does not transcribe).
JAX_OVERRIDES = {"iad": {"iad_form": "iad1"}}
STEPS = 2  # train steps per case: the second one starts from moved running statistics and momentum (and MTARD's
#            weights move only from the second batch on: its first batch sets the reference losses)
# Both sides run the networks in float64 (ours: compute dtype float64 under jax.enable_x64, parameters stored in
# float32 as always, BatchNorm statistics held in float64; PyTorch: the 'f64' form) on the same float32 inputs,
# attack and weights: in float32 the two frameworks' BatchNorm outputs differ by ~1e-5, and a pre-activation that
# close to 0 (seen: -3e-6 vs +9e-7 in PeerAiD's second block) flips a ReLU mask and moves a gradient by 1% of the
# update. Our logits stay float32 (layers.classifier casts them), so our losses are float32 sums.
# Tolerances: losses rtol 1e-6, except where our float32 KL at temperature T of two nearly uniform distributions
# cancels (the value only; its gradient, which moves the parameters, does not): T = 30 (ARD, AdaIAD) rtol 3e-3
# (seen 4.7e-4: KL_i ~ 6e-5 from log-probabilities ~ -2.3), T = 5 (PeerAiD) 1e-4; parameters rtol 3e-7 (float32
# storage) + atol 1e-7 + 1e-5 * (how far that tensor moved); running statistics rtol 1e-6 + atol 1e-7; MTARD's
# weight atol 1e-7.
# ABSLD divides the teacher's logits by tau_adv tau_nat (up to 25 here): a flat target, a KL of ~4e-3 (seen 1.1e-6).
# DGAD: float32 KLs summed over classes between nearly uniform distributions (random networks; KL_i ~ 0.05 from
# log-probabilities ~ -2.3), divided by the groups' counts (seen: 2.0e-6 on the loss, 2.6e-6 on a term).
LOSS_RTOL, TEMPERED_LOSS_RTOL = 1e-6, {"ard": 3e-3, "adaiad": 3e-3, "peeraid": 1e-4, "absld": 1e-5, "dgad": 5e-6}
# SAAD weighs each example by 5 (H - min H), H the teacher's entropy at x': a randomly initialised teacher is near
# uniform (H ~ log 10 everywhere, the weights ~1e-5, the step moves nothing), so its classifier is scaled up (a
# confident teacher, as SAAD's robust ones): x SHARP_TEACHER on the teacher's `fc` kernel, both sides.
SHARP_TEACHER = {"saad": 30.0}
# Fair's losses are float32 sums of per-example terms times class weights up to 3x apart (seen: 1.6e-6).
WEIGHTED_LOSS_RTOL = 3e-6
# SAAD's too: per-example weights 5 (H - min H) up to ~10 here (seen: 1.5e-6 with its clean term, beta 0.5).
TEMPERED_LOSS_RTOL["saad"] = WEIGHTED_LOSS_RTOL
# ABSLD's per-class sums: our CE of float32 logits against the script's of float64 ones, summed in float32.
ABSLD_SUM_RTOL = 1e-5
PARAM_RTOL, PARAM_ATOL, PARAM_RTOL_OF_UPDATE, STAT_RTOL, STAT_ATOL, WEIGHT_ATOL = 3e-7, 1e-7, 1e-5, 1e-6, 1e-7, 1e-7
# The published order of train-mode forwards differs from ours (see the reason): losses and parameters agree, the
# running statistics and the second step's eval-mode attack do not.
# Methods whose step is known to differ from the published script's (xfail, strict): none.
KNOWN_DIFFERENCES = {}


def _cases():
    def marks(name):
        return [pytest.mark.xfail(reason=KNOWN_DIFFERENCES[name], strict=True)] if name in KNOWN_DIFFERENCES else []

    return [pytest.param(name, phase, id=f"{name}-{phase}" if len(methods.get_method(name).phases) > 1 else name,
                         marks=marks(name))
            for name in methods.METHODS for phase in methods.get_method(name).phases]


# The 2023-2026 methods' steps are compared in tests/test_published_steps.py (their own file, so that pytest-xdist
# runs them beside this one's).
LATER_METHODS = ("absld", "saad", "dgad")
# CIARD trains its robust teacher (a network this file's comparison does not build): its own step-equality test,
# tests/test_published_steps.py::test_ciard_step_equals_the_published_script.
OWN_STEP_TEST = ("ciard",)


def biased_running_var(module):
    """Makes every BatchNorm2d of a torch module keep its running variance as ours does, in place.

    PyTorch updates the running variance with the unbiased batch variance (x n / (n - 1), n values per channel);
    Flax's BatchNorm (ours) with the biased one. Without this the eval-mode forwards of the second step (the
    attacks of eval-mode methods) already differ by up to 1 / n (3% for n = 32 here; 0.05% at batch 128 on a 4x4
    map); with it, every update PyTorch makes, in the order it makes them, is compared exactly.
    """
    def pre(m, inputs):
        if m.training:
            m._var_before = m.running_var.clone()

    def post(m, inputs, output):
        if m.training:
            n = inputs[0].numel() // inputs[0].shape[1]
            kept = (1.0 - m.momentum) * m._var_before  # the new value is kept + momentum * var * n / (n - 1)
            # Through .data: the train-mode backward reads the batch statistics only, and autograd's version
            # check on the (saved, unused) running buffer would refuse an in-place update.
            m.running_var.data.copy_(kept + (m.running_var.data - kept) * (n - 1) / n)

    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.register_forward_pre_hook(pre)
            m.register_forward_hook(post)
    return module


# XLA:CPU spends most of these tests compiling; LLVM's effort does not change the HLO's arithmetic (measured: a
# tiny MMARD step 14.5 s -> 6.0 s of CPU to compile).
FAST_COMPILE = fast_compile.OPTIONS


@functools.lru_cache(maxsize=None)
def _init_cached(seed):
    module = models.create("wide_resnet", 10, **WRN10_1)
    return jax.device_get(jax.jit(lambda k: module.init(k, jnp.zeros((1,) + IMG), train=False))(
        jax.random.key(seed, impl="rbg")))


def _init(seed):
    """Initial WRN-10-1 variables (host arrays; the parameters do not depend on the compute dtype), a fresh copy."""
    return jax.tree.map(np.array, _init_cached(seed))


def _compare_net(label, jax_vars, start_vars, torch_net):
    """Updated parameters and running statistics of one trained network, ours vs the PyTorch step's; the largest
    differences, for the report."""
    state = {k: v.detach().double().numpy() for k, v in torch_net.state_dict().items()}
    flat, start = naming.flatten_variables(jax_vars), naming.flatten_variables(start_vars)
    worst = {"param": 0.0, "mean": 0.0, "var": 0.0}
    moved = stats_moved = 0.0
    for path, key in naming.match_variables(jax_vars, state).items():
        ours, theirs = np.asarray(flat[path], np.float64), naming.to_flax_layout(state[key])
        where = f"{label}: {'/'.join(path)}"
        if path[0] == "params":
            update = float(np.abs(ours - np.asarray(start[path])).max())
            moved = max(moved, update)
            np.testing.assert_allclose(theirs, ours, rtol=PARAM_RTOL, atol=PARAM_ATOL + PARAM_RTOL_OF_UPDATE * update,
                                       err_msg=where)
            worst["param"] = max(worst["param"], float(np.abs(theirs - ours).max()))
            continue
        stats_moved = max(stats_moved, float(np.abs(ours - np.asarray(start[path])).max()))
        np.testing.assert_allclose(theirs, ours, rtol=STAT_RTOL, atol=STAT_ATOL, err_msg=where)
        worst[path[-1]] = max(worst[path[-1]], float(np.abs(theirs - ours).max()))
    assert moved > 1e-4 and stats_moved > 1e-4, (label, moved, stats_moved)  # the step did move both
    return worst


@pytest.mark.parametrize("method_name,phase", [c for c in _cases()
                                               if c.values[0] not in LATER_METHODS + OWN_STEP_TEST])
def test_torch_step_equals_ours(method_name, phase, capsys):
    """Two train steps of every method on the same weights, batch and random draws, ours vs the PyTorch
    transcription of the published script: the losses, the updated parameters of every trained network (PeerAiD's
    peer too), the BatchNorm running statistics (moved by train-mode attacks and by the published sequence of
    train-mode forwards) and MTARD's weights.

    Deterministic on both sides: our step's own crop/flip and start draws (`bench_step.jax_step_draws`) are passed
    to the PyTorch step; no crop padding, and images in [24, 231] / 255 so that no start leaves [0, 1] (the
    published starts are not clipped, ours are projected: the same point here).
    """
    with jax.enable_x64(True):
        _step_equals_ours(method_name, phase, capsys)


def _step_equals_ours(method_name, phase, capsys, plugins=(), torch_method=None, hparams=None):
    batch, n = 8, 16
    hparams = dict(hparams or {})
    method = methods.get_method(method_name, plugins=plugins, **{**JAX_OVERRIDES.get(method_name, {}), **hparams})
    epoch = 0 if phase == "warmup" else 60  # IAD/AdaIAD: `epoch >= begin` (60) is past the warm-up
    assert method.phase(epoch) == phase
    attack = methods.attack_defaults(method_name)
    settings = train_step.StepSettings(steps=2, crop_padding=0, flip=True, unroll=1, **attack)
    used = method.networks()
    student = models.create("wide_resnet", 10, dtype=jnp.float64, bn_axis_name=parallel.AXIS, **WRN10_1)
    frozen_module = models.create("wide_resnet", 10, dtype=jnp.float64, **WRN10_1)
    nets = train_step.Networks(student, frozen_module if "teacher" in used else None,
                               frozen_module if "teacher2" in used else None,
                               student if "peer" in used else None)
    seeds = {"student": 1, "peer": 2, "teacher": 7, "teacher2": 8}
    variables = {name: _init(seeds[name]) for name in ("student",) + tuple(sorted(used - {"student"}))}
    if method.outer.name in SHARP_TEACHER:
        variables["teacher"]["params"]["fc"]["kernel"] *= SHARP_TEACHER[method.outer.name]
    schedule = train_step.make_lr_schedule(0.1, 4, 2)
    txs = {name: train_step.make_optimizer(schedule) for name in nets.trained()}
    mesh = parallel.data_mesh(jax.devices()[:1])
    step = train_step.make_train_step(nets, method, phase, txs, schedule, settings, mesh, seed=0)
    state = train_step.TrainState(
        step=np.zeros((), np.int32),
        nets={k: train_step.NetState(variables[k]["params"], jax.tree.map(lambda a: a.astype(np.float64),
                                                                           variables[k]["batch_stats"]),
                                     txs[k].init(variables[k]["params"])) for k in nets.trained()},
        method_state=method.init_state(), bad_step=np.full((), -1, np.int32))
    given = _given_epoch_values(method)  # Fair-ARD's weights, ABSLD's temperatures of an epoch after the first
    if method.epoch_terms:
        state = state.replace(epoch_state=method.init_epoch_state(10))
        for term, values in given.items():
            state.epoch_state[term]["value"].update({k: jnp.asarray(v) for k, v in values.items()})
    rng = np.random.default_rng(0)
    images = rng.integers(24, 232, (n,) + IMG, dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int32)
    if method_name == "dgad":  # a teacher right at x on half the batch, and near a tie there (see _tied_teacher)
        variables["teacher"], guess = _tied_teacher(frozen_module, variables["teacher"], images)
        labels[::2] = guess[::2]
    frozen = {k: variables[k] for k in ("teacher", "teacher2") if k in variables}

    torch_nets = {k: to_torch(v, build_model("wide_resnet", 10, WRN10_1)) for k, v in variables.items()}
    for k in nets.trained():
        biased_running_var(torch_nets[k])
    t_step = torch_step.TorchTrainStep(
        torch_nets["student"], torch_nets.get("teacher"),
        torch_step.Settings(method=torch_method or method_name, steps=2, crop_padding=0, flip=True, steps_per_epoch=4,
                    num_epochs=2, kl_form="exact"), torch_step.Form(f64=True), hparams=hparams,
        teacher2=torch_nets.get("teacher2"), peer=torch_nets.get("peer"))
    if "fair" in given:
        t_step.method_state["reweight"] = torch.from_numpy(given["fair"]["weights"])
    if "absld" in given:
        t_step.method_state.update({k: torch.from_numpy(v.copy()) for k, v in given["absld"].items()})

    if method.epoch_terms:  # Fair: half the labels the student's own clean guesses, so that attack iterates count
        guess = np.asarray(student.apply(variables["student"], jnp.asarray(images / 255.0), train=False)).argmax(-1)
        labels[::2] = guess[::2]
    t_images, t_labels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()
    loss_diff = 0.0
    report_terms, swaps_at_adv = {}, 0.0
    compiled = None
    for i in range(STEPS):
        idx = np.arange(i, i + batch, dtype=np.int32)
        args = (state, frozen, images, labels, idx, np.int32(epoch))
        compiled = compiled or step.lower(*args).compile(compiler_options=FAST_COMPILE)
        state, metrics = compiled(*args)
        draws = bench_step.jax_step_draws(0, i, batch, IMG, settings)
        noise = None if draws["noise"] is None else torch.from_numpy(np.array(draws["noise"])).permute(0, 3, 1, 2)
        offsets, flips = (torch.from_numpy(np.array(draws[k])) for k in ("offsets", "flips"))
        out = t_step(t_images, t_labels, torch.from_numpy(idx).long(), offsets.long(), flips, noise, epoch=epoch)
        rtol = TEMPERED_LOSS_RTOL.get(method_name, WEIGHTED_LOSS_RTOL if plugins else LOSS_RTOL)
        np.testing.assert_allclose(float(out["loss"]), float(metrics["loss"]), rtol=rtol, err_msg=f"step {i}")
        loss_diff = max(loss_diff, abs(float(out["loss"]) - float(metrics["loss"])) / abs(float(metrics["loss"])))
        if method_name == "dgad":  # the same split, with both groups present (main.py:409-413), and its terms
            mistakes = float(metrics["dgad_teacher_mistakes"])
            assert mistakes == float(out["dgad_teacher_mistakes"]) and 0 < mistakes < batch, mistakes
            swapped = float(metrics["dgad_adv_swapped"])
            assert swapped == float(out["dgad_adv_swapped"]), swapped
            swaps_at_adv += swapped
            for term in ("dgad_clean", "dgad_adv", "dgad_pcr"):
                np.testing.assert_allclose(float(out[term]), float(metrics[term]), rtol=rtol, err_msg=term)
                term_diff = abs(float(out[term]) - float(metrics[term])) / abs(float(metrics[term]))
                report_terms[term] = max(report_terms.get(term, 0.0), term_diff)
    report = {"loss_rel": loss_diff, **{f"{k}_rel": v for k, v in report_terms.items()}}
    if method_name == "dgad":  # the swap on T(x') ran on some example distilled at x' (main.py:422-427)
        assert swaps_at_adv > 0
        report["adv_swapped"] = swaps_at_adv
    for name in nets.trained():
        after = {"params": state.nets[name].params, "batch_stats": state.nets[name].batch_stats}
        worst = _compare_net(name, jax.device_get(after), variables[name], torch_nets[name])
        report.update({f"{name}_{k}": v for k, v in worst.items()})
    if method_name == "mtard":
        w_ours, w_theirs = float(state.method_state["w_nat"]), t_step.method_state["w_nat"]
        assert abs(w_ours - 0.5) > 1e-5  # the second batch moved it
        np.testing.assert_allclose(w_theirs, w_ours, rtol=0, atol=WEIGHT_ATOL)
        report["w_nat"] = abs(w_ours - w_theirs)
    if "absld" in given:  # the per-class CE sums (resnet18_absld_cifar10.py:113-119) and the next temperatures
        report.update(_absld_epoch_equals(method, state, t_step))
    if "fair" in given:  # Kappa_total (Fair-ARD.py:134-135) and the next epoch's weights (:165-167)
        sums = jax.device_get(state.epoch_state["fair"]["sums"])
        np.testing.assert_array_equal(sums["correct"], t_step.method_state["kappa_total"].numpy())
        assert sums["correct"].sum() > 0 and sums["examples"].sum() == STEPS * batch
        ours = method.epoch_update(state.epoch_state)["fair"]["value"]["weights"]
        theirs = published_steps.fair_weight_assign(t_step.method_state["kappa_total"], STEPS * batch, 2.0,
                                                    method.hparams["fair_eps"])
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=1e-6)
        report["kappa_total"] = int(sums["correct"].sum())
    with capsys.disabled():
        print(f"\n[{method_name}-{phase}] max differences: " + ", ".join(f"{k} {v:.2e}" for k, v in report.items()))


def _tied_teacher(module, variables, images):
    """DGAD's step needs a teacher that is right at x and wrong at x' on some examples (the swap on T(x'), main.py:
    422-427): a random WRN-10-1 puts one class first on every image by ~0.1, which an attack of 2 x 2/255 never
    overturns. The classifier's bias of the most frequent runner-up is raised by the median gap, so the teacher's
    first two classes nearly tie: (those variables, the teacher's clean guesses)."""
    x = jnp.asarray(images / 255.0)
    logits = np.asarray(module.apply(variables, x, train=False), np.float64)
    top = logits.argmax(1)
    runner_up = np.argsort(logits, 1)[:, -2]
    c2 = np.bincount(runner_up).argmax()
    out = jax.tree.map(np.array, variables)
    out["params"]["fc"]["bias"][c2] += np.median(logits[np.arange(len(top)), top] - logits[:, c2])
    return out, np.asarray(module.apply(out, x, train=False)).argmax(-1).astype(np.int32)


def _given_epoch_values(method):
    """{term: {value name: array}}: non-uniform class weights (Fair-ARD) or temperatures (ABSLD) to start from."""
    rng = np.random.default_rng(5)
    out = {}
    for term in method.epoch_terms:
        if term.name == "fair":
            out["fair"] = {"weights": rng.uniform(5 / 6, 5 / 2, 10).astype(np.float32)}
        if term.name == "absld":
            out["absld"] = {k: rng.uniform(0.5, 5.0, 10).astype(np.float32) for k in ("temp_adv", "temp_nat")}
    return out


def _absld_epoch_equals(method, state, t_step):
    """ABSLD's per-class loss sums after the steps equal the script's, and so do the temperatures the epoch boundary
    makes of them (at the first rate, and at the rate after one learning-rate decay)."""
    sums = jax.device_get(state.epoch_state["absld"]["sums"])
    worst = {}
    for part in ("adv", "nat"):
        theirs = t_step.method_state[f"loss_{part}"]
        np.testing.assert_allclose(sums[f"loss_{part}"], theirs.numpy(), rtol=ABSLD_SUM_RTOL)
        worst[f"loss_{part}"] = float(np.abs(sums[f"loss_{part}"] - theirs.numpy()).max())
    assert np.count_nonzero(sums["loss_adv"]) > 3
    hp = published_steps.HPARAMS["absld"]
    for lr_scale in (1.0, 0.1):
        ours = method.epoch_update(state.epoch_state, lr_scale)["absld"]["value"]
        for part in ("adv", "nat"):
            theirs = published_steps.absld_temp_update(t_step.method_state[f"temp_{part}"],
                                                       t_step.method_state[f"loss_{part}"],
                                                       hp["temp_rate"] * lr_scale, hp)
            np.testing.assert_allclose(np.asarray(ours[f"temp_{part}"]), theirs.numpy(), rtol=1e-6)
            worst[f"temp_{part}"] = max(worst.get(f"temp_{part}", 0.0),
                                        float(np.abs(np.asarray(ours[f"temp_{part}"]) - theirs.numpy()).max()))
    return worst


def test_rslad_kl_loss_is_the_kl_plus_a_constant():
    """RSLAD's published kl_loss (1e-5 inside the teacher's log) is the exact KL plus b * log(1 + 1e-5 / b), with the
    same gradient: why `kl_form='exact'` (ours) changes the reported loss and nothing else."""
    gen = torch.Generator().manual_seed(0)
    a = torch.log_softmax(torch.randn(4, 10, generator=gen, dtype=torch.float64), 1).requires_grad_(True)
    b = torch.softmax(3 * torch.randn(4, 10, generator=gen, dtype=torch.float64), 1)
    published, exact = kl_loss_rslad(a, b), kl_loss_rslad(a, b, exact=True)
    torch.testing.assert_close(published - exact, b * torch.log1p(1e-5 / b), rtol=1e-9, atol=1e-15)
    g_pub, = torch.autograd.grad(published.sum(), a)
    g_exact, = torch.autograd.grad(exact.sum(), a)
    torch.testing.assert_close(g_pub, g_exact)


def test_processor_is_read_from_cpuinfo_and_sysfs(tmp_path):
    """Every benchmark row names its processor: model, x86 family/model, the last-level cache from sysfs and the
    widest vector extension, from the first processor block of /proc/cpuinfo (written here in its format)."""
    from mmard_jax.tools import machine

    (tmp_path / "cpuinfo").write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: AMD EPYC 9B14\n"
        "flags\t\t: fpu sse4_2 avx avx2 avx512f\n\nprocessor\t: 1\nmodel name\t: other\n")
    for index, (level, size) in enumerate([(1, "32K"), (2, "1024K"), (3, "32768K")]):
        folder = tmp_path / "cache" / f"index{index}"
        folder.mkdir(parents=True)
        (folder / "level").write_text(f"{level}\n")
        (folder / "size").write_text(f"{size}\n")
    p = machine.processor(str(tmp_path / "cpuinfo"), str(tmp_path / "cache"))
    assert (p["model"], p["family"], p["model_number"], p["l3_bytes"], p["isa"]) == (
        "AMD EPYC 9B14", "25", "17", 32 * 2 ** 20, "avx512f")
    assert machine.describe(p) == f"AMD EPYC 9B14 (x86 family 25 model 17), {p['cores']} cores, 32 MiB last-level " \
                                  "cache, avx512f"
    missing = machine.processor(str(tmp_path / "none"), str(tmp_path / "none"))
    assert machine.describe(missing).startswith("unknown processor, ")


def test_check_defaults_plans_one_change_per_row_and_judges_by_the_spread():
    """--check_defaults: per case an all-defaults row, then each default's alternative alone; a default holds when
    its median step is not slower than the alternative's beyond the rounds' spread."""
    from mmard_jax.tools import bench_defaults

    rows = bench_defaults.plan(["tiny"])
    assert [r[1] for r in rows] == ["defaults"] + [c.setting for c in bench_defaults.CHECKS]
    assert all(r[2] == "auto" and r[3] == {} for r in rows[:1])
    assert {r[1]: (r[2], r[3]) for r in rows[1:]} == {c.setting: (c.option, dict(c.env)) for c in bench_defaults.CHECKS}
    xla, unroll, conv = (c.setting for c in bench_defaults.CHECKS[:3])

    def row(setting, times):
        return {"case": "tiny", "setting": setting, "processor": "p", "step_s": sorted(times)[(len(times) - 1) // 2],
                "step_s_rounds": times}

    checks = bench_defaults.verdicts([row("defaults", [1.0, 1.1]), row(xla, [1.5, 1.6]), row(unroll, [0.95, 0.97]),
                                      row(conv, [0.5, 0.5]), {"case": "tiny", "setting": unroll, "processor": "p",
                                                              "error": "exit 1"}])
    assert [v["holds"] for v in checks] == [True, True, False, None]  # slower alt; within spread; clearly faster
    assert checks[0]["ratio"] == pytest.approx(1.5)  # the medians of two rounds: the lower one (merge_rounds)
    table = bench_defaults.table(checks)
    assert "| **no** |" in table and "failed: exit 1" in table


def test_pipeline_benchmark_parts_on_a_tiny_source():
    """--pipeline's pieces: the loader's steady rate is measured on the trainer's stream (its batches' shape), the
    cores per GPU are the GPU's demand over the best per-worker rate, and the section holds every row."""
    from mmard_jax.data import host_augment, stream
    from mmard_jax.tools import bench_pipeline

    images = np.stack([bench_pipeline.photo(np.random.default_rng(i), 24, 20) for i in range(16)])
    assert images.dtype == np.uint8 and images.shape == (16, 24, 20, 3) and images.std() > 10
    source = stream.ArraySource(images, np.arange(16) % 4, 4)
    row = bench_pipeline.loader_rate(source, host_augment.Augment("random_resized_crop", size=8), batch=4, batches=3,
                                     workers=0)
    assert row["shape"] == [4, 8, 8, 3] and row["images_per_s"] > 0 and row["first_batch_s"] > 0
    loader = [{"input": "ImageNet-shaped", "workers": w, "batch": 4, "images_per_s": r, "first_batch_s": 0.1}
              for w, r in ((0, 500.0), (1, 300.0), (2, 400.0))]
    demand = [{"case": "c", "gflop_per_image": 500.0, "gpu_images_per_s": [600.0, 1000.0]}]
    (cores,) = bench_pipeline.cores_per_gpu(loader, demand, cores=2)  # the best rate, 500/s, on 2 cores
    assert cores["per_core_images_per_s"] == 250.0 and cores["cores_per_gpu"] == [2.4, 4.0]
    trainer = [{"pipeline": "device", "source": "memory", "step_s": 0.5, "images_per_s": 256.0, "first_epoch_s": 9.0}]
    text = bench_pipeline.markdown({"loader": loader, "trainer": trainer, "demand": demand, "cores": [cores]}, "cpu",
                                   "cmd")
    assert text.count("| ImageNet-shaped |") == 3 and "| device, memory | 0.500 |" in text and "| 2.4-4.0 |" in text
