"""Files a crash never leaves half-written: atomic text/JSON writes and a JSON-lines log.

Kept free of orbax and JAX so that reporting and the command-line front ends can import it cheaply.
"""

import json
import os
import pathlib
import tempfile
from typing import Any, Callable, Iterable, List, Mapping


def write_atomic(path, write: Callable[[Any], None], mode: str = "w", suffix: str = "") -> pathlib.Path:
    """Calls `write(file)` on a temporary file in the same folder (opened with `mode`), syncs it and renames it to
    `path`, so readers see the old file or the new one, never half; on any failure the temporary file is removed."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        pathlib.Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text_atomic(path, text: str) -> pathlib.Path:
    """Writes `text` through `write_atomic`."""
    return write_atomic(path, lambda f: f.write(text))


def write_json_atomic(path, obj: Any) -> pathlib.Path:
    """JSON (indented, sorted keys) through `write_text_atomic`."""
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_jsonl(path) -> List[Mapping[str, Any]]:
    """The records of a JSON-lines file ([] if it does not exist); a torn last line (a crash mid-append) is dropped."""
    path = pathlib.Path(path)
    if not path.exists():
        return []
    records = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from None
    return records


def write_jsonl_atomic(path, records: Iterable[Mapping[str, Any]]) -> pathlib.Path:
    """Rewrites a JSON-lines file atomically (one record per line)."""
    return write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))


def append_jsonl(path, record: Mapping[str, Any]) -> None:
    """Appends one record as one line (flushed and synced: a crash loses at most the line being written)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
