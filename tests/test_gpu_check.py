"""GPU readiness without a GPU: scripts/gpu_check.sh's dry mode (so it cannot rot) and the CPU-only defaults
(the conv2d gradient switch itself: tests/test_conv_grad.py)."""

import json
import os
import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np

from mmard_jax.models import layers
from mmard_jax.tools import machine
from mmard_jax.tools.bench_cases import CASES

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_writes_every_part(tmp_path):
    """`scripts/gpu_check.sh --dry` runs parts (a)-(c) with tiny cases on the CPU and summarizes all of them; part
    (d) (AutoAttack: four attacks to compile, over a minute here) is skipped in the dry mode, and the summary says
    so. The dry parts are smaller than the GPU ones (benchmark: the tiny case, PyTorch eager only; settings: one
    row, the same as the benchmark's JAX row, which it loads from their shared compilation cache; the smoke test's
    CPU half loads the initialisations it shares with the accelerator half), so the test stays near a minute; the GPU
    cases' names and forms are checked against bench_cases.CASES below.

    Two simulated CPU devices: the smoke test's shard_map then runs on two devices against one."""
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "OMP_NUM_THREADS": "1",
           "GPU_CHECK_WORK": str(work), "PYTHON": os.environ.get("PYTHON", "python")}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry", str(out)], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["logs.txt", "results.json", "summary.md"]
    parts = json.loads((out / "results.json").read_text())["parts"]
    assert [parts[k]["status"] for k in ("a_smoke", "b_bench", "c_settings")] == ["ok"] * 3, \
        {k: v["status"] for k, v in parts.items()}
    assert parts["d_autoattack"]["status"] == "skipped (cap 0)"
    smoke = parts["a_smoke"]["output"]
    assert smoke["ok"] and len(smoke["ours"]["devices"]) == 2 and len(smoke["cpu"]["devices"]) == 1
    # scripts/benchmark.py end to end: a JAX and a PyTorch row of MMARD; the PyTorch row starts from the JAX row's
    # weights and first draws, so their first-step losses agree (PeerAiD's peer: tests/test_benchmark.py).
    bench = parts["b_bench"]["output"]
    assert [(r["case"], r["impl"], r["form"].split(",")[0]) for r in bench] == [("tiny", "jax", "float32"),
                                                                               ("tiny", "torch", "eager")]
    jax_row, torch_row = bench
    assert jax_row["flops_per_step"] > 0 and torch_row["flops_per_step"] == jax_row["flops_per_step"]
    assert jax_row["images_per_s"] > 0 and torch_row["images_per_s"] > 0 and jax_row["peak_mem_bytes"] > 0
    assert torch_row["weights"] == "the JAX row's" and torch_row["comparable"] is True, torch_row
    assert jax_row["processor"] == torch_row["processor"] == machine.describe()  # every row names its processor
    np.testing.assert_allclose(torch_row["first_loss"], jax_row["first_loss"], rtol=1e-4)
    table = (work / "b_bench.md").read_text()
    assert "| tiny | jax |" in table and "| tiny | torch | eager |" in table and "not comparable" not in table
    settings = parts["c_settings"]["output"]
    assert [r["form"].split(", XLA_FLAGS")[0] for r in settings] == ["float32, unroll=1, conv_grad=lax"]
    assert settings[0]["first_loss"] == jax_row["first_loss"] and settings[0]["images_per_s"] > 0  # the same row
    summary = (out / "summary.md").read_text()
    assert "(e) peak memory per case" in summary and "| tiny | torch eager |" in summary
    assert "| d_autoattack | skipped (cap 0) |" in summary


def test_gpu_check_cases_exist():
    """The cases and forms gpu_check.sh asks scripts/benchmark.py for on the GPU are ones it has (bench_cases.CASES)."""
    text = (ROOT / "scripts" / "gpu_check.sh").read_text()
    names = set(CASES)  # scripts/benchmark.py's cases (--list)
    gpu = text[text.index("else\n  CAP_A"):text.index("\nfi\n")]
    wanted = set()
    for line in gpu.splitlines():
        for key in ("BENCH_CASES=", "LOOP_CASE="):
            for token in line.split():
                if token.startswith(key):
                    wanted |= {n for n in token[len(key):].rstrip(";").replace("$BENCH_CASES,", "").split(",") if n}
    assert wanted and wanted <= names, wanted - names
    assert "mmard_rn18_wrn34_10_f32" in wanted and "mmard_mnv2_wrn34_10" in wanted and "rslad_rn18_wrn34_10" in wanted


def test_cpu_tuned_choices_are_cpu_only_by_default(monkeypatch):
    """Choices measured only on XLA:CPU (depthwise taps, conv2d's input gradient) resolve to the
    library's form on any other backend, and their explicit settings still win there."""
    from mmard_jax import runtime

    def depthwise_jaxpr(impl):
        conv = layers.DepthwiseConv((3, 3), 1, layers.PAD_SAME_TORCH, impl=impl)
        x = jnp.ones((1, 6, 6, 4))
        v = jax.eval_shape(lambda: conv.init(jax.random.key(0), x))
        return str(jax.make_jaxpr(lambda v, z: conv.apply(v, z))(v, x))

    assert runtime.resolve_unroll("auto") == 1 and "conv_general_dilated" not in depthwise_jaxpr("auto")
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert runtime.resolve_unroll("auto") == 1 and runtime.resolve_unroll("full") is True
    assert "feature_group_count=4" in depthwise_jaxpr("auto") and "conv_general_dilated" not in depthwise_jaxpr("taps")
    assert layers.resolve_conv_grad("auto") == "lax"
