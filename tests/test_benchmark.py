"""The benchmark script runs (on a tiny case, so it cannot rot), and its PyTorch step computes what ours does.

No timing assertions: performance numbers come from `scripts/benchmark.py` runs recorded in BENCHMARKS.md.
"""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mmard_jax import methods, models, parallel, train_step
from mmard_jax.data.augment import crop_and_flip, to_float
from mmard_jax.interop import naming
from mmard_jax.interop.testing import copy_into_torch

ROOT = pathlib.Path(__file__).resolve().parent.parent
IMG = (8, 8, 3)


def load_script(name):
    """scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tr():
    return load_script("torch_reference")


def to_torch(flax_variables, module):
    """`module` (a PyTorch peer) with the Flax variables copied in by the naming rule."""
    return copy_into_torch(flax_variables, module).train()


def test_benchmark_script_runs_tiny_case(tmp_path):
    """The whole script, end to end: one JAX row and one PyTorch row, a JSON file and a Markdown section."""
    out_json, out_md = tmp_path / "rows.json", tmp_path / "BENCH.md"
    cmd = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--cases=tiny", "--torch_forms=eager", "--unroll=1",
           "--warmup=1", "--steps=1", f"--json={out_json}", f"--append={out_md}", "--title=test"]
    # One PyTorch thread: with two, a busy shared CPU stalls every parallel region (seen: 5.6 s vs 0.03 s a step).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out_json.read_text())
    assert [(r["impl"], "error" in r) for r in rows] == [("jax", False), ("torch", False)], rows
    jax_row, torch_row = rows
    assert jax_row["flops_per_step"] > 0 and torch_row["flops_per_step"] == jax_row["flops_per_step"]
    assert jax_row["images_per_s"] > 0 and torch_row["images_per_s"] > 0 and jax_row["peak_mem_bytes"] > 0
    text = out_md.read_text()
    assert "## " in text and "| tiny | jax |" in text and "| tiny | torch | eager |" in text


def test_flop_count_matches_unrolled_program():
    """f(0) + steps * (f(1) - f(0)) equals the cost analysis of the fully unrolled step."""
    bench = load_script("benchmark")
    case = bench.CASES["tiny"]
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


def test_augment_equals_ours(tr):
    """The PyTorch crop + flip equals data.augment's on the same offsets and flips."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6,) + IMG, dtype=np.uint8)
    offsets = rng.integers(0, 5, (6, 2)).astype(np.int32)
    flips = np.array([True, False, True, True, False, False])
    ours = np.asarray(to_float(crop_and_flip(jnp.asarray(images), jnp.asarray(offsets), jnp.asarray(flips), padding=2)))
    theirs = tr.augment(torch.from_numpy(images).permute(0, 3, 1, 2), torch.arange(6), torch.from_numpy(offsets).long(),
                        torch.from_numpy(flips), padding=2)
    np.testing.assert_array_equal(ours, theirs.permute(0, 2, 3, 1).numpy())


@pytest.fixture(scope="module")
def tiny_models():
    """Student WRN-10-1 (BN synced over 'data') and teacher WRN-10-2 with initial variables, as host arrays."""
    student = models.create("wide_resnet", 10, depth=10, width=1, bn_axis_name=parallel.AXIS)
    teacher = models.create("wide_resnet", 10, depth=10, width=2)
    init = lambda m, seed: jax.jit(lambda k: m.init(k, jnp.zeros((1,) + IMG), train=False))(  # noqa: E731
        jax.random.key(seed, impl="rbg"))
    return student, teacher, jax.device_get(init(student, 1)), jax.device_get(init(teacher, 7))


@pytest.mark.parametrize("method_name", ["mmard", "rslad"])
def test_torch_step_equals_ours(tr, tiny_models, method_name):
    """One train step on the same weights and batch: same loss and same updated parameters.

    Deterministic settings on both sides: no crop or flip, and a zero-width Gaussian start, so PGD starts
    at x itself (MMARD's and RSLAD's inner objectives have a non-zero gradient there).
    """
    batch, n = 8, 16
    student, teacher, s_vars, t_vars = tiny_models
    mesh = parallel.data_mesh(jax.devices()[:1])
    method = methods.get_method(method_name)
    schedule = train_step.make_lr_schedule(0.1, 4, 2)
    tx = train_step.make_optimizer(schedule)
    settings = train_step.StepSettings(steps=2, gaussian_scale=0.0, crop_padding=0, flip=False, unroll=1)
    nets = train_step.Networks(student, teacher)
    step = train_step.make_train_step(nets, method, "main", {"student": tx}, schedule, settings, mesh, seed=0)
    params = s_vars["params"]
    state = train_step.TrainState(
        step=np.zeros((), np.int32),
        nets={"student": train_step.NetState(params, s_vars["batch_stats"], tx.init(params))},
        method_state=method.init_state(), bad_step=np.full((), -1, np.int32))

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n,) + IMG, dtype=np.uint8)
    labels = rng.integers(0, 10, n).astype(np.int32)
    idx = np.arange(3, 3 + batch, dtype=np.int32)

    t_student = to_torch(s_vars, tr.build_model("wide_resnet", 10, {"depth": 10, "width": 1}))
    t_teacher = to_torch(t_vars, tr.build_model("wide_resnet", 10, {"depth": 10, "width": 2}))
    t_step = tr.TorchTrainStep(t_student, t_teacher, tr.Settings(
        method=method_name, steps=2, gaussian_scale=0.0, crop_padding=0, flip=False, steps_per_epoch=4, num_epochs=2))

    state, metrics = step(state, {"teacher": t_vars}, images, labels, idx, np.int32(0))
    out = t_step(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long(),
                 torch.from_numpy(idx).long(), torch.zeros(batch, 2, dtype=torch.long), torch.zeros(batch, dtype=torch.bool))

    np.testing.assert_allclose(float(out["loss"]), float(metrics["loss"]), rtol=1e-5)
    after = naming.flatten_variables({"params": jax.device_get(state.student.params)})
    start = naming.flatten_variables({"params": params})
    torch_params = {k: v.detach().numpy() for k, v in t_student.state_dict().items()
                    if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}
    moved = 0.0
    for path, key in naming.match_variables({"params": params}, torch_params).items():
        ours, theirs = np.asarray(after[path]), naming.to_flax_layout(torch_params[key])
        update = np.abs(ours - np.asarray(start[path])).max()
        moved = max(moved, update)
        np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-6 + 1e-3 * update, err_msg="/".join(path))
    assert moved > 1e-4  # the step did update the parameters
