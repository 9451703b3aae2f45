"""The resume check: a workdir's run continues only with the settings it started with (bar a table of harmless keys).

    old = config_guard.load_saved_config(workdir)          # WORKDIR/config.json, None for a fresh workdir
    if old is not None:
        allowed = config_guard.check_resume(old, config, allow_extend=FLAGS.extend_epochs, workdir=workdir)
        if allowed:
            config_guard.append_history(workdir, config_guard.history_record(allowed))

Configs are compared as JSON (what train.py writes to config.json), flattened to dotted keys, so tuples and
lists, or a ConfigDict and a dict, compare equal. A key that was added or removed is a change.
"""

import dataclasses
import datetime
import json
import os
import pathlib
import socket
from typing import Any, Dict, List, Mapping, Optional, Sequence

from mmard_jax.errors import ConfigChangedError, ConfigError

CONFIG_FILE = "config.json"
HISTORY_FILE = "history.jsonl"

# Keys that may change on resume, and why: they do not change what is trained (the parameters after each step).
RESUMABLE: Mapping[str, str] = {
    "log_every_steps": "logging cadence",
    "checkpoint_every_steps": "checkpoint cadence",
    "eval.batch_size": "evaluation batch size (attacks draw per-example randomness; evaluation only)",
    "eval.unroll": "evaluation loop unrolling (evaluation only; training's attack.unroll may change rounding)",
    "eval.chunk_size": "the test split read in chunks (per-example results equal the resident evaluation's)",
    "dataset.data_dir": "data location",
    "dataset.source": "data location (the same split read from another copy)",
    "dataset.download": "whether a missing data set may be downloaded",
    "dataset.workers": "grain worker processes (a streamed batch is keyed by its position, not by who reads it)",
    "progress": "progress display",
}
# Keys added to the config after runs were started with it, and the value that does what those runs did: a run
# saved without the key resumes when the new config holds that value (its resume is still bitwise).
ADDED_SINCE: Mapping[str, Any] = {
    "student.conv_grad": "auto",  # the models' conv_grad attribute (was $MMARD_JAX_CONV_GRAD, default auto)
    "teacher.conv_grad": "auto",
    "attack.norm": "Linf",  # the L2 threat model
    "eval.norm": "Linf",
    "dataset.class_order": "",  # tiny_imagenet's label order ('' = load_dataset's default)
    "dataset.pipeline": "device",  # the streamed input pipeline (input_pipeline.py); the split was resident before
    "dataset.augment": "pad_crop",
    "dataset.image_size": 0,
    "dataset.test_split": "test",
    "dataset.workers": 0,
    "swa.enabled": False,  # stochastic weight averaging of the student (mmard_jax/swa.py); the others only matter
    "swa.start_epoch": -1,  # when it is enabled
    "swa.every_epochs": 1,
    "swa.bn_recompute": True,
    # CIARD's robust-teacher optimizer (config_lib.RTEACHER_OPTIM); runs of every other method never read it.
    "rteacher.optim.lr": 1e-4,
    "rteacher.optim.momentum": 0.1,
    "rteacher.optim.weight_decay": 2e-4,
    "rteacher.optim.nesterov": False,
    "rteacher.optim.schedule": "cosine_exp",
    "rteacher.optim.boundaries": [49],
    "rteacher.optim.decay": 0.1,
    "rteacher.optim.per_epoch": False,
    "rteacher.optim.schedule_epochs": 0,
}
# Keys that may only grow, and only when the caller allows it (the flag that allows it, for messages).
EXTENDABLE: Mapping[str, str] = {"num_epochs": "--extend_epochs"}


class _Absent:
    """The value of a key that one of the two configs does not have."""

    def __repr__(self) -> str:
        return "(absent)"


ABSENT = _Absent()


@dataclasses.dataclass(frozen=True)
class Change:
    """One dotted key whose value differs between the saved config and the new one (ABSENT: not there)."""

    key: str
    old: Any
    new: Any

    @property
    def kind(self) -> str:
        """'added', 'removed' or 'changed'."""
        return "added" if self.old is ABSENT else "removed" if self.new is ABSENT else "changed"

    def describe(self) -> str:
        """'optim.lr: 0.1 -> 0.2' (values as JSON, '(absent)' for a missing key)."""
        return f"{self.key}: {_show(self.old)} -> {_show(self.new)}"

    def to_json(self) -> Dict[str, Any]:
        """{key, old, new, kind} for history.jsonl (null for an absent side)."""
        return {"key": self.key, "old": None if self.old is ABSENT else self.old,
                "new": None if self.new is ABSENT else self.new, "kind": self.kind}


def _show(value: Any) -> str:
    """A value as in a config file: JSON, or '(absent)'."""
    return repr(value) if value is ABSENT else json.dumps(value, sort_keys=True)


def as_json(config: Any) -> Any:
    """A ConfigDict, dict or JSON value as plain JSON data (tuples -> lists), the way train.py saves config.json."""
    if hasattr(config, "to_json_best_effort"):
        return json.loads(config.to_json_best_effort())
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return json.loads(json.dumps(config, default=str))


def flatten(config: Any, prefix: str = "") -> Dict[str, Any]:
    """{'optim.lr': 0.1, ...}: the leaves of a nested config under dotted keys (empty mappings have none)."""
    data = as_json(config) if not prefix else config
    if not isinstance(data, dict):
        return {prefix: data} if prefix else {"": data}
    out: Dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict):
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def _same(a: Any, b: Any) -> bool:
    """Equal as config values: the same JSON text (NaN == NaN, True != 1), or equal numbers (1 == 1.0)."""
    if json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True):
        return True
    numbers = (int, float)
    return (isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool)
            and not isinstance(b, bool) and a == b)


def diff_configs(old: Any, new: Any) -> List[Change]:
    """Every dotted key whose value differs, was added or was removed, sorted by key."""
    a, b = flatten(old), flatten(new)
    changes = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, ABSENT), b.get(key, ABSENT)
        if va is ABSENT or vb is ABSENT or not _same(va, vb):
            changes.append(Change(key, va, vb))
    return changes


def _refusal_reason(change: Change, allow_extend: bool) -> Optional[str]:
    """Why a change may not happen on resume (None: it may)."""
    if change.key in RESUMABLE:
        return None
    if change.kind == "added" and change.key in ADDED_SINCE and _same(change.new, ADDED_SINCE[change.key]):
        return None
    if change.key in EXTENDABLE and change.kind == "changed":
        flag = EXTENDABLE[change.key]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (change.old, change.new)):
            return "not a number"
        if change.new < change.old:
            return "can only grow"
        return None if allow_extend else f"growing it needs {flag}"
    return ""


def check_resume(old: Any, new: Any, allow_extend: bool = False, workdir: Any = None) -> List[Change]:
    """The allowed changes between the saved config and the new one; ConfigChangedError listing every refused one."""
    changes = diff_configs(old, new)
    refused = [(c, r) for c in changes if (r := _refusal_reason(c, allow_extend)) is not None]
    if not refused:
        return changes
    where = pathlib.Path(workdir) if workdir is not None else None
    run = f"the run in {where}" if where else "this run"
    saved = f" ({where / CONFIG_FILE})" if where else ""
    extend = [EXTENDABLE[c.key] for c, r in refused if r.startswith("growing")]
    how = "start a new --workdir for these settings, or rerun with the saved ones"
    if extend:
        how += f"; to train longer, add {', '.join(sorted(set(extend)))}"
    lines = [f"{run} was started with other settings{saved}: {how}. Refused:"]
    lines += [f"  {c.describe()}" + (f" ({r})" if r else "") for c, r in refused]
    raise ConfigChangedError("\n".join(lines), [c for c, _ in refused], None if where is None else str(where))


def history_record(changes: Sequence[Change], kind: Optional[str] = None, *, time: Optional[str] = None,
                   host: Optional[str] = None, **extra) -> Dict[str, Any]:
    """{time, host, kind: 'start'|'resume'|'extend', changes: [{key, old, new, kind}], ...extra}: one line of
    history.jsonl."""
    if kind is None:
        kind = "extend" if any(c.key in EXTENDABLE for c in changes) else "resume"
    if kind not in ("start", "resume", "extend"):
        raise ValueError(f"history_record: kind must be 'start', 'resume' or 'extend', got {kind!r}")
    record = {
        "time": time or datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": host or socket.gethostname(),
        "kind": kind,
        "changes": [c.to_json() for c in changes],
    }
    record.update(extra)
    return record


def append_history(workdir: Any, record: Mapping[str, Any]) -> pathlib.Path:
    """Appends `record` as one JSON line to WORKDIR/history.jsonl (one write, flushed to disk)."""
    path = pathlib.Path(workdir) / HISTORY_FILE
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    return path


def load_saved_config(workdir: Any) -> Optional[Dict[str, Any]]:
    """WORKDIR/config.json as a dict; None if the workdir has none (a fresh run); ConfigError if it is not JSON."""
    path = pathlib.Path(workdir) / CONFIG_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON ({err}); expected the config train.py saved for this run") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object (the run's config), got {type(data).__name__}")
    return data
