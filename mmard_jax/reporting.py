"""Results as files a person can read: TensorBoard scalars, the accuracy plot and the Markdown summary."""

import json
import pathlib
from typing import Any, Dict, Mapping, Sequence

import numpy as np

from mmard_jax import checkpoints

# Column order of the paper's tables.
PAPER_COLUMNS = ("clean", "fgsm", "pgd_s", "pgd_t", "cw", "aa")
COLUMN_TITLES = {"clean": "Clean", "fgsm": "FGSM", "pgd_s": "PGD_S", "pgd_t": "PGD_T", "cw": "CW", "aa": "AA"}


class SummaryWriter:
    """TensorBoard event files via tensorboardX (no TensorFlow needed)."""

    def __init__(self, logdir: pathlib.Path):
        from tensorboardX import SummaryWriter as _Writer

        self._writer = _Writer(str(logdir))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for key, value in values.items():
            self._writer.add_scalar(key, float(value), int(step))
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


def accuracy_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = PAPER_COLUMNS) -> str:
    """A Markdown table, one row per model, accuracies in percent, columns in the paper's order."""
    cols = [c for c in columns if any(c in r for r in rows.values())]
    lines = ["| model | " + " | ".join(COLUMN_TITLES.get(c, c) for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r[c]:.2f}" if c in r else "-" for c in cols) + " |")
    return "\n".join(lines)


def plot_accuracy(records: Sequence[Mapping[str, Any]], path: pathlib.Path, title: str) -> bool:
    """PNG of clean and robust test accuracy over epochs; False when no epoch was evaluated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evaluated = [r for r in records if any(k.startswith("test_") for k in r)]
    if not evaluated:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for col in PAPER_COLUMNS:
        pts = [(r["epoch"], 100 * r[f"test_{col}"]) for r in evaluated if f"test_{col}" in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=COLUMN_TITLES[col])
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def summary_markdown(summary: Mapping[str, Any]) -> str:
    """The run's summary as Markdown."""
    lines = [f"# {summary['title']}", ""]
    lines += [f"- {k}: {summary['setup'][k]}" for k in summary["setup"]]
    lines.append(f"- best epoch (by {summary['best_metric']}): {summary['best_epoch']}")
    lines.append(f"- training time: {summary['train_hours']:.2f} h over {summary['epochs_done']} epochs")
    lines.append("")
    rows = {}
    if summary.get("best"):
        rows[f"best (epoch {summary['best_epoch']})"] = summary["best"]
    if summary.get("last"):
        rows[f"last (epoch {summary['epochs_done']})"] = summary["last"]
    if summary.get("final"):
        rows["best checkpoint, final attacks"] = summary["final"]
    if rows:
        lines += ["Test accuracy (%):", "", accuracy_table(rows), ""]
    return "\n".join(lines)


def _test_metrics(record: Mapping[str, Any]) -> Dict[str, float]:
    return {k[5:]: v for k, v in record.items() if k.startswith("test_")}


def finish_run(workdir: pathlib.Path, config, records, meta, final: Mapping[str, float] = None) -> Dict[str, Any]:
    """Writes accuracy.png, summary.md and summary.json for a finished run and returns the summary."""
    evaluated = [r for r in records if any(k.startswith("test_") for k in r)]
    best = next((r for r in evaluated if r["epoch"] == meta.get("best_epoch")), None)
    title = f"{config.method.name} / {config.student.arch} / {config.dataset.name}"
    summary = {
        "title": title,
        "setup": {
            "method": config.method.name,
            "inner": config.method.get("inner") or config.method.name,
            "outer": config.method.get("outer") or config.method.name,
            "student": config.student.arch,
            "teacher": config.teacher.checkpoint or "-",
            "dataset": config.dataset.name,
            "epochs": config.num_epochs,
            "batch size": config.batch_size,
        },
        "best_metric": config.best_metric,
        "best_epoch": meta.get("best_epoch", -1),
        "best": _test_metrics(best) if best else {},
        "last": _test_metrics(evaluated[-1]) if evaluated else {},
        "final": dict(final or {}),
        "epochs_done": records[-1]["epoch"] if records else 0,
        "train_hours": sum(r.get("seconds", 0.0) for r in records) / 3600,
    }
    plot_accuracy(records, workdir / "accuracy.png", title)
    checkpoints.write_text_atomic(workdir / "summary.md", summary_markdown(summary) + "\n")
    checkpoints.write_json_atomic(workdir / "summary.json", summary)
    return summary


def mean_accuracies(correct: Mapping[str, np.ndarray]) -> Dict[str, float]:
    return {k: float(np.mean(v)) for k, v in correct.items()}
