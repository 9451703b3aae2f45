"""On-disk formats: model directories (a model spec + its variables) and training checkpoints.

A *model directory* is what the converter writes and what a training config names as its teacher:

    DIR/model.json   {"format": "mmard_jax.model/1", "arch": ..., "num_classes": ..., "kwargs": {...}}
    DIR/variables/   an orbax checkpoint of {"params": ..., "batch_stats": ...}

A *training workdir* holds `model.json` (the student's spec) and orbax `CheckpointManager`s under
`checkpoints/latest` (the whole train state, for resuming) and `checkpoints/best` (the student's
variables at the best evaluation). `load_model` accepts either. Every write is atomic: orbax
writes to a temporary directory and renames it; `save_model` stages the whole directory first.
"""

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mmard_jax import models

FORMAT = "mmard_jax.model/1"
SPEC_FILE = "model.json"
VARIABLES_DIR = "variables"
LATEST, BEST = "checkpoints/latest", "checkpoints/best"

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class CheckpointError(ValueError):
    """A directory that is not a usable model directory or training workdir."""


def compute_dtype(name: str):
    """'float32' | 'bfloat16' -> the jnp dtype (configs name dtypes as strings)."""
    if name not in _DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; known: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def model_spec(arch: str, num_classes: int, kwargs: Optional[Mapping[str, Any]] = None, **extra) -> Dict[str, Any]:
    """The JSON spec of a model: enough to rebuild the module with `models.create`."""
    spec = {"format": FORMAT, "arch": arch, "num_classes": int(num_classes), "kwargs": dict(kwargs or {})}
    spec.update(extra)
    return spec


def build_module(spec: Mapping[str, Any], dtype: str = "float32", **overrides):
    """The Flax module a spec describes, computing in `dtype`."""
    kwargs = dict(spec.get("kwargs", {}))
    kwargs.update(overrides)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}  # JSON lists -> tuples
    return models.create(spec["arch"], num_classes=spec["num_classes"], dtype=compute_dtype(dtype), **kwargs)


def abstract_variables(module, input_shape=(32, 32, 3)):
    """Shapes/dtypes of a module's variables, without allocating them."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1,) + tuple(input_shape)), train=False))


def write_text_atomic(path: pathlib.Path, text: str) -> None:
    """Writes a file via a temporary file and a rename, so a crash never leaves half a file."""
    path = pathlib.Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    """JSON through `write_text_atomic`."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_model(directory, spec: Mapping[str, Any], variables: Mapping[str, Any]) -> pathlib.Path:
    """Writes a model directory atomically: staged beside `directory`, renamed into place at the end.

    An existing directory is replaced only once the new one is complete.
    """
    directory = pathlib.Path(directory).absolute()
    directory.parent.mkdir(parents=True, exist_ok=True)
    stage = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.staging-"))
    try:
        variables = {k: variables[k] for k in ("params", "batch_stats") if k in variables}
        with ocp.StandardCheckpointer() as checkpointer:  # saves asynchronously: wait before renaming
            checkpointer.save(stage / VARIABLES_DIR, variables)
            checkpointer.wait_until_finished()
        write_json_atomic(stage / SPEC_FILE, dict(spec))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(stage, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, directory)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return directory


def read_spec(directory) -> Dict[str, Any]:
    """The model.json of a model directory or training workdir, checked."""
    path = pathlib.Path(directory) / SPEC_FILE
    if not path.is_file():
        raise CheckpointError(
            f"{directory} is neither a model directory nor a training workdir: {path} is missing "
            f"(make one with `python -m mmard_jax.convert` or `python -m mmard_jax.train`)"
        )
    spec = json.loads(path.read_text())
    for key in ("arch", "num_classes"):
        if key not in spec:
            raise CheckpointError(f"{path}: missing key {key!r} (expected a model spec with arch, num_classes, kwargs)")
    return spec


def checkpoint_manager(directory, max_to_keep: int = 1, best_metric: Optional[str] = None) -> ocp.CheckpointManager:
    """A synchronous orbax CheckpointManager (train-state buffers are donated, so saves must finish first)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        best_fn=(lambda m: m[best_metric]) if best_metric else None,
        best_mode="max",
        enable_async_checkpointing=False,
        cleanup_tmp_directories=True,
    )
    return ocp.CheckpointManager(pathlib.Path(directory).absolute(), options=options)


def _restore_variables(path_or_manager, step, module, input_shape):
    target = abstract_variables(module, input_shape)
    target = {k: target[k] for k in ("params", "batch_stats") if k in target}
    if step is None:
        with ocp.StandardCheckpointer() as checkpointer:
            return checkpointer.restore(path_or_manager, target)
    restored = path_or_manager.restore(step, args=ocp.args.Composite(variables=ocp.args.StandardRestore(target)))
    return restored["variables"]


def load_model(directory, dtype: str = "float32", input_shape=(32, 32, 3)) -> Tuple[Any, Dict[str, Any]]:
    """(module, variables) from a model directory, or from a training workdir's best checkpoint.

    `module.apply(variables, x, train=False)` on x in [0, 1] NHWC gives the logits.
    """
    directory = pathlib.Path(directory).absolute()
    spec = read_spec(directory)
    module = build_module(spec, dtype)
    try:
        if (directory / VARIABLES_DIR).is_dir():
            variables = _restore_variables(directory / VARIABLES_DIR, None, module, input_shape)
        elif (directory / BEST).is_dir():
            manager = checkpoint_manager(directory / BEST)
            step = manager.best_step() if manager.best_step() is not None else manager.latest_step()
            if step is None:
                raise CheckpointError(f"{directory / BEST} holds no checkpoint yet (no evaluation has finished)")
            variables = _restore_variables(manager, step, module, input_shape)
        else:
            raise CheckpointError(f"{directory}: found {SPEC_FILE} but neither {VARIABLES_DIR}/ nor {BEST}/")
    except (ValueError, KeyError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{directory}: the stored variables do not fit the model in {SPEC_FILE} ({spec['arch']}): {err}") from err
    return module, variables
