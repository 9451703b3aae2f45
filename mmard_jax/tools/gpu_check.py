"""The library of scripts/gpu_check.py (the Python parts of scripts/gpu_check.sh): the correctness smoke test
(part a) and the summary of every part.

Part (a) runs a tiny MMARD train step (jit + shard_map over every accelerator) and an evaluation (clean and PGD-20)
on the default backend, and the same on one CPU device at float32 precision 'highest' on both, and checks that the
step is finite and moves the weights, and that the accelerator agrees with the CPU. The summary reads every part's
status and outputs from WORK and writes at most three files (the device tool returns at most 8 from $OUT).
JAX is imported inside the smoke test only (its caller sets XLA's flags first); the summary needs none.
"""

import json
import pathlib
import time
from typing import Any, Dict, List

PARTS = {
    "a_smoke": "(a) tiny train step + evaluation under jit/shard_map, accelerator vs CPU",
    "b_bench": "(b) train step vs PyTorch: MMARD RN-18 / MNV2 <- WRN-34-10, RSLAD RN-18 <- WRN-34-10, bf16 and f32",
    "c_settings": "(c) rolled vs unrolled PGD loop, our conv2d input gradient vs the library's",
    "d_autoattack": "(d) AutoAttack, ours vs the original on the same weights",
}
# Smoke test: 2 steps of MMARD with PGD-2 on 16x16 images, batch 16; evaluation (clean, PGD-20) on 32 images.
SMOKE = {"batch": 16, "size": 16, "steps": 2, "pgd_steps": 2, "n_eval": 32}
# The accelerator and the CPU at precision 'highest' agree on the losses to float32 rounding, and on the robust
# accuracy up to the few examples a rounding-flipped PGD sign decides.
SMOKE_LOSS_RTOL, SMOKE_ACC_ATOL = 1e-3, 2 / 32


def smoke_run(devices, seed: int = 0) -> Dict[str, Any]:
    """Losses of the tiny step, how far the weights moved, and the evaluation's accuracies, on `devices`."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mmard_jax import evaluator, methods, models, parallel, train_step
    from mmard_jax.interop import naming

    size, batch = SMOKE["size"], SMOKE["batch"]
    mesh = parallel.data_mesh(devices)
    student = models.create("wide_resnet", 10, depth=10, width=1, bn_axis_name=parallel.AXIS)
    teacher = models.create("wide_resnet", 10, depth=10, width=1)
    method = methods.get_method("mmard")
    nets = train_step.Networks(student, teacher)
    schedule = train_step.make_lr_schedule(0.1, 10, 2)
    txs = {"student": train_step.make_optimizer(schedule)}
    settings = train_step.StepSettings(steps=SMOKE["pgd_steps"], **methods.attack_defaults("mmard"))
    shape = (size, size, 3)
    with jax.default_device(devices[0]):
        state = train_step.init_state(nets, method, txs, jax.random.key(seed), shape)
        t_vars = jax.jit(lambda k: teacher.init(k, jnp.zeros((1,) + shape), train=False))(jax.random.key(seed + 1))
    start = jax.device_get(state.student.params)
    state, frozen = parallel.put_replicated((state, {"teacher": t_vars}), mesh)
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (4 * batch,) + shape, dtype=np.uint8)
    labels = rng.integers(0, 10, 4 * batch).astype(np.int32)
    step = train_step.make_train_step(nets, method, "main", txs, schedule, settings, mesh, seed)
    data = parallel.put_replicated((images, labels), mesh)
    losses = []
    for i in range(SMOKE["steps"]):
        idx = jax.device_put(np.arange(i * batch, (i + 1) * batch, dtype=np.int32), parallel.batch_sharded(mesh))
        state, metrics = step(state, frozen, data[0], data[1], idx, jnp.asarray(0, jnp.int32))
        losses.append(float(metrics["loss"]))
    params = jax.device_get(state.student.params)
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                for a, b in zip(naming.flatten_variables(params).values(), naming.flatten_variables(start).values()))
    ev = evaluator.Evaluator(student, images[: SMOKE["n_eval"]], labels[: SMOKE["n_eval"]], mesh=mesh,
                             batch_size=32, progress=False)
    variables = {"params": state.student.params, "batch_stats": state.student.batch_stats}
    acc = ev.run(variables, ["clean", "pgd_s"], seed=seed).accuracies()
    return {"losses": losses, "max_param_change": moved, "accuracies": acc, "bad_step": int(state.bad_step),
            "devices": [f"{d.platform}:{d.device_kind}" for d in devices]}


def smoke(out_path: str) -> Dict[str, Any]:
    """Part (a): the tiny step and evaluation on the default backend's devices and on one CPU device; the result,
    also written to `out_path` as JSON (its 'ok' says whether every check passed)."""
    import jax
    import numpy as np

    t0 = time.perf_counter()
    accel = jax.devices()
    cpu = jax.devices("cpu")[:1]
    with jax.default_matmul_precision("highest"):
        ours = smoke_run(accel)
        ref = smoke_run(cpu)
    stats = accel[0].memory_stats() or {}
    checks = {
        "finite": bool(np.all(np.isfinite(ours["losses"])) and ours["bad_step"] < 0),
        "weights_moved": ours["max_param_change"] > 1e-5,
        "losses_match_cpu": bool(np.allclose(ours["losses"], ref["losses"], rtol=SMOKE_LOSS_RTOL)),
        "accuracies_match_cpu": all(abs(ours["accuracies"][k] - ref["accuracies"][k]) <= SMOKE_ACC_ATOL
                                    for k in ours["accuracies"]),
    }
    result = {"part": "a_smoke", "backend": jax.default_backend(), "ours": ours, "cpu": ref, "checks": checks,
              "ok": all(checks.values()), "seconds": time.perf_counter() - t0,
              "peak_mem_bytes": stats.get("peak_bytes_in_use"), "jax": jax.__version__}
    pathlib.Path(out_path).write_text(json.dumps(result, indent=2))
    return result


# ----------------------------------------------------------------------------- summary


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: pathlib.Path) -> List[Any]:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def _fmt_mem(n) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB"


def _memory_rows(parts: Dict[str, Dict[str, Any]]) -> List[str]:
    """Part (e): the peak memory of every measured case, from the other parts' outputs."""
    rows = []
    smoke_out = parts.get("a_smoke", {}).get("output") or {}
    if smoke_out.get("peak_mem_bytes"):
        rows.append(f"| (a) smoke | jax | {_fmt_mem(smoke_out['peak_mem_bytes'])} (device peak) |")
    for key in ("b_bench", "c_settings"):
        for r in parts.get(key, {}).get("output") or []:
            if "error" not in r:
                rows.append(f"| {r['case']} | {r['impl']} {r['form']} | {_fmt_mem(r.get('peak_mem_bytes'))} "
                            f"({r.get('mem_kind', '')}) |")
    return rows


def summary(work: str, out_dir: str) -> str:
    """Collects every part's status (WORK/<part>.status.json), output and log into OUT_DIR (summary.md,
    results.json, logs.txt); the head of summary.md (mode and the status of every part)."""
    work_dir, out = pathlib.Path(work), pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    parts, logs, md = {}, [], ["# gpu_check summary", ""]
    env = _read_json(work_dir / "env.json") or {}
    md += [f"Mode: {env.get('mode', '?')}; started {env.get('started', '?')}; "
           f"{env.get('nvidia_smi', 'no nvidia-smi')}", "", "| part | status | seconds | cap (s) | what |",
           "|---|---|---|---|---|"]
    for key, what in PARTS.items():
        status = _read_json(work_dir / f"{key}.status.json") or {"status": "not run"}
        if key == "a_smoke":
            output = _read_json(work_dir / "a_smoke.json")
        elif key == "d_autoattack":
            output = _read_jsonl(work_dir / "d_autoattack.jsonl")
        else:
            output = _read_json(work_dir / f"{key}.json")
        state = status["status"]
        if state == "ok" and key == "a_smoke" and output and not output.get("ok"):
            state = "checks failed"
        if state == "ok" and key in ("b_bench", "c_settings") and output:
            bad = [r for r in output if "error" in r or r.get("comparable") is False]
            state = f"ok, {len(bad)} of {len(output)} rows failed, skipped or not comparable" if bad else "ok"
        parts[key] = {**status, "status": state, "output": output}
        md.append(f"| {key} | {state} | {status.get('seconds', '-')} | {status.get('cap_s', '-')} | {what} |")
        log = work_dir / f"{key}.log"
        if log.exists():
            text = log.read_text(errors="replace")
            logs.append(f"===== {key} ({len(text)} characters, last 20000) =====\n{text[-20000:]}")
    md += ["", "## (e) peak memory per case", "", "| case | implementation | peak memory |", "|---|---|---|"]
    md += _memory_rows(parts) or ["| - | - | no measurement |"]
    for key in ("b_bench", "c_settings"):
        table = work_dir / f"{key}.md"
        if table.exists():
            md += ["", f"## {PARTS[key]}", table.read_text()]
    smoke_out = parts["a_smoke"]["output"]
    if smoke_out:
        md += ["", f"## {PARTS['a_smoke']}", "", "```", json.dumps({k: smoke_out[k] for k in ("checks", "ours", "cpu")},
                                                                    indent=1), "```"]
    if parts["d_autoattack"]["output"]:
        md += ["", f"## {PARTS['d_autoattack']}", "", "```"] + [json.dumps(r) for r in parts["d_autoattack"]["output"]]
        md += ["```"]
    (out / "summary.md").write_text("\n".join(md) + "\n")
    (out / "results.json").write_text(json.dumps({"env": env, "parts": parts}, indent=2))
    (out / "logs.txt").write_text("\n\n".join(logs) + "\n")
    return "\n".join(md[:len(PARTS) + 6])
