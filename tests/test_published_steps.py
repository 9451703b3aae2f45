"""The 2023-2026 methods' train steps against PyTorch transcriptions of their published scripts
(tests/peers/published_steps.py): ABSLD, SAAD, DGAD and Fair-ARD's plug-in on ARD, IAD, RSLAD and MTARD, with
test_benchmark.py's comparison (`_step_equals_ours`), in a file of their own so that pytest-xdist runs them in
parallel with the twelve original methods'."""

import jax
import pytest

from mmard_jax import train_step
from test_benchmark import LATER_METHODS, _cases, _step_equals_ours


@pytest.mark.parametrize("method_name,phase", [c for c in _cases() if c.values[0] in LATER_METHODS])
def test_later_method_step_equals_the_published_script(method_name, phase, capsys):
    """Two train steps of ABSLD, SAAD and DGAD, ours vs the transcription of the published script, as
    test_benchmark.py's `test_torch_step_equals_ours` does for the twelve (losses, parameters, BatchNorm statistics,
    and the method state an epoch boundary makes: ABSLD's temperatures)."""
    with jax.enable_x64(True):
        _step_equals_ours(method_name, phase, capsys)


@pytest.mark.parametrize("method_name,phase", [("ard", "main"), ("iad", "main"), ("rslad", "main"),
                                               ("mtard", "main")])
def test_fair_step_equals_the_published_script(method_name, phase, capsys):
    """Fair-ARD's plug-in on ARD, IAD, RSLAD and MTARD against transcriptions of Fair-ARD.py, Fair-IAD.py,
    Fair-RSLAD.py and Fair-MTARD.py from non-uniform class weights: the losses, parameters and BatchNorm statistics
    after two steps (MTARD's weight too), the per-class counts of correct attack iterates (Kappa_total) and the
    class weights the epoch boundary makes of them (weight_assign)."""
    with jax.enable_x64(True):
        _step_equals_ours(method_name, phase, capsys, plugins=("fair",), torch_method=f"fair_{method_name}")


@pytest.mark.parametrize("hparams", [{"beta": 0.5, "gamma": 2.0, "lambda_inner": 20.0}])
def test_saad_step_with_its_clean_term_equals_the_published_script(hparams, capsys):
    """SAAD's options main.sh leaves at their defaults (beta 0 drops the clean term): the clean term, a Renyi order
    other than Shannon's and a larger attack correction, the same on both sides (saad.py:68-82, attacks.py:177)."""
    with jax.enable_x64(True):
        _step_equals_ours("saad", "main", capsys, hparams=hparams)




def test_ciard_step_equals_the_published_script(capsys):
    """Two CIARD steps, ours vs the transcription of CIARD.py's loop (peers.published_steps.CiardScript), at the
    1-based epoch 215: the robust teacher training (epoch > 50) with its own optimizer, both learning rates past their
    decay starts, the temperature rate cut x0.1 after each step (the script's per-step milestone), temperatures
    away from their bounds. Compared: the loss terms, the push weight and selection, the temperatures, the
    parameters and BatchNorm statistics of the student AND the robust teacher."""
    with jax.enable_x64(True):
        _ciard_step_equals(capsys)


# The push term is a mean of kl(a, b) = -a b + log(b + 1e-5) b, small differences of O(1) terms (~2e-4 here): its
# float32-level rounding (the logits' float32 inputs on both sides) shows at ~2e-5 relative, and in the loss at ~5e-6.
CIARD_RTOL = 3e-5


def _ciard_step_equals(capsys):
    import jax.numpy as jnp
    import numpy as np
    import torch

    from mmard_jax import methods, models, parallel
    from mmard_jax.tools import bench_step
    from peers import published_steps, torch_step
    from peers.architectures import build_model
    from test_benchmark import FAST_COMPILE, IMG, STEPS, WRN10_1, _compare_net, _init, biased_running_var, to_torch

    batch, n, epoch, spe, teacher_lr = 8, 16, 214, 4, 0.05  # a teacher rate that moves a WRN-10-1 in two steps
    method = methods.get_method("ciard")
    assert method.phase(epoch) == "main"
    settings = train_step.StepSettings(steps=2, crop_padding=0, flip=True, unroll=1, **methods.attack_defaults("ciard"))
    trained = models.create("wide_resnet", 10, dtype=jnp.float64, bn_axis_name=parallel.AXIS, **WRN10_1)
    frozen_module = models.create("wide_resnet", 10, dtype=jnp.float64, **WRN10_1)
    nets = train_step.Networks(trained, teacher2=frozen_module, rteacher=trained)
    variables = {"student": _init(1), "rteacher": _init(7), "teacher2": _init(8)}
    schedules = {"student": train_step.make_lr_schedule(0.1, spe, 300, "cosine_exp", (149,)),
                 "rteacher": train_step.make_lr_schedule(teacher_lr, spe, 300, "cosine_exp", (49,))}
    txs = {"student": train_step.make_optimizer(schedules["student"]),
           "rteacher": train_step.make_optimizer(schedules["rteacher"], momentum=0.1, weight_decay=2e-4)}
    mesh = parallel.data_mesh(jax.devices()[:1])
    step = train_step.make_train_step(nets, method, "main", txs, schedules["student"], settings, mesh, seed=0)
    temps = {"temp_adv": 2.5, "temp_nat": 1.7}
    state = train_step.TrainState(
        step=np.full((), epoch * spe, np.int32),
        nets={k: train_step.NetState(variables[k]["params"], jax.tree.map(lambda a: a.astype(np.float64),
                                                                           variables[k]["batch_stats"]),
                                     train_step.advance_counts(txs[k].init(variables[k]["params"]), epoch * spe))
              for k in ("student", "rteacher")},
        method_state={**{k: jnp.asarray(v, jnp.float32) for k, v in temps.items()},
                      "temp_rate": jnp.asarray(1e-3, jnp.float32)},
        bad_step=np.full((), -1, np.int32))
    rng = np.random.default_rng(0)
    images = rng.integers(24, 232, (n,) + IMG, dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int32)
    frozen = {"teacher2": variables["teacher2"]}

    torch_nets = {k: to_torch(v, build_model("wide_resnet", 10, WRN10_1)).double() for k, v in variables.items()}
    for k in ("student", "rteacher"):
        biased_running_var(torch_nets[k])
    script = published_steps.CiardScript(torch_nets["student"], torch_nets["rteacher"], torch_nets["teacher2"],
                                         hp={"teacher_lr": teacher_lr}, steps=2)
    script.temp_adv, script.temp_nat = temps["temp_adv"], temps["temp_nat"]
    t_images, t_labels = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()
    report, compiled, pushed = {}, None, 0
    for i in range(STEPS):
        idx = np.arange(i, i + batch, dtype=np.int32)
        args = (state, frozen, images, labels, idx, np.int32(epoch))
        compiled = compiled or step.lower(*args).compile(compiler_options=FAST_COMPILE)
        state, metrics = compiled(*args)
        draws = bench_step.jax_step_draws(0, epoch * spe + i, batch, IMG, settings)
        x = torch_step.augment(t_images, torch.from_numpy(idx).long(), torch.from_numpy(np.array(draws["offsets"])),
                               torch.from_numpy(np.array(draws["flips"])), 0).double()
        noise = torch.from_numpy(np.array(draws["noise"])).permute(0, 3, 1, 2).double()
        out = script.step(x, t_labels[torch.from_numpy(idx).long()], noise, epoch=epoch + 1)
        assert int(metrics["push_examples"]) == out["push_examples"] and 0 < out["push_examples"]
        pushed += out["push_examples"]
        assert float(metrics["push_weight"]) == out["push_weight"] > 0
        for k in ("student_loss", "kl_adv_radv", "kl_nat_t2nat", "push", "teacher_ce", "temp_adv", "temp_nat"):
            report[k] = max(report.get(k, 0.0), abs(float(metrics[k]) - out[k]) / abs(out[k]))
        for k in ("student_loss", "kl_adv_radv", "kl_nat_t2nat", "push", "teacher_ce", "temp_adv", "temp_nat"):
            np.testing.assert_allclose(float(metrics[k]), out[k], rtol=CIARD_RTOL, err_msg=f"{k}, step {i}")
        np.testing.assert_allclose(float(metrics["loss"]), out["student_loss"] + out["teacher_ce"], rtol=CIARD_RTOL)
    for k in ("temp_adv", "temp_nat"):  # after both updates; each moved (away from the bounds)
        np.testing.assert_allclose(float(state.method_state[k]), getattr(script, k), rtol=1e-6)
        assert float(state.method_state[k]) != temps[k]
    np.testing.assert_allclose(float(state.method_state["temp_rate"]), script.temp_learn_rate, rtol=1e-6)
    assert script.temp_learn_rate < 2e-5  # x0.1 per step of the milestone epoch
    for name in ("student", "rteacher"):
        after = {"params": state.nets[name].params, "batch_stats": state.nets[name].batch_stats}
        worst = _compare_net(name, jax.device_get(after), variables[name], torch_nets[name])
        report.update({f"{name}_{k}": v for k, v in worst.items()})
    with capsys.disabled():
        print(f"\n[ciard] pushed {pushed}; max differences: " + ", ".join(f"{k} {v:.2e}" for k, v in report.items()))
