"""Process layouts side by side (scripts/benchmark_multiprocess.py): a layout's name, rounds merged, the ratios
within each round and the Markdown table."""

from typing import Any, Dict, List


def parse_layout(text: str) -> tuple:
    """'2x1' -> (2 processes, 1 device each)."""
    try:
        processes, devices = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise SystemExit(f"--layouts: {text!r} is not PxD (processes x devices per process), e.g. 2x1") from None
    if processes < 1 or devices < 1:
        raise SystemExit(f"--layouts: {text!r} needs at least one process and one device")
    return processes, devices


def merge_rounds(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    """The round with the median step time (the lower one of an even count, as benchmark.py), and every round's
    images/s."""
    good = sorted((r for r in rows if "error" not in r), key=lambda r: r["step_s"])
    if not good:
        return rows[-1]
    row = dict(good[(len(good) - 1) // 2])
    row["rounds"] = len(good)
    row["images_per_s_rounds"] = [r.get("images_per_s") for r in rows]  # in round order (None: failed)
    return row


def round_ratios(rows: List[Dict[str, Any]]) -> List[List[float]]:
    """Per layout, its images/s over the first layout's in each round: measured side by side, under the same load."""
    ref = rows[0].get("images_per_s_rounds", [])
    return [[a / b if a and b else float("nan") for a, b in zip(r.get("images_per_s_rounds", []), ref)]
            for r in rows]


def table(rows: List[Dict[str, Any]]) -> str:
    """Markdown: one line per layout; ratios against the first layout, round by round."""
    lines = ["| layout | processes x devices | step (s, median) | images/s (median) | images/s per round | "
             "vs first, per round | compile (s) | load avg |", "|---|---|---:|---:|---|---|---:|---:|"]
    for r, ratios in zip(rows, round_ratios(rows)):
        if "error" in r:
            lines.append(f"| {r['layout']} | - | - | FAILED: {r['error']} | - | - | - | - |")
            continue
        per_round = ", ".join("-" if v is None else f"{v:.1f}" for v in r["images_per_s_rounds"])
        lines.append(f"| {r['layout']} | {r['processes']} x {r['devices_per_process']} | {r['step_s']:.3f} | "
                     f"{r['images_per_s']:.1f} | {per_round} | {', '.join(f'{x:.2f}x' for x in ratios)} | "
                     f"{r['compile_s']:.1f} | {r['load_avg_before']:.1f} / {r['load_avg_1min']:.1f} |")
    return "\n".join(lines)
