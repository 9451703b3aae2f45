"""Model directories on disk: a model spec (model.json) and its variables (orbax), and how to read them back.

    DIR/model.json   {"format": "mmard_jax.model/1", "arch": ..., "num_classes": ..., "kwargs": {...},
                      "input_shape": [H, W, C]}
    DIR/variables/   an orbax checkpoint of {"params": ..., "batch_stats": ...}

`input_shape` is the image shape the model was built or converted for (the data set's); `load_model` builds
the variables at it, so a caller need not repeat it. Directories written before it was recorded were all
CIFAR-sized: they read as `LEGACY_INPUT_SHAPE` and accept any input shape a caller passes.

This is what the converter writes and what a training config names as its teacher. A training workdir keeps
its variables elsewhere (its layout is `mmard_jax.checkpoints`'s): `load_model` and `fingerprint` take a `locate`
function for that, `checkpoints.load_model` passes its own. Every write is atomic: the directory is staged beside
its destination and renamed into place.
"""

import hashlib
import json
import operator
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from mmard_jax import distributed, files
from mmard_jax.errors import CheckpointError
from mmard_jax.models.registry import create
from mmard_jax.tensorstore_errors import error_summary, quiet_thread_errors

FORMAT = "mmard_jax.model/1"
SPEC_FILE = "model.json"
VARIABLES_DIR = "variables"
COLLECTIONS = ("params", "batch_stats")

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The input shape of a model.json without `input_shape`: every directory written before the key existed held a
# CIFAR model (RobustBench CIFAR-10/100 teachers, students trained on CIFAR), 32x32 RGB.
LEGACY_INPUT_SHAPE = (32, 32, 3)


def compute_dtype(name: str):
    """'float32' | 'bfloat16' -> the jnp dtype (configs name dtypes as strings)."""
    if name not in _DTYPES:
        raise ValueError(f"unknown compute dtype {name!r}; known: {', '.join(_DTYPES)}")
    return _DTYPES[name]


def model_spec(arch: str, num_classes: int, kwargs: Optional[Mapping[str, Any]] = None,
               input_shape: Optional[Sequence[int]] = None, **extra) -> Dict[str, Any]:
    """The JSON spec of a model: enough to rebuild the module with `models.create` and its variables (at
    `input_shape`, the [H, W, C] of the images it was built for, recorded when the writer knows it)."""
    spec = {"format": FORMAT, "arch": arch, "num_classes": int(num_classes), "kwargs": dict(kwargs or {})}
    if input_shape is not None:
        spec["input_shape"] = list(check_input_shape(input_shape))
    spec.update(extra)
    return spec


def check_input_shape(shape: Sequence[int], what: str = "input_shape") -> Tuple[int, int, int]:
    """`shape` as an (H, W, C) tuple of positive ints; ValueError naming `what` otherwise."""
    try:
        out = tuple(operator.index(d) for d in shape)  # ints (Python or NumPy) only: no floats, no strings
    except TypeError:
        out = ()
    if len(out) != 3 or min(out) <= 0:
        raise ValueError(f"{what} must be three positive integers (height, width, channels), got {shape!r}")
    return out


def spec_input_shape(spec: Mapping[str, Any]) -> Tuple[int, int, int]:
    """The input shape a spec records, or `LEGACY_INPUT_SHAPE` for a spec written before it was recorded."""
    if "input_shape" not in spec:
        return LEGACY_INPUT_SHAPE
    try:
        return check_input_shape(spec["input_shape"])
    except ValueError as err:
        raise CheckpointError(f"{SPEC_FILE}: {err}") from None


def build_module(spec: Mapping[str, Any], dtype: str = "float32", **overrides):
    """The Flax module a spec describes, computing in `dtype`."""
    kwargs = dict(spec.get("kwargs", {}))
    kwargs.update(overrides)
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}  # JSON lists -> tuples
    return create(spec["arch"], num_classes=spec["num_classes"], dtype=compute_dtype(dtype), **kwargs)


def abstract_variables(module, input_shape: Sequence[int]):
    """Shapes/dtypes of a module's variables built for images of `input_shape` (H, W, C), without allocating
    them (a model whose classifier reads a fixed pooling window, e.g. DGAD's PreAct-ResNet-18, has input-size
    dependent variables)."""
    return jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1,) + tuple(input_shape)), train=False))


def local_target(module, input_shape) -> Dict[str, Any]:
    """The restore target of a module's variables, on this process's first device (every process reads its own
    copy: a teacher or an evaluated model is replicated afterwards, whatever layout wrote the checkpoint)."""
    target = abstract_variables(module, input_shape)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with_sharding = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device)  # noqa: E731
    return jax.tree.map(with_sharding, {k: target[k] for k in COLLECTIONS if k in target})


def save_model(directory, spec: Mapping[str, Any], variables: Mapping[str, Any]) -> pathlib.Path:
    """Writes a model directory atomically: staged beside `directory`, renamed into place at the end.

    An existing directory is replaced only once the new one is complete. In a multi-process run every process
    calls it (orbax's protocol): process 0 picks the staging directory and does the file moves, and nobody
    returns before the directory is in place.
    """
    directory = pathlib.Path(directory).absolute()

    def make_stage() -> str:
        directory.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.staging-")

    stage = pathlib.Path(distributed.on_primary(make_stage))  # one path for all processes

    def publish() -> None:
        files.write_json_atomic(stage / SPEC_FILE, dict(spec))
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
            os.replace(stage, directory)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(stage, directory)

    try:
        variables = {k: variables[k] for k in COLLECTIONS if k in variables}
        with ocp.StandardCheckpointer() as checkpointer:  # saves asynchronously: wait before renaming
            checkpointer.save(stage / VARIABLES_DIR, variables)
            checkpointer.wait_until_finished()
        distributed.on_primary(publish)
    finally:
        if jax.process_index() == 0:
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
    try:
        spec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    for key in ("arch", "num_classes"):
        if key not in spec:
            raise CheckpointError(f"{path}: missing key {key!r} (expected a model spec with arch, num_classes, kwargs)")
    return spec


def variables_dir(directory) -> pathlib.Path:
    """Where a model directory keeps its variables (DIR/variables); a CheckpointError if it has none."""
    directory = pathlib.Path(directory)
    if (directory / VARIABLES_DIR).is_dir():
        return directory / VARIABLES_DIR
    raise CheckpointError(f"{directory}: found {SPEC_FILE} but no {VARIABLES_DIR}/ (a training workdir? "
                          f"mmard_jax.checkpoints.load_model reads its best checkpoint)")


def fingerprint(directory, locate: Callable[[pathlib.Path], pathlib.Path] = variables_dir) -> str:
    """A short hash of what a model directory holds: model.json (which records the sha256 of the file a converted
    teacher came from), where its variables are (`locate`: e.g. a workdir's best step) and their files' names and
    sizes, so a resume can tell that the teacher behind a path has changed without reading its weights."""
    directory = pathlib.Path(directory).absolute()
    digest = hashlib.sha256((directory / SPEC_FILE).read_bytes() if (directory / SPEC_FILE).is_file() else b"")
    try:
        variables = locate(directory)
    except CheckpointError:
        return "unreadable"
    digest.update(str(variables.relative_to(directory)).encode())
    for path in sorted(p for p in variables.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(variables)}:{path.stat().st_size};".encode())
    return digest.hexdigest()[:16]


def resolve_input_shape(spec: Mapping[str, Any], input_shape: Optional[Sequence[int]], where) -> Tuple[int, ...]:
    """The shape to build a directory's variables at: the caller's (the data's) if given, else the recorded one; a
    CheckpointError when the directory records another shape than the caller's images have."""
    recorded = spec_input_shape(spec)
    if input_shape is None:
        return recorded
    wanted = check_input_shape(input_shape, "the input shape asked for")
    if "input_shape" in spec and wanted != recorded:
        raise CheckpointError(
            f"{where}: the model ({spec['arch']}, {spec['num_classes']} classes) was built for "
            f"{'x'.join(map(str, recorded))} inputs (model.json input_shape), the images here are "
            f"{'x'.join(map(str, wanted))}: use the data set it was trained or converted for")
    return wanted


def load_model(directory, dtype: str = "float32", input_shape: Optional[Sequence[int]] = None,
               locate: Callable[[pathlib.Path], pathlib.Path] = variables_dir,
               conv_grad: str = "auto") -> Tuple[Any, Dict[str, Any]]:
    """(module, variables) from a model directory (`locate` finds its variables: `checkpoints.load_model` passes
    one that also reads a training workdir's best student).

    `input_shape` (H, W, C) defaults to the one model.json records (`spec_input_shape`); a caller passing its
    data's shape gets a CheckpointError if the directory records another. `module.apply(variables, x,
    train=False)` on x in [0, 1] NHWC gives the logits; `conv_grad` is the module's convolution input gradient
    (`layers.resolve_conv_grad`), a setting of the run, not of the directory.
    """
    directory = pathlib.Path(directory).absolute()
    spec = read_spec(directory)
    input_shape = resolve_input_shape(spec, input_shape, directory / SPEC_FILE)
    module = build_module(spec, dtype, conv_grad=conv_grad)
    path = locate(directory)
    try:
        with quiet_thread_errors(), ocp.StandardCheckpointer() as checkpointer:
            variables = checkpointer.restore(path, local_target(module, input_shape))
    except Exception as err:  # orbax/tensorstore raise ValueError, KeyError, OSError or a bare Exception from a thread
        raise CheckpointError(f"{path}: the stored variables do not fit the model in {SPEC_FILE} ({spec['arch']}), "
                              f"or are damaged: {error_summary(err)}") from err
    return module, variables
