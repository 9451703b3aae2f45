"""PyTorch / RobustBench checkpoint -> model directory (docs/design.md, "Teachers and conversion").

    python -m mmard_jax.convert --robustbench=Zhang2019Theoretically --dataset=cifar10 \\
        --src=Zhang2019Theoretically.pt --dst=teachers/Zhang2019Theoretically_cifar10
    python -m mmard_jax.convert --robustbench=Salman2020Do_R50 --dataset=imagenet \\
        --src=Salman2020Do_R50.pt --dst=teachers/Salman2020Do_R50
    python -m mmard_jax.convert --published=tiny_linf_wrn28-10 --src=tiny_linf_wrn28-10.pt \\
        --dst=teachers/tiny_linf_wrn28-10
    python -m mmard_jax.convert --arch=resnet18 --num_classes=100 --src=rn18.pth --dst=teachers/rn18
    python -m mmard_jax.convert --arch=preact_resnet18_dgad --num_classes=200 --input_shape=64,64,3 \\
        --src=best_PGD10_acc_model.pth --dst=teachers/dgad_tiny

The file is read without running any of its code (`torch.load(weights_only=True)`, or safetensors);
wrappers (`state_dict`/`model_state_dict`/`model`/`net`/`last` entries, `module.`/`model.` prefixes and the
index of a one-model `nn.Sequential`, e.g. `module.0.`) are removed; keys the architecture never uses
(TRADES's `sub_block1.*`, GradAlign's `model_preact_hl1.*` aliases, `num_batches_tracked`) are dropped; an input
normalisation stored as buffers (`mu`/`sigma` of RobustBench's normalised CIFAR subclasses, `normalize.mean`/
`normalize.std` of its ImageNet `normalize_model`) becomes the model's `mean`/`std`; every other key must fit the
architecture exactly, or nothing is written. The model directory records the input shape
the model was converted for (the RobustBench data set's, the published teacher's, or `--input_shape`), so
`load_pretrained` builds it there without being told.
"""

import hashlib
import json
import pathlib
import pickle
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import traverse_util

from mmard_jax import cli, models, runtime, xla_env
from mmard_jax.errors import ConversionError
from mmard_jax.interop import naming, published, zoo
from mmard_jax.models import dm_preact_resnet, store

Progress = Optional[Callable[[str], None]]

TORCH_SUFFIXES = (".pt", ".pth", ".pth.tar", ".tar", ".ckpt", ".bin")
SAFETENSORS_SUFFIX = ".safetensors"
# Entries that hold the state_dict inside a training checkpoint, tried in this order ('last' as RobustBench
# does for Andriushchenko2020Understanding, whose file has 'last' and 'best').
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "last")
WRAPPER_PREFIXES = ("module.", "model.")  # DataParallel, and wrappers that hold the net as `self.model`
# Submodules that exist in some published checkpoints but never enter the forward pass.
UNUSED_PREFIXES = {
    "sub_block1.": "TRADES WideResNet's unused first sub-block",
    "model_preact_hl1.": "GradAlign's alias of conv1 and layer1.0.bn1",
}
_LIST_LIMIT = 25  # keys shown per list in a mismatch error
# Buffers of an input normalisation -> the statistic they hold: RobustBench's normalised CIFAR subclasses register
# `mu`/`sigma` (robustbench 1.1.1 model_zoo/cifar10.py:77-82 and others), its `ImageNormalizer` `mean`/`std` under
# `normalize_model`'s child `normalize` (model_zoo/architectures/utils_architectures.py).
NORMALIZATION_KEYS = {"mu": "mean", "sigma": "std", "normalize.mean": "mean", "normalize.std": "std"}
DEEPMIND_ARCHS = ("dm_wide_resnet", "dm_preact_resnet")  # activation and mean/std live in code, not in the file


# ---------------------------------------------------------------- reading


def _log(progress: Progress, message: str) -> None:
    """Reports a step of a long conversion when the caller asked for progress."""
    if progress is not None:
        progress(message)


def _safe_numpy_globals() -> List[Any]:
    """NumPy scalars and dtypes (pure data, often stored as 'best_acc') for the weights-only unpickler."""
    scalar = np.float64(0).__reduce__()[0]  # numpy._core.multiarray.scalar; NumPy 1 pickles name numpy.core
    return [scalar, (scalar, "numpy.core.multiarray.scalar"), np.dtype, *_numpy_dtype_classes()]


def _numpy_dtype_classes() -> List[type]:
    """NumPy 2's per-dtype classes (`numpy.dtypes.Float64DType`), which pickles of dtypes may name."""
    return [v for v in vars(np.dtypes).values() if isinstance(v, type) and issubclass(v, np.dtype)]


def _torch_load(path: pathlib.Path) -> Any:
    """`torch.load(weights_only=True)`: tensors and plain containers only; anything else is refused unrun."""
    import torch  # noqa: PLC0415 - torch is needed only to read PyTorch files

    try:
        with torch.serialization.safe_globals(_safe_numpy_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        detail = next((line.strip() for line in str(err).splitlines() if "GLOBAL" in line or "Unsupported" in line),
                      str(err).splitlines()[0])
        raise ConversionError(
            f"{path}: refused to unpickle: loading it would construct Python objects other than tensors and "
            f"plain containers, which can run arbitrary code ({detail}). Nothing from the file was run. If you "
            f"trust its source, re-save only the weights: torch.save(model.state_dict(), 'weights.pt'), or write "
            f"them with safetensors."
        ) from None


def _read_safetensors(path: pathlib.Path) -> Dict[str, Any]:
    """A .safetensors file as tensors (torch when installed: it also reads bfloat16) or NumPy arrays."""
    try:
        from safetensors.torch import load_file  # noqa: PLC0415
    except ImportError:
        from safetensors.numpy import load_file  # noqa: PLC0415
    return load_file(str(path))


def read_checkpoint(path) -> Any:
    """The raw content of a PyTorch (.pt/.pth/.pth.tar/...) or safetensors file, read without running code."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such checkpoint file")
    if path.name.endswith(SAFETENSORS_SUFFIX):
        return _read_safetensors(path)
    if path.name.endswith(TORCH_SUFFIXES):
        return _torch_load(path)
    raise ConversionError(
        f"{path}: unknown checkpoint type; expected one of {', '.join(TORCH_SUFFIXES + (SAFETENSORS_SUFFIX,))}"
    )


def _is_array(value: Any) -> bool:
    """True for a tensor or array (anything with a shape and a dtype)."""
    return hasattr(value, "shape") and hasattr(value, "dtype")


def unwrap_state_dict(obj: Any, source: str = "checkpoint") -> Dict[str, Any]:
    """The {key: tensor} inside a checkpoint: descends `state_dict`/`model`/`net`/`last`, strips wrapper prefixes."""
    while isinstance(obj, Mapping) and not (obj and all(_is_array(v) for v in obj.values())):
        inner = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            keys = sorted(map(str, obj))[:20]
            raise ConversionError(
                f"{source}: found no state_dict: expected a mapping of parameter names to tensors, or one under "
                f"{', '.join(map(repr, WRAPPER_KEYS))}; top-level keys: {keys}"
            )
        obj = obj[inner]
    if not isinstance(obj, Mapping) or not obj:
        raise ConversionError(f"{source}: found no state_dict (got {type(obj).__name__})")
    return strip_wrapper_prefixes({str(k): v for k, v in obj.items()})


def strip_wrapper_prefixes(state: Mapping[str, Any]) -> Dict[str, Any]:
    """Removes `module.`/`model.` while every key carries it (DataParallel, wrapper modules), and an index all keys
    share: the one child holding state of an `nn.Sequential` wrapper (DM-Improves-AT saves
    `DataParallel(Sequential(net))`, keys `module.0.*`: wzekai99/DM-Improves-AT core/models/__init__.py:57-62).
    Normalisation buffers beside the network (`normalize.mean` next to `model.*`, as RobustBench's `normalize_model`
    holds them) neither need nor lose the prefix."""
    state = dict(state)
    while True:
        body = [k for k in state if k not in NORMALIZATION_KEYS]
        prefix = next((p for p in (*WRAPPER_PREFIXES, _shared_index(body))
                       if p and body and all(k.startswith(p) for k in body)), None)
        if prefix is None:
            return state
        state = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def split_normalization(state: Mapping[str, Any], source: str = "checkpoint"):
    """(state without its normalisation buffers, their {'mean': (...), 'std': (...)} or None); ConversionError when
    only one of the pair is there, or they are not three values each."""
    state = dict(state)
    found = {}
    for key, stat in NORMALIZATION_KEYS.items():
        if key in state:
            if stat in found:
                raise ConversionError(f"{source}: two input normalisations ({', '.join(NORMALIZATION_KEYS)})")
            found[stat] = (key, state.pop(key))
    if not found:
        return state, None
    if set(found) != {"mean", "std"}:
        raise ConversionError(f"{source}: input normalisation {found[next(iter(found))][0]!r} without its pair")
    stats = {}
    for stat, (key, value) in found.items():
        values = to_float32(value).reshape(-1)
        if values.size != 3:
            raise ConversionError(f"{source}: {key}: expected 3 channel statistics, got shape {tuple(value.shape)}")
        stats[stat] = tuple(float(v) for v in values)
    return state, stats


def adopt_normalization(stats: Optional[Mapping[str, Tuple[float, ...]]], arch: str, kwargs: Mapping[str, Any],
                        source: str, progress: Progress = None) -> Dict[str, Any]:
    """`kwargs` with the file's normalisation statistics as `mean`/`std`: the module RobustBench loads the file into
    takes its buffers from it (`load_state_dict`), whatever its class set at construction."""
    kwargs = dict(kwargs)
    if stats is None:
        return kwargs
    if "mean" not in models.accepted_arguments(arch):
        raise ConversionError(f"{source} holds an input normalisation (mean {stats['mean']}, std {stats['std']}) "
                              f"that {arch} has no place for")
    if kwargs.get("per_image_standardize"):
        raise ConversionError(f"{source} holds constant normalisation statistics, but the model standardises each "
                              f"image (per_image_standardize)")
    given, found = (kwargs.get("mean"), kwargs.get("std")), (stats["mean"], stats["std"])
    if given != (None, None) and not _same_float32(given, found):
        _log(progress, f"the file's normalisation (mean {found[0]}, std {found[1]}) replaces mean {given[0]}, "
                       f"std {given[1]}")
    if given == (None, None) or not _same_float32(given, found):
        kwargs.update(mean=found[0], std=found[1])
    return kwargs


def _same_float32(a, b) -> bool:
    """Whether two (mean, std) pairs are equal once rounded to float32, as the models compute with them (a scalar
    stands for all three channels)."""
    try:
        return all(np.array_equal(np.broadcast_to(np.asarray(x, np.float32), (3,)),
                                  np.broadcast_to(np.asarray(y, np.float32), (3,))) for x, y in zip(a, b))
    except (TypeError, ValueError):
        return False


def _shared_index(state: Mapping[str, Any]) -> Optional[str]:
    """`'0.'` when every key starts with the same container index `0.` (or `1.`, ...), else None."""
    heads = {k.split(".", 1)[0] for k in state}
    if len(heads) != 1 or not all("." in k for k in state):
        return None
    head = heads.pop()
    return f"{head}." if head.isdigit() and head.isascii() else None


def drop_unused(state: Mapping[str, Any]) -> Dict[str, Any]:
    """Drops keys that never enter the forward pass (`sub_block1.*`, `num_batches_tracked`, ...)."""
    return {
        k: v for k, v in state.items()
        if not k.startswith(tuple(UNUSED_PREFIXES)) and k.rsplit(".", 1)[-1] not in naming.DROPPED_LEAVES
    }


def to_float32(value: Any) -> np.ndarray:
    """A float tensor/array of any precision (half, bfloat16, float64) as a float32 NumPy array."""
    if hasattr(value, "detach"):  # torch.Tensor: bfloat16 has no NumPy dtype, so widen in torch first
        if not value.is_floating_point():
            raise ConversionError(f"expected a floating-point tensor, got {value.dtype}")
        return value.detach().to(dtype=_torch_float32()).cpu().numpy()
    array = np.asarray(value)
    if not np.issubdtype(array.dtype, np.floating):
        raise ConversionError(f"expected a floating-point array, got {array.dtype}")
    return array.astype(np.float32, copy=False)


def _torch_float32():
    """torch.float32 (imported lazily: only PyTorch inputs need torch)."""
    import torch  # noqa: PLC0415

    return torch.float32


# ---------------------------------------------------------------- matching


def expected_torch_shapes(arch: str, abstract: Mapping) -> Dict[str, Tuple[Tuple[str, ...], Tuple[int, ...]]]:
    """{torch key: (Flax path, torch-layout shape)} of every variable the architecture has."""
    containers = models.MODELS[arch].torch_containers
    out = {}
    for path, leaf in naming.flatten_variables(abstract).items():
        shape = tuple(naming.to_torch_layout(np.empty(leaf.shape, np.bool_)).shape)
        out[naming.flax_path_to_torch_key(path, containers)] = (path, shape)
    return out


def _listing(items: Sequence[str]) -> str:
    """At most `_LIST_LIMIT` items, then how many more."""
    shown = ", ".join(items[:_LIST_LIMIT])
    more = len(items) - _LIST_LIMIT
    return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def fit_report(state: Mapping[str, Any], expected: Mapping[str, Tuple[Any, Tuple[int, ...]]]):
    """(missing keys, unexpected keys, shape mismatches) of a cleaned state_dict against the architecture."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(
        f"{k}: file {tuple(state[k].shape)} vs expected {expected[k][1]}"
        for k in set(state) & set(expected)
        if tuple(state[k].shape) != expected[k][1]
    )
    return missing, unexpected, mismatched


def mismatch_error(report, description: str, source: str, hint: str = "") -> ConversionError:
    """The error for a checkpoint that does not fit: missing keys, unexpected keys and shape mismatches, all listed."""
    missing, unexpected, mismatched = report
    return ConversionError(
        f"{source} does not fit {description}.\n"
        f"  missing keys ({len(missing)}): {_listing(missing)}\n"
        f"  unexpected keys ({len(unexpected)}): {_listing(unexpected)}\n"
        f"  shape mismatches ({len(mismatched)}): {_listing(mismatched)}\n"
        + (hint or "Check --robustbench/--dataset, or --arch/--arch_kwargs (depth, width)/--num_classes.")
    )


def _sub_count(keys, prefix: str) -> int:
    """How many distinct children `prefix` has among `keys` (e.g. blocks in `block1.layer.`)."""
    return len({k[len(prefix):].split(".", 1)[0] for k in keys if k.startswith(prefix)})


def _dm_preact_depth(keys) -> Optional[int]:
    """The depth (18, 34) whose blocks per stage a DeepMind PreAct-ResNet state_dict has, or None."""
    blocks = tuple(_sub_count(keys, f"layer_{i}.") for i in range(4))
    return next((d for d, b in dm_preact_resnet.BLOCKS_PER_DEPTH.items() if b == blocks), None)


def infer_architecture(state: Mapping[str, Any]) -> Optional[Tuple[str, int, Dict[str, Any]]]:
    """(arch, num_classes, kwargs) that a cleaned state_dict's names and shapes suggest, or None.

    Settings that leave no trace in the weights (DeepMind's activation and mean/std, PreAct's out_shortcut)
    are left at their defaults; a DeepMind PreAct-ResNet of a depth RobustBench does not build gives None.
    """
    keys = set(state)
    if {"block1.layer.0.conv1.weight", "fc.weight"} <= keys:
        kwargs = {"depth": 6 * _sub_count(keys, "block1.layer.") + 4,
                  "width": state["block1.layer.0.conv1.weight"].shape[0] // 16}
        if "fc.bias" not in keys:
            kwargs["bias_last"] = False
        return "wide_resnet", state["fc.weight"].shape[0], kwargs
    if {"init_conv.weight", "layer.0.block.0.conv_0.weight", "logits.weight"} <= keys:
        kwargs = {"depth": 6 * _sub_count(keys, "layer.0.block.") + 4,
                  "width": state["layer.0.block.0.conv_0.weight"].shape[0] // 16}
        return "dm_wide_resnet", state["logits.weight"].shape[0], kwargs
    if {"conv_2d.weight", "layer_0.0.conv_2d_1.weight", "logits.weight"} <= keys:
        depth = _dm_preact_depth(keys)
        return None if depth is None else ("dm_preact_resnet", state["logits.weight"].shape[0], {"depth": depth})
    if {"layers.0.conv1.weight", "linear.weight"} <= keys:
        return "mobilenet_v2", state["linear.weight"].shape[0], {}
    if {"conv1.weight", "layer1.0.conv1.weight", "fc.weight"} <= keys and state["conv1.weight"].shape[-1] == 7:
        return _torchvision_architecture(state)
    if {"conv1.weight", "layer4.0.conv1.weight", "linear.weight"} <= keys:
        width = state["conv1.weight"].shape[0]
        kwargs = {} if width == 64 else {"base_width": width}
        if "layer1.0.conv3.weight" in keys:
            return "resnet50", state["linear.weight"].shape[0], kwargs
        if "bn1.weight" in keys:
            return "resnet18", state["linear.weight"].shape[0], kwargs
        kwargs.update({"bn_before_fc": True} if "bn.weight" in keys else {})
        return "preact_resnet18", state["linear.weight"].shape[0], kwargs
    return None


def _torchvision_architecture(state: Mapping[str, Any]) -> Optional[Tuple[str, int, Dict[str, Any]]]:
    """The torchvision ResNet (18, 50 or Wide-50-2) a state_dict with a 7x7 stem and an `fc` is, or None."""
    keys = set(state)
    layers = tuple(_sub_count(keys, f"layer{i}.") for i in range(1, 5))
    num_classes = state["fc.weight"].shape[0]
    if "layer1.0.conv3.weight" not in keys:
        return ("torchvision_resnet18", num_classes, {}) if layers == (2, 2, 2, 2) else None
    if layers != (3, 4, 6, 3):
        return None
    width = state["layer1.0.conv1.weight"].shape[0]  # the bottleneck width of 64 planes is width_per_group
    if width == 128:
        return "torchvision_wide_resnet50_2", num_classes, {}
    return "torchvision_resnet50", num_classes, {} if width == 64 else {"width_per_group": width}


def fit_hint(state: Mapping[str, Any], chosen: Tuple[str, int, Dict[str, Any]],
             input_shape: Sequence[int] = store.LEGACY_INPUT_SHAPE) -> str:
    """A suggestion of the settings the file does fit, when they can be read off its names and shapes."""
    guess = infer_architecture(state)
    if guess is None or guess == chosen:
        return ""
    arch, num_classes, kwargs = guess
    try:
        fits = not any(fit_report(state, expected_torch_shapes(arch, store.abstract_variables(
            models.create(arch, num_classes=num_classes, **kwargs), input_shape))))
    except (TypeError, ValueError):
        return ""
    flags_text = f"--arch={arch} --arch_kwargs='{json.dumps(kwargs)}' --num_classes={num_classes}"
    if not fits:
        return f"The file looks like {describe(*guess)} but does not fit it either; check its origin."
    rows = [((d, t, n), e) for (d, t, n), e in zoo.ZOO.items()
            if e.arch == arch and e.num_classes == num_classes and all(e.kwargs.get(k) == v for k, v in kwargs.items())]
    same = [f"{n} ({d}/{t})" for (d, t, n), _ in rows]
    note = ""
    if arch in DEEPMIND_ARCHS:
        note = " (its activation and mean/std are not stored in the file: take them from the model's source)"
    elif any(e.kwargs.get("mean") is not None or e.kwargs.get("per_image_standardize") for _, e in rows):
        note = " (an input normalisation, if the model has one, is not stored in the file: see its RobustBench row)"
    more = " ..." if len(same) > 6 else ""
    known = f" RobustBench models of this shape: {', '.join(same[:6])}{more}." if same else ""
    return f"The file fits {describe(*guess)}{note}: convert it with {flags_text}.{known}"


def describe(arch: str, num_classes: int, kwargs: Mapping[str, Any]) -> str:
    """`wide_resnet(num_classes=10, depth=34, width=10)`: an architecture as the user chose it."""
    args = ", ".join(f"{k}={v!r}" for k, v in {"num_classes": num_classes, **kwargs}.items())
    return f"{arch}({args})"


def _build(arch: str, num_classes: int, kwargs: Mapping[str, Any]):
    """The Flax module, or ConversionError for an unknown architecture/argument."""
    try:
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()}
        return models.create(arch, num_classes=num_classes, **kwargs)
    except (TypeError, ValueError) as err:
        raise ConversionError(str(err)) from None


# ---------------------------------------------------------------- conversion


def convert_state_dict(
    state_dict: Mapping[str, Any],
    arch: str,
    num_classes: int,
    kwargs: Optional[Mapping[str, Any]] = None,
    source: str = "state_dict",
    progress: Progress = None,
    input_shape: Optional[Sequence[int]] = None,
) -> Dict[str, Any]:
    """A PyTorch state_dict (or a checkpoint holding one) -> Flax variables {'params', 'batch_stats'}, built for
    images of `input_shape` (H, W, C; default `store.LEGACY_INPUT_SHAPE`). Normalisation buffers in it must equal
    the `mean`/`std` of `kwargs` (the variables do not hold them; `convert_file` records the file's)."""
    state, stats = split_normalization(unwrap_state_dict(state_dict, source), source)
    adopted = adopt_normalization(stats, arch, kwargs or {}, source)
    if adopted != dict(kwargs or {}):
        raise ConversionError(f"{source} normalises its input with mean {stats['mean']}, std {stats['std']}: pass "
                              f"them as the model's mean/std")
    return _convert_owned(state, arch, num_classes, kwargs, source, progress, input_shape)


def _convert_owned(state, arch, num_classes, kwargs, source, progress, input_shape=None) -> Dict[str, Any]:
    """`convert_state_dict` on a dict this module owns: each tensor is released once converted (peak memory)."""
    kwargs = dict(kwargs or {})
    module = _build(arch, num_classes, kwargs)
    shape = store.LEGACY_INPUT_SHAPE if input_shape is None else tuple(input_shape)
    try:
        abstract = store.abstract_variables(module, shape)
    except ValueError as err:  # e.g. a depth that is not 6n + 4, or a pool window larger than the final map
        raise ConversionError(f"{describe(arch, num_classes, kwargs)} at {_size(shape)} inputs: {err}") from None
    state = drop_unused(state)
    expected = expected_torch_shapes(arch, abstract)
    report = fit_report(state, expected)
    if any(report):  # nothing is written: the caller saves only what this returns
        hint = fit_hint(state, (arch, num_classes, kwargs), shape)
        if report[2] and input_shape is None:
            hint += (f" The architecture was built for {_size(shape)} inputs: if the model was trained on other "
                     f"images, pass their shape (--input_shape=H,W,C).")
        raise mismatch_error(report, describe(arch, num_classes, kwargs), source, hint.strip())
    _log(progress, f"converting {len(expected)} tensors to Flax layout")
    flat = {}
    for key, (path, _) in expected.items():
        try:
            flat[path] = jnp.asarray(naming.to_flax_layout(to_float32(state.pop(key))))
        except ConversionError as err:
            raise ConversionError(f"{source}: {key}: {err}") from None
    return traverse_util.unflatten_dict(flat)


def _size(shape: Sequence[int]) -> str:
    """`64x64x3`."""
    return "x".join(map(str, shape))


def sha256(path, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, so a model directory records exactly which checkpoint it came from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_architecture(
    robustbench: Optional[str] = None,
    dataset: Optional[str] = None,
    threat_model: str = "Linf",
    arch: Optional[str] = None,
    num_classes: Optional[int] = None,
    kwargs: Optional[Mapping[str, Any]] = None,
    published_name: Optional[str] = None,
) -> Tuple[str, int, Dict[str, Any]]:
    """(arch, num_classes, kwargs) from a published teacher's name, a RobustBench name + dataset, or an explicit
    architecture."""
    if published_name:
        if robustbench or arch or kwargs or num_classes:
            raise ConversionError("give one of --published, --robustbench or --arch/--arch_kwargs/--num_classes")
        try:
            entry = published.lookup(published_name)
        except ValueError as err:
            raise ConversionError(str(err)) from None
        return entry.arch, entry.num_classes, dict(entry.kwargs)
    if robustbench:
        if arch or kwargs or num_classes:
            raise ConversionError("give either a RobustBench name or --arch/--arch_kwargs/--num_classes, not both")
        if not dataset:
            raise ConversionError(f"--dataset ({', '.join(zoo.DATASETS)}) is needed to look up {robustbench!r}")
        try:
            entry = zoo.lookup(robustbench, dataset, threat_model)
        except ValueError as err:
            raise ConversionError(str(err)) from None
        return entry.arch, entry.num_classes, dict(entry.kwargs)
    if not arch:
        raise ConversionError("give a published teacher (--published), a RobustBench name (--robustbench with "
                              "--dataset) or an architecture (--arch)")
    if num_classes is None:
        raise ConversionError(f"--num_classes is needed with --arch={arch}")
    return arch, int(num_classes), dict(kwargs or {})


def resolve_input_shape(published_name: Optional[str] = None, robustbench: Optional[str] = None,
                        dataset: Optional[str] = None, input_shape: Optional[Sequence[int]] = None,
                        threat_model: str = "Linf") -> Optional[Tuple[int, int, int]]:
    """The (H, W, C) a conversion records: `input_shape` if given, else the published teacher's or the RobustBench
    model's (its data set's, or its own: Wong2020Fast's ImageNet crops are 288x288); None (not recorded, built at
    `store.LEGACY_INPUT_SHAPE`) for an --arch conversion without it."""
    known = None
    if published_name:
        known = published.lookup(published_name).input_shape
    elif robustbench and dataset in zoo.INPUT_SHAPES:
        known = zoo.input_shape(robustbench, dataset, threat_model)
    if input_shape is None:
        return known
    try:
        shape = store.check_input_shape(input_shape, "--input_shape")
    except ValueError as err:
        raise ConversionError(str(err)) from None
    if known is not None and shape != known:
        raise ConversionError(f"--input_shape={_size(shape)} contradicts the model's own {_size(known)} inputs "
                              f"(leave --input_shape out)")
    return shape


def convert_file(
    src,
    dst,
    *,
    published_name: Optional[str] = None,
    robustbench: Optional[str] = None,
    dataset: Optional[str] = None,
    threat_model: str = "Linf",
    arch: Optional[str] = None,
    num_classes: Optional[int] = None,
    kwargs: Optional[Mapping[str, Any]] = None,
    input_shape: Optional[Sequence[int]] = None,
    overwrite: bool = False,
    progress: Progress = None,
) -> pathlib.Path:
    """Checkpoint file -> model directory `dst` (written atomically, only once the whole checkpoint fits).

    `published_name` is a published teacher's file name (`published.PUBLISHED`), `robustbench` a RobustBench name
    with its `dataset`, else `arch`/`num_classes`/`kwargs`; `input_shape` (H, W, C) is recorded in model.json
    (default: the published teacher's or the RobustBench data set's; not recorded for `arch` without it).
    """
    src, dst = pathlib.Path(src), pathlib.Path(dst)
    arch, num_classes, kwargs = resolve_architecture(robustbench, dataset, threat_model, arch, num_classes, kwargs,
                                                     published_name)
    input_shape = resolve_input_shape(published_name, robustbench, dataset, input_shape, threat_model)
    if dst.exists() and not overwrite:
        raise ConversionError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it")
    start = time.perf_counter()
    size = src.stat().st_size / 1e6 if src.is_file() else 0.0
    _log(progress, f"reading {src} ({size:.1f} MB) for {describe(arch, num_classes, kwargs)}")
    # No reference to the file's tensors is kept here, so each one is freed as soon as it is converted.
    state, stats = split_normalization(unwrap_state_dict(read_checkpoint(src), str(src)), str(src))
    kwargs = adopt_normalization(stats, arch, kwargs, str(src), progress)
    variables = _convert_owned(state, arch, num_classes, kwargs, str(src), progress, input_shape)
    _log(progress, "hashing the source file")
    source = {"file": str(src.absolute()), "sha256": sha256(src), "converted_by": "mmard_jax.convert"}
    if robustbench:
        source["robustbench"] = {"name": robustbench, "dataset": dataset, "threat_model": threat_model}
    if published_name:
        entry = published.lookup(published_name)
        source["published"] = {"name": published_name.removesuffix(".pt"), "url": entry.url,
                               "dataset": entry.dataset, "threat_model": entry.threat_model}
    spec = store.model_spec(arch, num_classes, kwargs, input_shape=input_shape, source=source)
    _log(progress, f"writing {dst} ({models.count_params(variables) / 1e6:.1f}M parameters)")
    out = store.save_model(dst, spec, variables)
    _log(progress, f"done in {time.perf_counter() - start:.1f} s: {out}")
    return out


# ---------------------------------------------------------------- command line


def define_flags() -> None:
    """The CLI's flags, defined only when run as a program (the module is also a library)."""
    flags.DEFINE_string("src", None, "Checkpoint file: .pt/.pth/.pth.tar (read with weights_only) or .safetensors.")
    flags.DEFINE_string("dst", None, "Model directory to write (model.json + variables/).")
    flags.DEFINE_string("published", None, f"A teacher published outside RobustBench, by its file name: "
                        f"{', '.join(published.PUBLISHED)} (architecture and input shape are known).")
    flags.DEFINE_string("robustbench", None, "RobustBench model name, e.g. Zhang2019Theoretically (needs --dataset).")
    flags.DEFINE_enum("dataset", None, list(zoo.DATASETS), "Dataset of the RobustBench model.")
    flags.DEFINE_enum("threat_model", "Linf", list(zoo.THREAT_MODELS), "RobustBench threat model.")
    flags.DEFINE_enum("arch", None, sorted(models.MODELS), "Architecture, for a checkpoint not in RobustBench.")
    flags.DEFINE_string("arch_kwargs", "{}", 'JSON arguments of --arch, e.g. \'{"depth": 34, "width": 10}\'.')
    flags.DEFINE_integer("num_classes", None, "Number of classes, with --arch.")
    flags.DEFINE_string("input_shape", None, "Image shape H,W,C the model takes, with --arch (e.g. 64,64,3 for "
                        "Tiny-ImageNet); recorded in model.json. Default: the data set's of --published/--robustbench.")
    flags.DEFINE_bool("overwrite", False, "Replace --dst if it exists.")
    flags.DEFINE_bool("list", False, "Print the supported RobustBench (CIFAR-10/100, ImageNet) and published names "
                      "and exit.")
    xla_env.define_flags()


def _parse_kwargs(text: str) -> Dict[str, Any]:
    """--arch_kwargs JSON -> dict, with a clear error."""
    try:
        value = json.loads(text or "{}")
    except json.JSONDecodeError as err:
        raise ConversionError(f"--arch_kwargs is not valid JSON ({err}): {text!r}") from None
    if not isinstance(value, dict):
        raise ConversionError(f"--arch_kwargs must be a JSON object, got {text!r}")
    return value


def _parse_input_shape(text: Optional[str]) -> Optional[Tuple[int, ...]]:
    """--input_shape `H,W,C` (or `HxWxC`) -> a tuple, with a clear error."""
    if text is None:
        return None
    parts = text.replace("x", ",").split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise ConversionError(f"--input_shape must be H,W,C (e.g. 64,64,3), got {text!r}")
    return tuple(int(p) for p in parts)


def _print_table() -> None:
    """The supported RobustBench names (with their input shape), grouped by dataset and threat model, then the
    published teachers."""
    for (dataset, threat, name), entry in zoo.ZOO.items():
        shape = _size(zoo.input_shape(name, dataset, threat))
        model = describe(entry.arch, entry.num_classes, entry.kwargs)
        print(f"{dataset:8s} {threat:11s} {name:45s} {shape:11s} {model}")
    for name, entry in published.PUBLISHED.items():
        print(f"--published={name:20s} {entry.dataset} {entry.threat_model} {_size(entry.input_shape)} "
              f"{describe(entry.arch, entry.num_classes, entry.kwargs)} <- {entry.url}")


def main(argv) -> None:
    """Runs one conversion from the flags; a ConversionError is one line on stderr and status 2 (`cli.run`)."""
    xla_env.apply_cpu_defaults(flags.FLAGS.xla_cpu_defaults)  # first: before anything may start a JAX backend
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.quiet_logging()
    f = flags.FLAGS
    if f.list:
        _print_table()
        return
    if not f.src or not f.dst:
        raise app.UsageError("--src and --dst are required (or --list)")
    cli.existing_path("src", f.src, kind="file")
    if f.num_classes is not None:
        cli.positive_int("num_classes", f.num_classes)
    convert_file(
        f.src, f.dst, published_name=f.published, robustbench=f.robustbench, dataset=f.dataset,
        threat_model=f.threat_model, arch=f.arch, num_classes=f.num_classes, kwargs=_parse_kwargs(f.arch_kwargs),
        input_shape=_parse_input_shape(f.input_shape), overwrite=f.overwrite, progress=lambda m: print(m, flush=True),
    )


def run() -> None:
    """Console-script entry point (`mmard-convert`)."""
    define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
