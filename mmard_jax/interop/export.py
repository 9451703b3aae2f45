"""Model directory or training workdir -> PyTorch state_dict file (the inverse of `mmard_jax.convert`).

    python -m mmard_jax.export --src=runs/mmard_rn18 --dst=mmard_rn18.pt

The file is a plain `{key: tensor}` dict written with `torch.save` (or `.safetensors`) that RobustBench's
`ResNet18`/`ResNet`/`PreActResNet`/`WideResNet`/`DMWideResNet`/`DMPreActResNet`, torchvision's
`resnet18`/`resnet50`/`wide_resnet50_2` (and the kuangliu-layout MobileNetV2, SAAD's `pResNet18`, DGAD's
`PreActResNet18`, DM-Improves-AT's Tiny-ImageNet `WideResNet`) load with `strict=True`: float32 weights in PyTorch
layout plus int64 `num_batches_tracked` buffers (zero: the count of training steps is not kept in Flax). A model
with an input normalisation is written as RobustBench's wrapper holds it: `mu`/`sigma` buffers beside the network
(its normalised CIFAR subclasses), or `normalize.mean`/`normalize.std` and the network under `model.` (ImageNet's
`normalize_model`). Build the PyTorch model with the settings the program prints.
"""

import pathlib
from typing import Any, Dict, Mapping, Optional, Sequence

import numpy as np
from absl import app, flags

from mmard_jax import checkpoints, cli, files, models, runtime, xla_env
from mmard_jax.errors import ExportError
from mmard_jax.interop import naming
from mmard_jax.models import store

SUB_BLOCK1 = "sub_block1."
# Where RobustBench keeps a family's normalisation statistics in its state_dict: ImageNet's `normalize_model`
# (`normalize.mean`/`.std`, the network under `model.`), the CIFAR subclasses' `mu`/`sigma` buffers. DeepMind's
# classes hold theirs as plain attributes (not in the state_dict), so they have no entry.
TORCHVISION_ARCHS = ("torchvision_resnet18", "torchvision_resnet50", "torchvision_wide_resnet50_2")
BUFFER_NORMALIZED_ARCHS = ("resnet18", "resnet50", "preact_resnet18", "wide_resnet")
# Our DeepMind activation names -> the PyTorch class RobustBench passes as `activation_fn`.
TORCH_ACTIVATIONS = {"swish": "Swish", "silu": "nn.SiLU", "relu": "nn.ReLU"}


def _torch():
    """The torch module (imported lazily: only exporting needs it)."""
    import torch  # noqa: PLC0415

    return torch


def to_torch_state_dict(variables: Mapping, arch: str, sub_block1: bool = False,
                        kwargs: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """Flax variables of a registered `arch` -> PyTorch state_dict (float32, PyTorch layout and names).

    `sub_block1=True` adds TRADES's unused `sub_block1.*` (a copy of `block1.*`) so that RobustBench entries
    built with `WideResNet(..., sub_block1=True)` load strictly too. The model's `kwargs` (its model.json's) give
    its input normalisation, written as RobustBench's wrapper of the family holds it (`with_normalization`).
    """
    torch = _torch()
    containers = models.MODELS[arch].torch_containers
    state = {}
    for path, value in naming.flatten_variables(variables).items():
        if path[0] not in ("params", "batch_stats"):
            continue
        key = naming.flax_path_to_torch_key(path, containers)
        # np.array copies into a writable C-ordered buffer that the tensor then owns.
        state[key] = torch.from_numpy(np.array(naming.to_torch_layout(np.asarray(value, np.float32)), order="C"))
        if key.endswith(".running_mean"):
            state[key[: -len("running_mean")] + "num_batches_tracked"] = torch.zeros((), dtype=torch.int64)
    if sub_block1:
        if arch != "wide_resnet":
            raise ExportError(f"sub_block1 exists only in the TRADES WideResNet (wide_resnet), not in {arch}")
        state.update({SUB_BLOCK1 + k[len("block1."):]: v.clone() for k, v in state.items() if k.startswith("block1.")})
    return dict(sorted(with_normalization(state, arch, kwargs or {}).items()))


def with_normalization(state: Dict[str, Any], arch: str, kwargs: Mapping[str, Any]) -> Dict[str, Any]:
    """`state` as the state_dict of RobustBench's normalising wrapper of `arch` when `kwargs` has mean/std:
    `normalize_model(net, mean, std)` for torchvision's networks (robustbench model_zoo/architectures/
    utils_architectures.py), the (1, 3, 1, 1) `mu`/`sigma` buffers of the CIFAR subclasses (model_zoo/cifar10.py:
    77-82); unchanged otherwise."""
    if kwargs.get("mean") is None or arch not in TORCHVISION_ARCHS + BUFFER_NORMALIZED_ARCHS:
        return state
    torch = _torch()
    mean, std = (torch.tensor([float(v) for v in _three(kwargs[k])], dtype=torch.float32).view(1, 3, 1, 1)
                 for k in ("mean", "std"))
    if arch in TORCHVISION_ARCHS:
        return {"normalize.mean": mean, "normalize.std": std, **{f"model.{k}": v for k, v in state.items()}}
    return {**state, "mu": mean, "sigma": std}


def _three(stat: Any) -> Sequence[float]:
    """A per-channel statistic as three values (a scalar applies to every channel)."""
    values = list(stat) if isinstance(stat, (list, tuple)) else [stat] * 3
    if len(values) != 3:
        raise ExportError(f"expected 3 channel statistics, got {stat!r}")
    return values


def torch_constructor(spec: Mapping[str, Any]) -> str:
    """How to build the PyTorch peer of a spec with RobustBench's classes, for the user to copy."""
    arch, nc, kw = spec["arch"], spec["num_classes"], dict(spec.get("kwargs", {}))
    if arch == "wide_resnet":
        bias = "" if kw.get("bias_last", True) else ", bias_last=False"
        return (f"WideResNet(depth={kw.get('depth', 34)}, widen_factor={kw.get('width', 10)}, num_classes={nc}{bias})"
                f"{_buffers_note(kw)}")
    if arch == "dm_wide_resnet":
        size = f"depth={kw.get('depth', 28)}, width={kw.get('width', 10)}"
        if kw.get("adaptive_pool", False):  # RobustBench's avg_pool2d(out, 8) pools 64x64 inputs wrongly
            return (f"WideResNet(num_classes={nc}, {size}{_deepmind_settings(kw)})  # wzekai99/DM-Improves-AT "
                    f"core/models/ti_wideresnetwithswish.py (adaptive pooling)")
        return f"DMWideResNet(num_classes={nc}, {size}{_deepmind_settings(kw)})"
    if arch == "dm_preact_resnet":
        return f"DMPreActResNet(num_classes={nc}, depth={kw.get('depth', 18)}, width=0{_deepmind_settings(kw)})"
    if arch in TORCHVISION_ARCHS:
        width = f", width_per_group={kw['width_per_group']}" if "width_per_group" in kw else ""
        net = f"{arch.removeprefix('torchvision_')}(num_classes={nc}{width})"
        if kw.get("mean") is not None:
            return (f"normalize_model({net}, {_stats(kw['mean'])}, {_stats(kw['std'])})  # torchvision.models; "
                    f"robustbench.model_zoo.architectures.utils_architectures")
        return f"{net}  # torchvision.models"
    if arch in ("resnet18", "resnet50"):
        block, blocks = ("BasicBlock", [2, 2, 2, 2]) if arch == "resnet18" else ("Bottleneck", [3, 4, 6, 3])
        return f"ResNet({block}, {blocks}, num_classes={nc}){_buffers_note(kw)}"
    if arch == "preact_resnet18":
        extra = "".join(f", {k}={kw[k]}" for k in ("bn_before_fc", "out_shortcut") if k in kw)
        return f"PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes={nc}{extra}){_buffers_note(kw)}"
    if arch == "preact_resnet18_saad":
        return f"pResNet18(num_classes={nc})  # HongsinLee/saad cifar100_models/preresnet.py"
    if arch == "preact_resnet18_dgad":
        return (f"PreActResNet(PreActBlock, [2, 2, 2, 2], num_classes={nc})  # kunsaram01/DGAD "
                f"networks/preresnet.py, 64x64 inputs")
    if arch == "mobilenet_v2":
        return f"MobileNetV2(num_classes={nc})  # kuangliu/pytorch-cifar layout"
    return f"{arch}(num_classes={nc}, **{kw})"


def _stats(stat: Any) -> str:
    """A statistic as the tuple literal a constructor call takes."""
    return str(tuple(stat)) if isinstance(stat, (list, tuple)) else repr(stat)


def _buffers_note(kw: Mapping[str, Any]) -> str:
    """What a CIFAR network's RobustBench subclass adds around it, when the model normalises its input."""
    if kw.get("per_image_standardize"):
        return "  # inside per-image standardisation, as robustbench's Ding2020MMANet (cifar10.py)"
    if kw.get("mean") is None:
        return ""
    return (f"  # with buffers mu={_stats(kw['mean'])}, sigma={_stats(kw['std'])} and x = (x - mu) / sigma first, "
            f"as robustbench's normalised subclasses (e.g. Rice2020OverfittingNet, cifar10.py)")


def _deepmind_settings(kw: Mapping[str, Any]) -> str:
    """`, activation_fn=Swish, mean=..., std=..., padding=...` of a DeepMind model's kwargs (our defaults: Swish)."""
    act = TORCH_ACTIVATIONS[kw.get("activation", "swish")]
    return f", activation_fn={act}" + "".join(f", {k}={tuple(kw[k]) if isinstance(kw[k], list) else kw[k]}"
                                             for k in ("mean", "std", "padding") if k in kw)


def save_state_dict(state: Mapping[str, Any], dst) -> pathlib.Path:
    """Writes a state_dict atomically: `.safetensors` by suffix, otherwise `torch.save` of a plain dict."""
    dst = pathlib.Path(dst).absolute()
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.name.endswith(".safetensors"):
        from safetensors.torch import save  # noqa: PLC0415

        files.write_atomic(dst, lambda f: f.write(save(dict(state))), mode="wb")
    else:
        files.write_atomic(dst, lambda f: _torch().save(dict(state), f), mode="wb")
    return dst


def export_model(src, dst, sub_block1: bool = False, progress=None) -> pathlib.Path:
    """Model directory or training workdir (best checkpoint) -> PyTorch state_dict file at `dst`."""
    spec = store.read_spec(src)
    if progress:
        progress(f"loading {src} ({spec['arch']}, {spec['num_classes']} classes)")
    _, variables = checkpoints.load_model(src)
    state = to_torch_state_dict(variables, spec["arch"], sub_block1=sub_block1, kwargs=spec.get("kwargs", {}))
    out = save_state_dict(state, dst)
    if progress:
        progress(f"wrote {out} ({len(state)} tensors); load it into {torch_constructor(spec)} with strict=True")
    return out


# ---------------------------------------------------------------- command line


def define_flags() -> None:
    """The CLI's flags, defined only when run as a program (the module is also a library)."""
    flags.DEFINE_string("src", None, "Model directory (from mmard_jax.convert) or training workdir (best checkpoint).")
    flags.DEFINE_string("dst", None, "Output file: .pt/.pth (torch.save of a plain dict) or .safetensors.")
    flags.DEFINE_bool("sub_block1", False, "Add TRADES's unused sub_block1.* (WideResNet(..., sub_block1=True)).")
    xla_env.define_flags()
    flags.mark_flags_as_required(["src", "dst"])


def main(argv) -> None:
    """Runs one export from the flags; a bad source is one line on stderr and status 2 (`cli.run`)."""
    xla_env.apply_cpu_defaults(flags.FLAGS.xla_cpu_defaults)  # first: before anything may start a JAX backend
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    runtime.quiet_logging()
    f = flags.FLAGS
    cli.existing_path("src", f.src, kind="dir")
    if pathlib.Path(f.dst).is_dir():
        raise cli.UserError(f"--dst={f.dst!r} is a directory, expected a file (.pt, .pth or .safetensors)")
    export_model(f.src, f.dst, sub_block1=f.sub_block1, progress=lambda m: print(m, flush=True))


def run() -> None:
    """Console-script entry point (`mmard-export`)."""
    define_flags()
    cli.run(main)


if __name__ == "__main__":
    run()
