"""Runs one table (or figure) of the paper in sequence and collects the results into one Markdown table.

The library of `scripts/run_table.py`. Each run of the config file's RUNS goes to WORKROOT/<run>, resumes if
interrupted, and is skipped when its summary.json exists. The table (shaped by the file's LAYOUT: rows, column
groups, attacks) is written to WORKROOT/table.md. Overrides (`apply_overrides`) apply to every run, e.g.
`--config.num_epochs=1 --config.dataset.n_train=512`.
"""

import importlib.util
import json
import pathlib
import re
from typing import Dict, List, Mapping, Sequence

from mmard_jax import cli, files, reporting, train


def load_table(path) -> object:
    """The config file as a module (it defines RUNS, LAYOUT and get_config)."""
    path = cli.existing_path("table", path, kind="file")
    spec = importlib.util.spec_from_file_location(f"table_{path.stem}", path)
    if spec is None:
        raise cli.UserError(f"--table={str(path)!r} is not a Python file "
                            "(expected a table config like configs/table3.py)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name in ("RUNS", "LAYOUT", "get_config"):
        if not hasattr(module, name):
            raise cli.UserError(f"{path} defines no {name}: not a table config (see configs/table3.py)")
    return module


def run_name(arg: str) -> str:
    """A directory name for a run's config argument."""
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", arg.replace(",", "__"))


def parse_run(arg: str) -> Dict[str, str]:
    return dict(item.split("=", 1) for item in arg.split(",") if item)


def apply_overrides(config, overrides: Sequence[str]):
    """`--config.a.b=value` strings applied to a ConfigDict (values parsed as JSON, else kept as strings)."""
    for item in overrides:
        if not item.startswith("--config.") or "=" not in item:
            raise cli.UserError(f"override {item!r} is not of the form --config.path=value")
        path, value = item[len("--config."):].split("=", 1)
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            pass
        node = config
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p] if p in node else None
            if node is None or not hasattr(node, "keys"):
                break
        if node is None or not hasattr(node, "keys") or leaf not in node:
            raise cli.UserError(f"override {item.split('=', 1)[0]}: no key {path!r} in the config (an override can "
                                f"only set a key the config file defines)")
        node[leaf] = tuple(value) if isinstance(value, list) else value
    return config


def table_markdown(results: Mapping[str, Mapping[str, float]], runs: Sequence[str], layout: Mapping) -> str:
    """The paper-shaped table: one row per value of layout['rows'], columns (group x attack) in percent."""
    parsed = [parse_run(r) for r in runs]
    rows = list(dict.fromkeys(p[layout["rows"]] for p in parsed))
    groups = list(dict.fromkeys(p[layout["groups"]] for p in parsed)) if layout.get("groups") else [None]
    metrics = list(layout["columns"])
    if layout.get("metric_major"):
        cols = [(g, m) for m in metrics for g in groups + (["average"] if layout.get("average") else [])]
    else:
        cols = [(g, m) for g in groups for m in metrics]
    title = lambda g, m: reporting.COLUMN_TITLES.get(m, m) + (f" ({g})" if g else "")  # noqa: E731
    lines = [f"| {layout['rows']} | " + " | ".join(title(g, m) for g, m in cols) + " |", "|---|" + "---:|" * len(cols)]
    for row in rows:
        cells = []
        for g, m in cols:
            if g == "average":
                vals = [results.get(r, {}).get(m) for r, p in zip(runs, parsed) if p[layout["rows"]] == row]
                value = sum(vals) / len(vals) if vals and None not in vals else None
            else:
                run = next((r for r, p in zip(runs, parsed)
                            if p[layout["rows"]] == row and (g is None or p[layout["groups"]] == g)), None)
                value = results.get(run, {}).get(m) if run else None
            cells.append(f"{100 * value:.2f}" if value is not None else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_table(table_path, workroot, only: Sequence[str] = (), overrides: Sequence[str] = (),
              collect_only: bool = False, progress: bool = True) -> str:
    """Runs (or resumes, or skips) every run of the table, then writes and returns WORKROOT/table.md."""
    table = load_table(table_path)
    workroot = pathlib.Path(workroot)
    workroot.mkdir(parents=True, exist_ok=True)
    runs: List[str] = [r for r in table.RUNS if all(o in r.split(",") for o in only)]
    if not runs:
        given = " ".join(f"--only={o}" for o in only)
        raise cli.UserError(f"{given} matches no run of {table_path} (its runs: {', '.join(table.RUNS)})")
    if not collect_only:  # every run's config (with the overrides) is checked before hours of training
        for arg in runs:
            train.check_config(apply_overrides(table.get_config(arg), overrides))
    results = {}
    for i, arg in enumerate(runs, 1):
        workdir = workroot / run_name(arg)
        summary_file = workdir / "summary.json"
        if not summary_file.exists() and not collect_only:
            print(f"\n[{i}/{len(runs)}] {table_path}:{arg} -> {workdir}", flush=True)
            config = apply_overrides(table.get_config(arg), overrides)
            train.train_and_evaluate(config, workdir, progress=progress)
        if summary_file.exists():
            results[arg] = json.loads(summary_file.read_text())["final"]
    text = (f"# {pathlib.Path(table_path).stem}: best checkpoints (by PGD_T), test accuracy (%)\n\n"
            + table_markdown(results, runs, table.LAYOUT) + "\n")
    files.write_text_atomic(workroot / "table.md", text)
    return text
