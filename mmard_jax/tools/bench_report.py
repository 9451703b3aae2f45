"""Benchmark rows: repeated rounds merged, a PyTorch row checked for the same work as the JAX row, achieved TFLOP/s
and the fraction of the device's peak, and the Markdown table and BENCHMARKS.md section of scripts/benchmark.py."""

import datetime
import os
from typing import Any, Dict, List, Optional

from mmard_jax.tools import machine
from mmard_jax.tools.bench_cases import CASES, EPOCH, describe

# Dense peak TFLOP/s by device kind substring (first match wins) and compute dtype. float32 rows run on
# the tensor cores as TF32 (XLA's default precision on GPUs; PyTorch's default for cuDNN convolutions),
# so their peak is the TF32 one. Sources: NVIDIA H100 datasheet (SXM / PCIe), H200 datasheet (same chip),
# A100 datasheet, GA102 whitepaper (RTX 3090: bf16 tensor with fp32 accumulate 71, fp32 35.6).
PEAK_TFLOPS = (
    ("H100 PCIe", {"bfloat16": 756.0, "float32": 378.0}),
    ("H100", {"bfloat16": 989.0, "float32": 494.5}),
    ("H200", {"bfloat16": 989.0, "float32": 494.5}),
    ("GH200", {"bfloat16": 989.0, "float32": 494.5}),
    ("A100", {"bfloat16": 312.0, "float32": 156.0}),
    ("RTX 3090", {"bfloat16": 71.0, "float32": 35.6}),
)
# First-step losses of a JAX row and a PyTorch row agree within this relative tolerance, by the coarser compute
# dtype of the two and the backend: float32 on the CPU is float32 rounding (plus the odd PGD sign flipped by it);
# float32 on a GPU runs the convolutions as TF32 on both sides (10-bit mantissa); bfloat16 has an 8-bit mantissa.
# float64: both sides' networks in float64 (our logits and losses stay float32: layers.classifier casts them), the
# check of a case whose float32 steps spread past 1e-4 by rounding alone (MobileNetV2: BENCHMARKS.md "Open").
LOSS_RTOL = {("cpu", "float32"): 1e-4, ("gpu", "float32"): 1e-2, ("cpu", "bfloat16"): 5e-2, ("gpu", "bfloat16"): 5e-2,
             ("cpu", "float64"): 1e-5, ("gpu", "float64"): 1e-5}
COARSEST_FIRST = ("bfloat16", "float32", "float64")


def form_dtype(form: str) -> str:
    """A PyTorch form's compute dtype: 'bfloat16' with option bf16 (autocast), 'float64' with f64, else 'float32'."""
    opts = form.split("+")
    return "bfloat16" if "bf16" in opts else "float64" if "f64" in opts else "float32"


def peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
    """The device's dense peak for `dtype` from PEAK_TFLOPS, None for CPUs and unknown kinds."""
    for key, peaks in PEAK_TFLOPS:
        if key.lower() in device_kind.lower():
            return peaks.get(dtype)
    return None


def merge_rounds(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """One row from repeated measurements: the round with the median step time, and the spread over rounds."""
    ok = sorted((r for r in rows if "error" not in r), key=lambda r: r.get("step_s", 0.0))
    if not ok or "step_s" not in ok[0]:
        return ok[0] if ok else rows[-1]
    row = dict(ok[(len(ok) - 1) // 2])
    row["rounds"] = len(ok)
    row["step_s_rounds"] = [r["step_s"] for r in ok]
    return row


def loss_tolerance(backend: str, dtypes) -> float:
    """LOSS_RTOL for the coarser of `dtypes` on `backend` ('cpu', or any GPU)."""
    dtype = next((d for d in COARSEST_FIRST if d in dtypes), "float32")
    return LOSS_RTOL[("cpu" if backend == "cpu" else "gpu", dtype)]


def same_work(row: Dict[str, Any], jax_row: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """A PyTorch row's first-step loss against the case's JAX row: {'loss_rel_diff', 'loss_rtol', 'comparable'}."""
    if jax_row is None or row.get("first_loss") is None or jax_row.get("first_loss") is None:
        return {"comparable": None}
    ref = jax_row["first_loss"]
    rel = abs(row["first_loss"] - ref) / max(abs(ref), 1e-12)
    tol = loss_tolerance(row.get("backend", "cpu"), (row.get("dtype"), jax_row.get("dtype")))
    ok = rel <= tol and row.get("weights") == "the JAX row's"
    return {"loss_rel_diff": rel, "loss_rtol": tol, "comparable": ok}


def complete(row: Dict[str, Any], flops: Optional[float], dtype: str,
             jax_row: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Adds achieved TFLOP/s and the fraction of the device's dense peak to a measured row, and (PyTorch rows)
    whether it did the same work as the case's JAX row."""
    if "error" in row:
        return row
    if row["impl"] == "torch":
        row = dict(row, **same_work(row, jax_row))
    if not flops:
        return row
    row = dict(row, flops_per_step=row.get("flops_per_step", flops))
    row["tflops"] = row["flops_per_step"] / row["step_s"] / 1e12
    row_dtype = dtype if row["impl"] == "jax" else row["dtype"]  # a PyTorch row's: its form's (torch_bench)
    peak = peak_tflops(row.get("device_kind", ""), row_dtype)
    row["peak_tflops"] = peak
    row["mfu"] = row["tflops"] / peak if peak else None
    return row


def _fmt_bytes(n: Optional[float]) -> str:
    return "-" if n is None else f"{n / 2**30:.2f} GiB"


def _fmt_same_work(r: Dict[str, Any]) -> str:
    if r["impl"] != "torch":
        return "-"
    if r.get("comparable") is None:
        return "not comparable (no JAX loss)"
    diff = f"rel. diff {r['loss_rel_diff']:.1e} (tol. {r['loss_rtol']:.0e})"
    return diff if r["comparable"] else f"**not comparable**: {diff}, weights {r.get('weights')}"


def table(results: List[Dict[str, Any]]) -> str:
    """Markdown table of all rows, with our speed (the case's first JAX row) over each PyTorch form of the case."""
    head = ("| case | impl | form | step (s, median) | images/s | compile (s) | peak memory | GFLOP/step "
            "| TFLOP/s | % of peak | JAX speed / this | first-step loss | same work | load avg |")
    lines = [head, "|" + "|".join(["---"] * 14) + "|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['impl']} | {r['form']} | failed: {r['error']} | | | | | | | | | | |")
            continue
        jax_rate = next((x["images_per_s"] for x in results if x["case"] == r["case"] and x["impl"] == "jax"
                         and "error" not in x), None)
        ratio = f"{jax_rate / r['images_per_s']:.2f}x" if jax_rate and r["impl"] == "torch" else "-"
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") else "- (no peak)"
        spread = r.get("step_s_rounds", [])
        step = f"{r['step_s']:.3f}" + (f" ({min(spread):.2f}-{max(spread):.2f} over {len(spread)} rounds)"
                                       if len(spread) > 1 else "")
        first = f"{r['first_loss']:.6g}" if r.get("first_loss") is not None else "-"
        lines.append(
            f"| {r['case']} | {r['impl']} | {r['form']} | {step} | {r['images_per_s']:.1f} "
            f"| {r['compile_s']:.1f}{_fmt_kernels(r)} | {_fmt_bytes(r['peak_mem_bytes'])} ({r['mem_kind']}) "
            f"| {r.get('flops_per_step', 0) / 1e9:.4g} | {r.get('tflops', 0):.3f} | {mfu} | {ratio} | {first} "
            f"| {_fmt_same_work(r)} | {r['load_avg_1min']:.1f} |"
        )
    return "\n".join(lines)


def _fmt_kernels(row: Dict[str, Any]) -> str:
    return f" ({row['kernels']} kernels)" if row.get("kernels") else ""


def section(results: List[Dict[str, Any]], options, title: str, command: str) -> str:
    """One BENCHMARKS.md section: date, device, versions, settings and the table; `options` (bench_driver.Options)
    gives the pinning and step counts, `command` the command line that ran it."""
    ok = [r for r in results if "error" not in r]
    versions = sorted({r["versions"] for r in ok})
    devices = sorted({f"{r['backend']}: {r['device_kind']}" for r in ok})
    cases = "\n".join(f"- `{name}`: {describe(CASES[name])}" for name in dict.fromkeys(r["case"] for r in results))
    flags = sorted({r.get("xla_flags", "") for r in ok if r["impl"] == "jax"})
    return (
        f"\n## {datetime.date.today().isoformat()} - {title or ', '.join(devices)}\n\n"
        f"Device: {'; '.join(devices)} ({os.cpu_count()} CPU cores, workers pinned to "
        f"{options.cpus or 'all'}). Processor: {machine.describe()}. Versions: {'; '.join(versions)}.\n"
        f"Command: `{command}`; {options.warmup} warm-up + {options.steps} timed "
        f"steps per row, each row in its own process. XLA_FLAGS: {', '.join(repr(f) for f in flags) or '(none)'}.\n"
        f"FLOPs: XLA cost analysis, f(0 PGD steps) + steps x (f(1) - f(0)) (a rolled loop body counts once); "
        f"PyTorch rows reuse the JAX count. Same work: the PyTorch rows start from the JAX row's weights and first "
        f"draws on the same batches (epoch {EPOCH}); their first-step loss must match the JAX row's.\n\n"
        f"{cases}\n\n{table(results)}\n"
    )
