"""`scripts/benchmark.py --check_defaults`: each CPU default measured against its alternative on this processor.

The CPU defaults (xla_env's XLA flag, `unroll=auto`, conv2d's input gradient, BatchNorm's VJP, MobileNetV2's
depthwise form) were chosen from measurements on some processors; this runs, for each case, the JAX step with every
default and one row per alternative with exactly that one setting changed, rounds interleaved, and says whether each
default holds on the processor it ran on (named in every row)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Sequence

from mmard_jax.tools import bench_driver, bench_report, machine
from mmard_jax.tools.bench_cases import CASES


@dataclasses.dataclass(frozen=True)
class Check:
    """One CPU default and the alternative it was chosen over."""

    setting: str  # where the default lives
    default: str
    alternative: str
    option: str = "auto"  # the worker's --option (the PGD unroll) in the alternative's row
    env: Mapping[str, str] = dataclasses.field(default_factory=dict)  # the alternative's environment
    applies: Callable[[Any], bool] = lambda case: True  # noqa: E731 - the cases this default matters in


CHECKS = (
    Check("XLA CPU flags (xla_env.CPU_FLAGS)", "on", "off", env={"MMARD_JAX_XLA_DEFAULTS": "0"}),
    Check("PGD loop unroll (runtime.resolve_unroll)", "auto = 1 (rolled)", "full", option="full"),
    Check("conv2d input gradient (layers.conv2d, $MMARD_JAX_CONV_GRAD)", "auto = custom on CPU", "lax",
          env={"MMARD_JAX_CONV_GRAD": "lax"}),
    Check("BatchNorm train-mode VJP (layers.batch_norm_train, $MMARD_JAX_BN_GRAD)", "auto = custom on CPU", "flax",
          env={"MMARD_JAX_BN_GRAD": "flax"}),
)


def plan(names: Sequence[str]) -> List[tuple]:
    """(case, label, option, env) rows: each case's all-defaults row first, then one row per applicable check."""
    rows = []
    for name in names:
        rows.append((name, "defaults", "auto", {}))
        rows += [(name, c.setting, c.option, dict(c.env)) for c in CHECKS if c.applies(CASES[name])]
    return rows


def run(names: Sequence[str], options: bench_driver.Options, worker: Sequence[str],
        say: Callable[[str], None] = print) -> List[Dict[str, Any]]:
    """Measures the rows of `plan(names)` in fresh worker processes, `options.repeat` interleaved rounds, merged."""
    rows = plan(names)
    rounds: List[List[Dict[str, Any]]] = [[] for _ in rows]
    processor = machine.describe()
    for r in range(options.repeat):
        for i, (name, label, option, env) in enumerate(rows):
            row = bench_driver.run_worker(worker, "jax", name, option, options.warmup, options.steps, options.timeout,
                                          env)
            rounds[i].append(dict(row, case=name, setting=label, processor=processor))
            say(f"[round {r + 1}/{options.repeat}] {name} {label}: {row.get('step_s', row.get('error'))}")
    return [bench_report.merge_rounds(rs) for rs in rounds]


def verdicts(results: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per (case, check): the default's and the alternative's median step, their ratio, and whether the default
    holds here (not slower than the alternative beyond the rounds' spread)."""
    out = []
    for row in results:
        if row["setting"] == "defaults":
            base = row
            continue
        check = next(c for c in CHECKS if c.setting == row["setting"])
        verdict = {"case": row["case"], "setting": check.setting, "default": check.default,
                   "alternative": check.alternative, "processor": row["processor"]}
        if "error" in row or "error" in base:
            out.append({**verdict, "holds": None, "error": row.get("error") or base.get("error")})
            continue
        spread = max(_spread(base), _spread(row))
        ratio = row["step_s"] / base["step_s"]  # > 1: the alternative is slower, the default wins
        out.append({**verdict, "default_s": base["step_s"], "alternative_s": row["step_s"], "ratio": ratio,
                    "holds": ratio >= 1 or base["step_s"] - row["step_s"] <= spread})
    return out


def _spread(row: Dict[str, Any]) -> float:
    """Max minus min of a row's step time over rounds (0 for one round)."""
    times = row.get("step_s_rounds") or [row["step_s"]]
    return max(times) - min(times)


def table(checks: Sequence[Dict[str, Any]]) -> str:
    """Markdown: one line per (case, default) with both times and the verdict."""
    lines = ["| case | setting | default | alternative | default s/step | alternative s/step | alternative / default "
             "| default holds here |", "|" + "---|" * 8]
    for v in checks:
        if v["holds"] is None:
            lines.append(f"| {v['case']} | {v['setting']} | {v['default']} | {v['alternative']} | failed: "
                         f"{v['error']} | | | |")
            continue
        lines.append(f"| {v['case']} | {v['setting']} | {v['default']} | {v['alternative']} | {v['default_s']:.3f} "
                     f"| {v['alternative_s']:.3f} | {v['ratio']:.2f}x | {'yes' if v['holds'] else '**no**'} |")
    return "\n".join(lines)


def section(checks: Sequence[Dict[str, Any]], options: bench_driver.Options, command: str) -> str:
    """A BENCHMARKS.md section: date, processor, command and the verdict table."""
    import datetime  # noqa: PLC0415

    processors = sorted({v["processor"] for v in checks})
    return (f"\n## {datetime.date.today().isoformat()} - CPU defaults checked on this processor\n\n"
            f"Processor: {'; '.join(processors)}. Command: `{command}`; {options.warmup} warm-up + {options.steps} "
            f"timed steps per row, each row in its own process, {options.repeat} interleaved round(s), median kept.\n\n"
            f"{table(checks)}\n")
