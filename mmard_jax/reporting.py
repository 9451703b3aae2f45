"""Results as files a person can read: the metric fan-out of a run (metrics.jsonl, TensorBoard, progress bar),
the accuracy plot and the Markdown summary. In a multi-process run only process 0 writes or prints."""

import pathlib
import time
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import jax
import numpy as np
from tqdm.auto import tqdm

from mmard_jax import distributed, files

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


def weighted_means(chunks: Sequence[Tuple[int, Mapping[str, float]]]) -> Dict[str, float]:
    """Epoch means from per-log-interval means, weighted by the steps in each interval."""
    total = sum(n for n, _ in chunks)
    if not total:
        return {}
    return {k: sum(n * m[k] for n, m in chunks) / total for k in chunks[-1][1]}


class MetricSinks:
    """One fan-out for everything a run reports: metrics.jsonl (one record per epoch; records past a restored
    step are dropped on resume), TensorBoard scalars, the per-epoch progress bar and printed lines."""

    def __init__(self, workdir: pathlib.Path, progress: bool = True):
        self.workdir, self.primary = pathlib.Path(workdir), jax.process_index() == 0
        self.progress = progress and self.primary
        self.records: List[Dict[str, Any]] = []
        self._writer = self._bar = None
        self._t0, self._seen = time.perf_counter(), 0

    def open(self, restored_step: int) -> None:
        """Keeps the metrics of the steps the restored state has done; opens the TensorBoard writer."""
        path = self.workdir / "metrics.jsonl"

        def keep():  # process 0 reads and rewrites the file; every process gets the same records from it
            records = [r for r in files.read_jsonl(path) if r["step"] <= restored_step]
            files.write_jsonl_atomic(path, records)
            return records

        self.records = distributed.on_primary(keep)
        if self.primary:
            self._writer = SummaryWriter(self.workdir / "tb")

    def say(self, text: str) -> None:
        if self.primary:
            tqdm.write(text) if self._bar is not None else print(text, flush=True)

    def start_epoch(self, epoch: int, num_epochs: int, total: int, initial: int) -> None:
        self._bar = tqdm(total=total, initial=initial, desc=f"epoch {epoch + 1}/{num_epochs}",
                         disable=not self.progress, dynamic_ncols=True)
        self._t0, self._seen = time.perf_counter(), 0

    def advance(self) -> None:
        self._bar.update(1)

    def train_metrics(self, step: int, history, batch_size: int) -> Tuple[int, Dict[str, float]]:
        """Means of the steps since the last call (one device-to-host transfer), to the bar and TensorBoard."""
        fetched = [{k: float(np.asarray(v.addressable_data(0))) for k, v in h.items()} for h in history]
        means = {k: float(np.mean([h[k] for h in fetched])) for k in fetched[0]}
        rate = len(history) * batch_size / max(time.perf_counter() - self._t0, 1e-9)
        self._t0 = time.perf_counter()
        accs = {k: f"{v:.3f}" for k, v in means.items() if k.startswith("acc_")}
        self._bar.set_postfix(loss=f"{means['loss']:.4f}", **accs, img_s=f"{rate:.0f}")
        self._scalars(step, {f"train/{k}": v for k, v in means.items()} | {"train/images_per_s": rate})
        return len(history), means

    def end_epoch(self) -> None:
        self._bar.close()
        self._bar = None

    def epoch(self, record: Dict[str, Any]) -> None:
        """One epoch's record: appended to metrics.jsonl, to TensorBoard, and its test accuracies printed."""
        self.records.append(record)
        if not self.primary:
            return
        files.append_jsonl(self.workdir / "metrics.jsonl", record)
        self._scalars(record["step"], epoch_scalars(record))
        for prefix, who in (("test_", ""), ("swa_test_", "SWA student ")):
            tests = {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}
            if tests:
                self.say(f"epoch {record['epoch']}: {who}" + ", ".join(f"{k} {v:.2%}" for k, v in tests.items()))

    def _scalars(self, step: int, values: Mapping[str, float]) -> None:
        if self._writer is not None:
            self._writer.scalars(step, values)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def epoch_scalars(record: Mapping[str, Any]) -> Dict[str, float]:
    """An epoch record's TensorBoard scalars: train/<metric>, test/<attack>, swa_test/<attack> (the SWA student),
    and per attack the worst class's accuracy and the NSD, test_worst/<attack>, test_nsd/<attack> (swa_test_...)."""
    out = {}
    for key, value in record.items():
        if key.startswith(("train_", "test_")):
            out[key.replace("_", "/", 1)] = value
        elif key.startswith("swa_test_"):
            out["swa_test/" + key[len("swa_test_"):]] = value
        elif key.startswith("per_class_"):
            prefix = key[len("per_class_"):]
            for attack, per in value.items():
                out[f"{prefix}_worst/{attack}"] = per["worst"]
                if per["nsd"] is not None:
                    out[f"{prefix}_nsd/{attack}"] = per["nsd"]
    return out


def accuracy_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = PAPER_COLUMNS) -> str:
    """A Markdown table, one row per model, accuracies in percent, columns in the paper's order."""
    cols = [c for c in columns if any(c in r for r in rows.values())]
    lines = ["| model | " + " | ".join(COLUMN_TITLES.get(c, c) for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for name, r in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * r[c]:.2f}" if c in r else "-" for c in cols) + " |")
    return "\n".join(lines)


def fairness_table(rows: Mapping[str, Mapping[str, Mapping[str, Any]]], columns: Sequence[str] = PAPER_COLUMNS) -> str:
    """A Markdown table of per-class numbers (`robustness.per_class` entries), one row per model: per attack the
    worst class's accuracy in percent with the class in brackets, and the NSD (std / mean across classes)."""
    attacks = [c for c in columns if any(c in r for r in rows.values())]
    attacks += [c for r in rows.values() for c in r if c not in attacks and c not in columns]
    attacks = list(dict.fromkeys(attacks))
    head = " | ".join(f"{COLUMN_TITLES.get(c, c)} worst (class) | {COLUMN_TITLES.get(c, c)} NSD" for c in attacks)
    lines = [f"| model | {head} |", "|---|" + "---:|---:|" * len(attacks)]
    for name, r in rows.items():
        cells = []
        for c in attacks:
            per = r.get(c)
            cells += (["-", "-"] if per is None else
                      [f"{100 * per['worst']:.2f} ({per['worst_class']})",
                       "-" if per["nsd"] is None else f"{per['nsd']:.4f}"])
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def per_class_table(per_class: Mapping[str, Mapping[str, Any]], columns: Sequence[str] = PAPER_COLUMNS) -> str:
    """A Markdown table of every class's accuracy (%) under each attack (one row per class)."""
    attacks = [c for c in columns if c in per_class] + [c for c in per_class if c not in columns]
    n = max(len(per_class[a]["accuracy"]) for a in attacks)
    lines = ["| class | " + " | ".join(COLUMN_TITLES.get(a, a) for a in attacks) + " |",
             "|---:|" + "---:|" * len(attacks)]
    for k in range(n):
        cells = [per_class[a]["accuracy"][k] for a in attacks]
        lines.append(f"| {k} | " + " | ".join("-" if v is None else f"{100 * v:.2f}" for v in cells) + " |")
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
    fair = {}
    for name, key in (("best", "best"), ("last", "last"), ("best checkpoint, final attacks", "final")):
        if summary.get("per_class", {}).get(key):
            fair[next((r for r in rows if r.startswith(name)), name)] = summary["per_class"][key]
    swa = summary.get("swa")
    if swa:
        lines.insert(len(lines) - 1, f"- SWA student (from epoch {swa['start_epoch'] + 1}, {swa['snapshots']} "
                                     f"snapshots), best epoch (by {summary['best_metric']}): {swa['best_epoch']}")
        for name, key in ((f"SWA best (epoch {swa['best_epoch']})", "best"), (f"SWA last (epoch {swa['last_epoch']})",
                                                                                "last"),
                          ("SWA best checkpoint, final attacks", "final")):
            if swa.get(key):
                rows[name] = swa[key]
                if swa.get("per_class", {}).get(key):
                    fair[name] = swa["per_class"][key]
    if rows:
        lines += ["Test accuracy (%):", "", accuracy_table(rows), ""]
    if fair:
        lines += ["Per class (worst class's accuracy in %, normalised standard deviation across classes):", "",
                  fairness_table(fair), ""]
    return "\n".join(lines)


def _test_metrics(record: Mapping[str, Any], prefix: str = "test_") -> Dict[str, float]:
    return {k[len(prefix):]: v for k, v in record.items() if k.startswith(prefix)}


def swa_summary(swa: Mapping[str, Any], records, meta) -> Dict[str, Any]:
    """The SWA student's part of the summary (`swa`: {'start_epoch', 'snapshots', 'final'} from the trainer):
    start, snapshots, best and last evaluation, final attacks, per class."""
    final = dict(swa.get("final") or {})
    evaluated = [r for r in records if any(k.startswith("swa_test_") for k in r)]
    best = next((r for r in evaluated if r["epoch"] == meta.get("swa_best_epoch")), None)
    last = evaluated[-1] if evaluated else None
    return {
        "start_epoch": swa["start_epoch"],
        "snapshots": swa["snapshots"],
        "best_epoch": meta.get("swa_best_epoch", -1),
        "last_epoch": last["epoch"] if last else -1,
        "best": _test_metrics(best, "swa_test_") if best else {},
        "last": _test_metrics(last, "swa_test_") if last else {},
        "final": dict(final.get("accuracy", {})),
        "per_class": {"best": best.get("per_class_swa_test", {}) if best else {},
                      "last": last.get("per_class_swa_test", {}) if last else {},
                      "final": dict(final.get("per_class", {}))},
    }


def finish_run(workdir: pathlib.Path, config, records, meta, final: Mapping[str, Any] = None,
               notes: Mapping[str, str] = None, swa: Mapping[str, Any] = None) -> Dict[str, Any]:
    """Writes accuracy.png, summary.md and summary.json for a finished run and returns the summary (`final`:
    `train.final_evaluation`'s {'accuracy', 'per_class'}; `notes`: more setup lines, e.g. the AutoAttack version of
    the final evaluation; `swa`: where the run keeps an SWA student, {'start_epoch', 'snapshots', 'final' (its
    final evaluation)})."""
    final = dict(final or {})
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
            "compute dtype": config.student.dtype,
            "plug-ins": "+".join(config.method.get("plugins", ())) or "-",
            **dict(notes or {}),
        },
        "best_metric": config.best_metric,
        "best_epoch": meta.get("best_epoch", -1),
        "best": _test_metrics(best) if best else {},
        "last": _test_metrics(evaluated[-1]) if evaluated else {},
        "final": dict(final.get("accuracy", {})),
        "per_class": {"best": best.get("per_class_test", {}) if best else {},
                      "last": evaluated[-1].get("per_class_test", {}) if evaluated else {},
                      "final": dict(final.get("per_class", {}))},
        "epochs_done": records[-1]["epoch"] if records else 0,
        "train_hours": sum(r.get("seconds", 0.0) for r in records) / 3600,
    }
    if swa is not None:
        summary["swa"] = swa_summary(swa, records, meta)
    if jax.process_index() == 0:
        plot_accuracy(records, workdir / "accuracy.png", title)
        files.write_text_atomic(workdir / "summary.md", summary_markdown(summary) + "\n")
        files.write_json_atomic(workdir / "summary.json", summary)
    return summary
