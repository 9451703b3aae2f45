"""Converter against its peers: RobustBench's model tables (parsed, not imported) and RobustBench's own modules.

Every exactness test builds the peer with RobustBench's architecture code, the normalising classes of its zoo files
(executed from the file's text: importing them imports torchvision), tests/peers/mobilenetv2.py or
tests/peers/torchvision_resnet.py (torchvision's ImageNet ResNets, inside RobustBench's own `normalize_model`),
randomizes its weights and BatchNorm statistics, writes the state_dict in one of the shapes published checkpoints
come in,
converts the file through the public API (one test through the CLI) and compares logits in float32.
"""

import ast
import base64
import functools
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import pathlib
import pickle
import shlex
import subprocess
import sys
import warnings

import jax
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mmard_jax import config_lib, models
from mmard_jax.interop import convert, naming, published
from mmard_jax.interop import zoo as robustbench_zoo
from mmard_jax.models import normalization
from peers import torchvision_resnet as tv
from peers.interop import randomize_batch_norm
from peers.mobilenetv2 import MobileNetV2
from peers.robustbench import load_arch

torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

TESTS = pathlib.Path(__file__).resolve().parent
REPO = TESTS.parent


# ---------------------------------------------------------------- helpers shared with test_export.py


def rb(module):
    """RobustBench architecture module, loaded by path."""
    return load_arch(module)


def randomize(peer, seed=0):
    """Random BN affine parameters and running statistics and Linear biases (PyTorch init for the rest); eval mode.

    The last BN of each torchvision residual branch is scaled down (as trained ResNets have it), so that the deep
    ImageNet nets keep logits of order 1, where float32 rounding stays far below the 1e-4 compared."""
    peer = randomize_batch_norm(peer, seed, linear_bias=True)
    with torch.no_grad():
        for m in peer.modules():
            last = m.bn3 if isinstance(m, tv.Bottleneck) else m.bn2 if isinstance(m, tv.BasicBlock) else None
            if last is not None:
                last.weight.mul_(0.2)
    return peer


def round_to(peer, dtype):
    """Rounds every float tensor of `peer` to `dtype` (kept float32), so a `dtype` checkpoint is exact."""
    with torch.no_grad():
        for t in peer.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(dtype).float())
    return peer


def images(batch=2, seed=0):
    """Uniform [0, 1] NHWC float32 images."""
    return np.random.default_rng(seed).uniform(size=(batch, 32, 32, 3)).astype(np.float32)


def torch_logits(peer, x):
    """Peer logits on NHWC images."""
    with torch.no_grad():
        return peer(torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()).numpy()


@functools.cache
def _jitted_apply(module):
    """One compiled forward per architecture (modules are hashable), shared by the convert and export tests."""
    return jax.jit(functools.partial(module.apply, train=False))


def flax_logits(module, variables, x):
    """Our logits in float32 matmul precision."""
    with jax.default_matmul_precision("float32"):
        return np.asarray(_jitted_apply(module)(variables, x))


def assert_same_logits(module, variables, peer, seed=0):
    """Logits of both sides on random images agree to 1e-4, and are not trivially small."""
    x = images(seed=seed)
    theirs = torch_logits(peer, x)
    ours = flax_logits(module, variables, x)
    assert np.abs(theirs).max() > 1e-1
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4)


def state_of(peer):
    """The peer's state_dict as a plain dict (cloned: later edits must not reach the peer)."""
    return {k: v.clone() for k, v in peer.state_dict().items()}


# ---------------------------------------------------------------- the table against RobustBench's files


def _rb_zoo_dir():
    """The installed `robustbench/model_zoo` directory (read as text, never imported)."""
    spec = importlib.util.find_spec("robustbench")
    return pathlib.Path(list(spec.submodule_search_locations)[0]) / "model_zoo"


class _LocalClass:
    """A model class defined in cifar10.py/cifar100.py itself: a subclass adding normalization or ensembling."""

    def __init__(self, name):
        self.name = name


def _symbols(tree):
    """({imported name: its `architectures` module}, {name: definition node} of what the zoo file defines itself)."""
    imports = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and ".architectures." in node.module:
            for alias in node.names:
                imports[alias.asname or alias.name] = node.module.rsplit(".", 1)[1]
    local = {n.name: n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    return imports, local


def _value(node, imports, local):
    """Evaluates an argument expression of a model constructor: literals, imported names, `nn.X`."""
    if isinstance(node, ast.Name):
        if node.id in local:
            return _LocalClass(node.id)
        return getattr(rb(imports[node.id]), node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "nn":
        return getattr(torch.nn, node.attr)
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_value(e, imports, local) for e in node.elts]
    return ast.literal_eval(node)


def _constructor(model_node):
    """(callable name, args nodes, keyword nodes) of a table's `'model'` value: `lambda: F(...)` or `F`.

    A call of an attribute (`timm.create_model(...)`, `robust_resnet.get_model(...)`) gives name None.
    """
    if isinstance(model_node, ast.Lambda):
        call = model_node.body
        assert isinstance(call, ast.Call), ast.dump(call)
        if not isinstance(call.func, ast.Name):
            return None, [], {}
        return call.func.id, call.args, {k.arg: k.value for k in call.keywords}
    assert isinstance(model_node, ast.Name), ast.dump(model_node)
    return model_node.id, [], {}


def _threat_dicts(tree, variable):
    """{threat model: variable name} from `cifar_10_models = OrderedDict([(ThreatModel.Linf, linf), ...])`."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == variable:
            pairs = node.value.args[0].elts
            return {p.elts[0].attr: p.elts[1].id for p in pairs}
    raise AssertionError(f"{variable} not found")


def robustbench_entries(filename, variable):
    """{(threat model, name): (constructor, arg nodes, keyword nodes, imports, local names)} of a zoo file."""
    tree = ast.parse((_rb_zoo_dir() / filename).read_text())
    imports, local = _symbols(tree)
    dicts = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            dicts[node.targets[0].id] = node.value
    out = {}
    for threat, var in _threat_dicts(tree, variable).items():
        assert threat in robustbench_zoo.THREAT_MODELS, threat
        for entry in dicts[var].args[0].elts:
            name = ast.literal_eval(entry.elts[0])
            table = entry.elts[1]
            model = table.values[[ast.literal_eval(k) for k in table.keys].index("model")]
            ctor, args, kwargs = _constructor(model)
            out[(threat, name)] = (ctor, args, kwargs, imports, local)
    return out


# The architecture files whose classes our families mirror, and the bases of the zoo files' normalising subclasses.
OUR_ARCH_FILES = ("wide_resnet", "dm_wide_resnet", "resnet")
NORMALIZED_BASES = ("WideResNet", "ResNet", "PreActResNet")


def _recorder(real):
    """A stand-in for the RobustBench class `real`: records the arguments it is built with (bound to `real`'s
    signature) and passes its input through, so that a subclass's forward returns its normalised input."""

    class Recorder(torch.nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()
            bound = inspect.signature(real).bind(*args, **kwargs)
            bound.apply_defaults()
            self.recorded = (real.__name__, dict(bound.arguments))

        def forward(self, x):
            return x

    return Recorder


def zoo_class(node, imports, record=False):
    """A class the zoo file defines (a normalising subclass), executed from the file's text with RobustBench's
    architecture classes (the base replaced by a `_recorder` when `record`); None unless its base is ours."""
    bases = [b.id for b in node.bases if isinstance(b, ast.Name)]
    if not isinstance(node, ast.ClassDef) or len(bases) != 1 or bases[0] not in NORMALIZED_BASES:
        return None
    namespace = {"torch": torch, "nn": torch.nn}
    namespace.update({name: getattr(rb(module), name) for name, module in imports.items() if module in OUR_ARCH_FILES})
    if record:
        namespace[bases[0]] = _recorder(namespace[bases[0]])
    exec(compile(ast.Module(body=[node], type_ignores=[]), f"<robustbench zoo {node.name}>", "exec"), namespace)
    return namespace[node.name]


@functools.cache
def zoo_file_class(filename, name):
    """The real class `name` of the installed zoo file `filename` (RobustBench's own normalising module)."""
    tree = ast.parse((_rb_zoo_dir() / filename).read_text())
    imports, local = _symbols(tree)
    return zoo_class(local[name], imports)


def measured_normalization(net):
    """The input normalisation of a recorded subclass, read off its forward (its network passes x through): the
    `mu`/`sigma` buffers it registers, per-image standardisation, or the per-channel affine map it computes (e.g.
    `2 * x - 1`), as our model's kwargs; checked to be exactly what our `normalization.normalize` computes."""
    x = torch.rand(2, 3, 6, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = net(x)
    if torch.equal(x, y):
        return {}
    nhwc = x.permute(0, 2, 3, 1).numpy()
    if hasattr(net, "mu"):
        kwargs = {"mean": tuple(net.mu.flatten().tolist()), "std": tuple(net.sigma.flatten().tolist())}
    elif np.allclose(normalization.per_image_standardize(nhwc), y.permute(0, 2, 3, 1).numpy(), atol=1e-6):
        kwargs = {"per_image_standardize": True}
    else:  # y = (x - mean) / std per channel: two points give std and mean
        xs, ys = x.transpose(0, 1).reshape(3, -1).double(), y.transpose(0, 1).reshape(3, -1).double()
        std = (xs[:, 0] - xs[:, 1]) / (ys[:, 0] - ys[:, 1])
        kwargs = {"mean": tuple(round(v, 4) for v in (xs[:, 0] - ys[:, 0] * std).tolist()),
                  "std": tuple(round(v, 4) for v in std.tolist())}
    per_image = bool(kwargs.get("per_image_standardize"))
    ours = normalization.normalize(nhwc, kwargs.get("mean"), kwargs.get("std"), per_image, np.float32)
    np.testing.assert_allclose(np.asarray(ours), y.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-6)
    return kwargs


def as_ours(ctor, args, kwargs, imports, local):
    """(arch, num_classes, kwargs) when the RobustBench constructor call is exactly one of our architectures, or a
    subclass of one the zoo file defines to normalise its input (its normalisation measured)."""
    if ctor is not None and ctor in local:
        cls = zoo_class(local[ctor], imports, record=True)
        if cls is None:
            return None  # ensembles, ResNeXts, CARD's networks
        net = cls(*[_value(a, imports, local) for a in args],
                  **{k: _value(v, imports, local) for k, v in kwargs.items()})
        ours = _as_ours_bound(*net.recorded)
        return None if ours is None else (*ours[:2], {**ours[2], **measured_normalization(net)})
    if ctor is None or ctor not in imports or imports[ctor] not in OUR_ARCH_FILES:
        return None  # a factory of a package, or a class of another architecture file
    cls = getattr(rb(imports[ctor]), ctor)
    bound = inspect.signature(cls).bind(*[_value(a, imports, local) for a in args],
                                        **{k: _value(v, imports, local) for k, v in kwargs.items()})
    bound.apply_defaults()
    return _as_ours_bound(ctor, bound.arguments)


def _as_ours_bound(ctor, a):
    """(arch, num_classes, kwargs) of a RobustBench class `ctor` built with the bound arguments `a`, or None."""
    resnet = rb("resnet")
    if ctor == "WideResNet":
        assert a["dropRate"] == 0.0
        kw = {"depth": a["depth"], "width": a["widen_factor"], "bias_last": a["bias_last"]}
        return "wide_resnet", a["num_classes"], kw
    if ctor in ("DMWideResNet", "DMPreActResNet"):
        return _as_deepmind(ctor, a)
    if ctor == "ResNet18":
        return "resnet18", 10, {}
    if ctor == "ResNet" and a["block"] is resnet.BasicBlock and list(a["num_blocks"]) == [2, 2, 2, 2]:
        return "resnet18", a["num_classes"], {}
    if ctor == "ResNet" and a["block"] is resnet.Bottleneck and list(a["num_blocks"]) == [3, 4, 6, 3]:
        return "resnet50", a["num_classes"], {}
    if ctor == "PreActResNet" and list(a["num_blocks"]) == [2, 2, 2, 2]:
        # PreActBlockV2 is PreActBlock whose shortcut always reads relu(bn1(x)): out_shortcut=True.
        v2 = a["block"] is resnet.PreActBlockV2
        if a["block"] is resnet.PreActBlock or v2:
            kw = {"bn_before_fc": a["bn_before_fc"], "out_shortcut": a["out_shortcut"] or v2}
            return "preact_resnet18", a["num_classes"], kw
    return None


def _as_deepmind(ctor, a):
    """(arch, num_classes, kwargs) of bound `DMWideResNet`/`DMPreActResNet` arguments (Swish, nn.SiLU or ReLU)."""
    activations = {rb("dm_wide_resnet").Swish: "swish", torch.nn.SiLU: "silu", torch.nn.ReLU: "relu"}
    assert a["num_input_channels"] == 3
    kw = {"depth": a["depth"], "activation": activations[a["activation_fn"]],
          "mean": tuple(a["mean"]), "std": tuple(a["std"]), "padding": a["padding"]}
    if ctor == "DMPreActResNet":
        assert a["width"] == 0  # RobustBench rejects any other width
        return "dm_preact_resnet", a["num_classes"], kw
    return "dm_wide_resnet", a["num_classes"], {**kw, "width": a["width"]}


def zoo_file_is_published(filename):
    """True when the installed zoo file is byte for byte the published one (the sha256 robustbench's RECORD lists)."""
    for f in importlib.metadata.distribution("robustbench").files or ():
        if f.as_posix() == f"robustbench/model_zoo/{filename}" and f.hash is not None:
            digest = hashlib.new(f.hash.mode, f.read_binary()).digest()
            return base64.urlsafe_b64encode(digest).rstrip(b"=").decode() == f.hash.value
    return False


def module_fields(arch, num_classes, kwargs):
    """The attributes of the Flax module an (arch, classes, kwargs) triple builds: equal fields, equal model
    (normalisation statistics compared in float32, the precision the models compute them in)."""
    module = models.create(arch, num_classes=num_classes, **kwargs)
    fields = {f: getattr(module, f) for f in ("num_classes", *models.accepted_arguments(arch))}
    for stat in ("mean", "std"):
        if fields.get(stat) is not None:
            fields[stat] = tuple(np.float32(v) for v in np.broadcast_to(fields[stat], (3,)))
    return arch, fields


def test_zoo_table_matches_robustbench_model_zoo_files():
    derived, listed, edited = {}, set(), []
    for dataset, filename, variable in [("cifar10", "cifar10.py", "cifar_10_models"),
                                        ("cifar100", "cifar100.py", "cifar_100_models")]:
        edited += [] if zoo_file_is_published(filename) else [filename]
        for (threat, name), call in robustbench_entries(filename, variable).items():
            listed.add((dataset, threat, name))
            ours = as_ours(*call)
            if ours is not None:
                derived[(dataset, threat, name)] = ours
    # Every supported RobustBench entry is in the table, with the same settings.
    assert sorted(set(derived) - set(robustbench_zoo.ZOO)) == []
    for key, ours in derived.items():
        entry = robustbench_zoo.ZOO[key]
        assert module_fields(entry.arch, entry.num_classes, entry.kwargs) == module_fields(*ours), key
    # And nothing else: exactly so when the files are the published ones. An installed copy edited after
    # installation (entries removed) cannot check the rows it lacks; it must not list them otherwise, though.
    unchecked = sorted(k for k in set(robustbench_zoo.ZOO) - set(derived) if k[0] != "imagenet")  # CIFAR rows here
    if not edited:
        assert unchecked == []
    assert sorted(set(unchecked) & listed) == []
    if unchecked:
        warnings.warn(f"robustbench's installed {', '.join(edited)} differ from the published robustbench "
                      f"{importlib.metadata.version('robustbench')}: {len(unchecked)} table rows unchecked")
    # The paper's teachers (docs/design.md, "Training") and the config's teacher names are all rows.
    for name, dataset, arch in [("Zhang2019Theoretically", "cifar10", "wide_resnet"),
                                ("Gowal2020Uncovering", "cifar100", "dm_wide_resnet"),
                                ("Addepalli2021Towards_RN18", "cifar10", "resnet18"),
                                ("Cui2020Learnable_34_20", "cifar10", "wide_resnet"),
                                ("Jia2022LAS-AT_70_16", "cifar10", "wide_resnet")]:
        assert robustbench_zoo.lookup(name, dataset).arch == arch
    for (dataset, _), name in config_lib.PAPER_TEACHERS.items():  # published ones convert with --published=NAME
        if name in published.PUBLISHED:
            assert published.lookup(name).dataset == dataset
        else:
            robustbench_zoo.lookup(name, dataset)
    # The DeepMind PreAct-ResNet-18s, present even in an edited copy, derived rather than merely listed.
    dm_preact = sorted(k for k, e in robustbench_zoo.ZOO.items() if e.arch == "dm_preact_resnet")
    assert len(dm_preact) == 8 and set(dm_preact) <= set(derived)
    # The normalised entries the issue names, derived (normalisation measured) rather than merely listed.
    for key in [("cifar10", "Linf", "Rice2020Overfitting"), ("cifar10", "Linf", "Chen2020Efficient"),
                ("cifar10", "Linf", "Wong2020Fast"), ("cifar10", "Linf", "Ding2020MMA"),
                ("cifar10", "L2", "Augustin2020Adversarial"), ("cifar100", "Linf", "Rice2020Overfitting")]:
        assert key in derived, key
    normalized = sorted(k for k, e in robustbench_zoo.ZOO.items() if k[0] != "imagenet" and
                        (e.kwargs.get("mean") is not None or e.kwargs.get("per_image_standardize")) and
                        e.arch not in ("dm_wide_resnet", "dm_preact_resnet"))
    assert len(normalized) == 26


# ---------------------------------------------------------------- the ImageNet table against imagenet.py


def _constant(node, constants):
    """A literal, a module-level name of the zoo file (`mu`, `sigma`) or a product/sum of them (`64 * 2`)."""
    if isinstance(node, ast.Name):
        return constants[node.id]
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Add)):
        left, right = _constant(node.left, constants), _constant(node.right, constants)
        return left * right if isinstance(node.op, ast.Mult) else left + right
    return ast.literal_eval(node)


def _torchvision_call(node, constants):
    """(function, kwargs) of a `pt_models.<function>(...)` call, or None for anything else (timm, factories)."""
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "pt_models"):
        return None
    assert not node.args, ast.dump(node)
    return node.func.attr, {k.arg: _constant(k.value, constants) for k in node.keywords}


def imagenet_entries():
    """{(threat model, name): (torchvision function, its kwargs, (mean, std) of normalize_model or None) or None}
    of the installed imagenet.py (read as text: importing it imports torchvision)."""
    tree = ast.parse((_rb_zoo_dir() / "imagenet.py").read_text())
    constants, dicts = {}, {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            dicts[node.targets[0].id] = node.value
            try:
                constants[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    out = {}
    for threat, var in _threat_dicts(tree, "imagenet_models").items():
        assert threat in robustbench_zoo.THREAT_MODELS, threat
        for entry in dicts[var].args[0].elts:
            name, table = ast.literal_eval(entry.elts[0]), entry.elts[1]
            model = table.values[[ast.literal_eval(k) for k in table.keys].index("model")]
            body = model.body if isinstance(model, ast.Lambda) else model
            stats = None
            if isinstance(body, ast.Call) and isinstance(body.func, ast.Name) and body.func.id == "normalize_model":
                stats = tuple(tuple(_constant(a, constants)) for a in body.args[1:])
                body = body.args[0]
            call = _torchvision_call(body, constants)
            out[(threat, name)] = None if call is None else (*call, stats)
    return out


def torchvision_ours(function, kwargs, stats):
    """(arch, num_classes, kwargs) of `normalize_model(pt_models.<function>(**kwargs), *stats)`, the classes read off
    the peer built from the call (our families' names and shapes against these peers: tests/test_models.py)."""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("pretrained", "progress")}  # the weights' source only
    stats_kwargs = {} if stats is None else {"mean": stats[0], "std": stats[1]}
    return f"torchvision_{function}", _peer_classes(function, tuple(sorted(kwargs.items()))), {**kwargs, **stats_kwargs}


@functools.cache
def _peer_classes(function, kwargs_items):
    """The classes of the torchvision peer `function(**kwargs)`, built on the meta device."""
    with torch.device("meta"):
        return getattr(tv, function)(**dict(kwargs_items)).fc.out_features


def test_imagenet_zoo_table_matches_robustbench_imagenet_file():
    """Every entry of RobustBench's imagenet.py that is a torchvision ResNet-18/50/WRN-50-2 (inside normalize_model
    or not) is a row, with the same network, classes and statistics; rows the installed file lacks are allowed only
    when the file is not the published one, and are then named in a warning."""
    derived, listed = {}, set()
    for (threat, name), call in imagenet_entries().items():
        listed.add(("imagenet", threat, name))
        if call is not None and hasattr(tv, call[0]):
            function, kwargs, stats = call
            derived[("imagenet", threat, name)] = torchvision_ours(function, kwargs, stats)
        elif call is not None:
            assert call[0] not in ("resnet18", "resnet50", "wide_resnet50_2"), call
    rows = {k for k in robustbench_zoo.ZOO if k[0] == "imagenet"}
    assert sorted(set(derived) - rows) == []
    for key, ours in derived.items():
        entry = robustbench_zoo.ZOO[key]
        assert module_fields(entry.arch, entry.num_classes, entry.kwargs) == module_fields(*ours), key
    unchecked = sorted(rows - set(derived))
    assert sorted(set(unchecked) & listed) == []
    if zoo_file_is_published("imagenet.py"):
        assert unchecked == []
    elif unchecked:
        warnings.warn(f"robustbench's installed imagenet.py differs from the published robustbench "
                      f"{importlib.metadata.version('robustbench')} (entries removed): {len(unchecked)} ImageNet rows "
                      f"unchecked against it: {', '.join(n for _, _, n in unchecked)}")
    # The entries, each a row of its family.
    for name, arch in [("Salman2020Do_R18", "torchvision_resnet18"), ("Salman2020Do_R50", "torchvision_resnet50"),
                       ("Salman2020Do_50_2", "torchvision_wide_resnet50_2"),
                       ("Engstrom2019Robustness", "torchvision_resnet50"), ("Wong2020Fast", "torchvision_resnet50"),
                       ("Chen2024Data_WRN_50_2", "torchvision_resnet50"), ("Standard_R50", "torchvision_resnet50")]:
        assert robustbench_zoo.lookup(name, "imagenet").arch == arch
    chen = robustbench_zoo.lookup("Chen2024Data_WRN_50_2", "imagenet")
    assert chen.kwargs == {"width_per_group": 128}  # wide, and no normalize_model (imagenet.py:136-140)
    assert len(rows) == 16


def test_robustbench_rows_record_their_input_shape():
    assert convert.resolve_input_shape(robustbench="Salman2020Do_R18", dataset="imagenet") == (224, 224, 3)
    assert convert.resolve_input_shape(robustbench="Wong2020Fast", dataset="imagenet") == (288, 288, 3)
    assert convert.resolve_input_shape(robustbench="Wong2020Fast", dataset="cifar10") == (32, 32, 3)
    with pytest.raises(convert.ConversionError, match="contradicts the model's own 288x288x3"):
        convert.resolve_input_shape(robustbench="Wong2020Fast", dataset="imagenet", input_shape=(224, 224, 3))


def test_list_prints_the_imagenet_and_normalised_rows(capsys):
    convert._print_table()
    out = capsys.readouterr().out
    assert "imagenet Linf        Salman2020Do_50_2" in out and "torchvision_wide_resnet50_2(num_classes=1000" in out
    assert [line.split()[3] for line in out.splitlines() if " Wong2020Fast " in line] == ["32x32x3", "288x288x3"]
    assert "cifar10  Linf        Ding2020MMA" in out and "per_image_standardize=True" in out


def test_zoo_lookup_errors_say_why():
    with pytest.raises(ValueError, match="listed under cifar10/L2"):
        robustbench_zoo.lookup("Gowal2020Uncovering", "cifar10")
    with pytest.raises(ValueError, match="Close names: Zhang2019Theoretically"):
        robustbench_zoo.lookup("Zhang2019Theoreticaly", "cifar10")
    with pytest.raises(ValueError, match="architecture is not one we implement"):
        robustbench_zoo.lookup("Chen2020Adversarial", "cifar10")  # an ensemble of three ResNet-50s


# ---------------------------------------------------------------- exactness against RobustBench's modules


def test_wrn_34_10_trades_checkpoint_is_exact(tmp_path):
    """Full-size WRN-34-10 as TRADES publishes it (raw state_dict with the unused sub_block1)."""
    torch.manual_seed(0)
    peer = randomize(rb("wide_resnet").WideResNet(depth=34, widen_factor=10, sub_block1=True))
    src = tmp_path / "Zhang2019Theoretically.pt"
    torch.save(peer.state_dict(), src)
    dst = convert.convert_file(src, tmp_path / "teacher", robustbench="Zhang2019Theoretically", dataset="cifar10")
    module, variables = models.load_pretrained(dst)
    assert models.count_params(variables) == 46_160_474
    assert_same_logits(module, variables, peer)
    spec = json.loads((dst / "model.json").read_text())
    assert spec["arch"] == "wide_resnet" and spec["kwargs"] == {"depth": 34, "width": 10}
    rb_source = {"name": "Zhang2019Theoretically", "dataset": "cifar10", "threat_model": "Linf"}
    assert spec["source"]["robustbench"] == rb_source
    assert spec["source"]["sha256"] == convert.sha256(src) and spec["source"]["file"] == str(src)


@pytest.mark.slow
def test_dm_preact_resnet18_checkpoint_is_exact(tmp_path):
    """Full-size DeepMind PreAct-ResNet-18 (Swish, CIFAR-10 statistics) by its RobustBench name; batch 2."""
    torch.manual_seed(0)
    peer = randomize(_dm_preact(10, 18, 0, activation_fn=rb("dm_wide_resnet").Swish))
    src = tmp_path / "Gowal2021Improving_R18_ddpm_100m.pt"
    torch.save({"model_state_dict": state_of(peer)}, src)
    dst = convert.convert_file(src, tmp_path / "teacher", robustbench="Gowal2021Improving_R18_ddpm_100m",
                               dataset="cifar10")
    module, variables = models.load_pretrained(dst)
    assert models.count_params(variables) == sum(p.numel() for p in peer.parameters()) == 12_548_426
    assert_same_logits(module, variables, peer)
    assert json.loads((dst / "model.json").read_text())["arch"] == "dm_preact_resnet"


def _resnet18(nc):
    return rb("resnet").ResNet18() if nc == 10 else rb("resnet").ResNet(rb("resnet").BasicBlock, [2, 2, 2, 2], nc)


def _dm(*args, **kwargs):
    return rb("dm_wide_resnet").DMWideResNet(*args, **kwargs)


def _dm_preact(*args, **kwargs):
    return rb("dm_wide_resnet").DMPreActResNet(*args, **kwargs)


C100_MEAN = load_arch("dm_wide_resnet").CIFAR100_MEAN
C100_STD = load_arch("dm_wide_resnet").CIFAR100_STD
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # robustbench model_zoo/imagenet.py:16-17


def normalize_model(net, mean, std):
    """RobustBench's own ImageNet wrapper (architectures/utils_architectures.py), around a torchvision peer."""
    return load_arch("utils_architectures").normalize_model(net, mean, std)


def _modas_with_own_statistics():
    """`Modas2021PRIMEResNet18` (cifar100.py), whose `mu`/`sigma` buffers its checkpoint overrides (cifar10.py:394):
    here with values of its own, which the conversion must take from the file."""
    net = zoo_file_class("cifar100.py", "Modas2021PRIMEResNet18")()
    with torch.no_grad():
        net.mu.copy_(torch.tensor([0.41, 0.52, 0.47]).view(1, 3, 1, 1))
        net.sigma.copy_(torch.tensor([0.21, 0.33, 0.27]).view(1, 3, 1, 1))
    return net

# case -> (peer constructor, conversion arguments, how the file is written, precision of the stored weights)
CASES = {
    # RobustBench: {'state_dict': {'module.*'}} in a .pth.tar, as many training scripts save it.
    "resnet18": (lambda: _resnet18(10), {"robustbench": "Addepalli2021Towards_RN18", "dataset": "cifar10"},
                 "state_dict_module.pth.tar", None),
    # GradAlign's file: {'last': ..., 'best': ...}, with aliases `model_preact_hl1.*` RobustBench ignores.
    "preact_resnet18": (lambda: rb("resnet").PreActResNet(rb("resnet").PreActBlock, [2, 2, 2, 2]),
                        {"robustbench": "Andriushchenko2020Understanding", "dataset": "cifar10"}, "last_best.pt", None),
    # PreActBlockV2 (CIFAR-100, BN before fc) in a safetensors file.
    "preact_resnet18_v2": (
        lambda: rb("resnet").PreActResNet(rb("resnet").PreActBlockV2, [2, 2, 2, 2], 100, bn_before_fc=True),
        {"robustbench": "Addepalli2021Towards_PARN18", "dataset": "cifar100"}, "plain.safetensors", None),
    # DeepMind layout, Swish, CIFAR-100 statistics: {'model': {'model.*'}, 'epoch', 'best_acc': numpy scalar}.
    "dm_swish_c100": (
        lambda: _dm(100, 16, 2, activation_fn=rb("dm_wide_resnet").Swish, mean=C100_MEAN, std=C100_STD),
        {"arch": "dm_wide_resnet", "num_classes": 100,
         "kwargs": {"depth": 16, "width": 2, "activation": "swish", "mean": list(C100_MEAN), "std": list(C100_STD)}},
        "model_model_meta.pth", None),
    # DeepMind layout with nn.SiLU (Wang2023Better_*, Bartoldson2024Adversarial_*), CIFAR-100 statistics.
    "dm_silu_c100": (
        lambda: _dm(100, 10, 2, activation_fn=torch.nn.SiLU, mean=C100_MEAN, std=C100_STD),
        {"arch": "dm_wide_resnet", "num_classes": 100,
         "kwargs": {"depth": 10, "width": 2, "activation": "silu", "mean": list(C100_MEAN), "std": list(C100_STD)}},
        "state_dict_module.pth.tar", None),
    # DeepMind layout, ReLU, input padding, bfloat16 weights.
    "dm_relu_pad_bf16": (
        lambda: _dm(10, 10, 2, padding=2),
        {"arch": "dm_wide_resnet", "num_classes": 10,
         "kwargs": {"depth": 10, "width": 2, "activation": "relu", "padding": 2}},
        "bfloat16.pt", torch.bfloat16),
    # Our students' PyTorch layout (RSLAD/kuangliu MobileNetV2), half precision.
    "mobilenet_v2_fp16": (lambda: MobileNetV2(10), {"arch": "mobilenet_v2", "num_classes": 10},
                          "float16.pt", torch.float16),
    # ImageNet ResNet-18 by its RobustBench name, the file as RobustBench distributes it: the bare torchvision
    # network's keys (its load_model prefixes `model.`, utils.py); the statistics come from the table, as for the
    # CIFAR entries whose files lack their `mu`/`sigma` (utils.py `known_failing_models`). 32x32 inputs.
    "imagenet_salman2020do_r18": (
        lambda: normalize_model(tv.resnet18(), *IMAGENET_STATS), {"robustbench": "Salman2020Do_R18", "dataset":
                                                                   "imagenet"}, "torchvision_bare.pth", None),
    # The full-size ImageNet WRN-50-2 (Salman2020Do_50_2; ResNet-50 differs only in width_per_group, 64 vs 128, which
    # the smaller case below and the parameter counts cover), its bare torchvision file. 32x32 inputs.
    "imagenet_salman2020do_50_2": (
        lambda: normalize_model(tv.wide_resnet50_2(), *IMAGENET_STATS), {"robustbench": "Salman2020Do_50_2",
                                                                          "dataset": "imagenet"},
        "torchvision_bare.pth", None),
    # A bottleneck net of width_per_group 16 saved from RobustBench's wrapper (`normalize.mean`/`std` beside
    # `model.*`): converted by --arch without statistics, which the file then supplies.
    "imagenet_resnet50_wpg16_wrapper": (
        lambda: normalize_model(tv.resnet50(num_classes=10, width_per_group=16), *IMAGENET_STATS),
        {"arch": "torchvision_resnet50", "num_classes": 10, "kwargs": {"width_per_group": 16}}, "plain.pt", None),
    # CIFAR-100 ResNet-18 whose file carries statistics of its own (common corruptions).
    "cifar100_modas2021prime": (
        _modas_with_own_statistics, {"robustbench": "Modas2021PRIMEResNet18", "dataset": "cifar100",
                                     "threat_model": "corruptions"}, "plain.safetensors", None),
    # Per-image standardisation (`Ding2020MMANet`, small: the entry is a WRN-28-4).
    "cifar10_ding2020mma_small": (
        lambda: zoo_file_class("cifar10.py", "Ding2020MMANet")(depth=10, widen_factor=1),
        {"arch": "wide_resnet", "num_classes": 10, "kwargs": {"depth": 10, "width": 1, "per_image_standardize": True}},
        "state_dict_module.pth.tar", None),
}


def write_checkpoint(state, directory, style):
    """Writes a state_dict the way `style` names (wrappers, prefixes, extra entries, dtype, format)."""
    path = directory / f"ckpt_{style}"
    if style == "state_dict_module.pth.tar":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 99}, path)
    elif style == "last_best.pt":
        alias = {f"model_preact_hl1.1.{k[6:]}": v for k, v in state.items() if k.startswith("conv1.")}
        alias.update({f"model_preact_hl1.2.{k[len('layer1.0.bn1.'):]}": v for k, v in state.items()
                      if k.startswith("layer1.0.bn1.")})
        torch.save({"last": {**state, **alias}, "best": {k: torch.zeros_like(v) for k, v in state.items()}}, path)
    elif style == "plain.safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    elif style == "plain.pt":
        torch.save(state, path)
    elif style == "torchvision_bare.pth":
        torch.save({k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}, path)

    elif style == "model_model_meta.pth":
        wrapped = {f"model.{k}": v for k, v in state.items()}
        torch.save({"model": wrapped, "epoch": 3, "best_acc": np.float64(0.6)}, path)
    elif style == "bfloat16.pt":
        torch.save({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in state.items()}, path)
    elif style == "float16.pt":
        torch.save({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)
    else:
        raise AssertionError(style)
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_checkpoint_is_exact(case, tmp_path):
    constructor, arguments, style, precision = CASES[case]
    torch.manual_seed(1)
    peer = randomize(constructor())
    if precision is not None:
        peer = round_to(peer, precision)  # the stored low-precision weights are then exactly the peer's
    src = write_checkpoint(state_of(peer), tmp_path, style)
    dst = convert.convert_file(src, tmp_path / "model", **arguments)
    module, variables = models.load_pretrained(dst)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(variables))
    assert_same_logits(module, variables, peer)


def test_cli_converts_and_reports_mismatch(tmp_path):
    """The CLI end to end: a good checkpoint gives a loadable directory; a wrong one is one line on stderr, exit
    status 2 (a user error), and writes nothing."""
    torch.manual_seed(2)
    peer = randomize(rb("wide_resnet").WideResNet(depth=10, widen_factor=1))
    src = tmp_path / "wrn.pth"
    torch.save(state_of(peer), src)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "MMARD_XLA_CACHE": "off"}
    common = [sys.executable, "-m", "mmard_jax.convert", f"--src={src}", "--arch=wide_resnet", "--num_classes=10"]
    good = common + ['--arch_kwargs={"depth": 10, "width": 1}', f"--dst={tmp_path / 'good'}"]
    bad = common + ['--arch_kwargs={"depth": 10, "width": 2}', f"--dst={tmp_path / 'bad'}"]
    # Both runs at once (they are mostly Python start-up); the failing one must exit with status 2.
    script = f"{shlex.join(good)} & {shlex.join(bad)}; echo status=$?; wait $!"
    done = subprocess.run(["bash", "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "done in" in done.stdout, done.stdout + done.stderr  # the good run
    assert "status=2" in done.stdout, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("mmard_jax.convert: error:"), done.stderr
    assert "shape mismatches" in errors[0] and "block1.layer.0.conv1.weight" in errors[0]
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "bad").exists()
    module, variables = models.load_pretrained(tmp_path / "good")
    assert_same_logits(module, variables, peer)


# ---------------------------------------------------------------- input handling


def _small_wrn_state(seed=3):
    torch.manual_seed(seed)
    return state_of(randomize(rb("wide_resnet").WideResNet(depth=10, widen_factor=1)))


def _assert_nothing_written(tmp_path, dst):
    """Neither DST nor a staging directory beside it exists."""
    assert not dst.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(f".{dst.name}")]


class _WritesMarker:
    """Unpickling this runs `touch MARKER`: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.mark.parametrize("container", ["torch_zip", "raw_pickle"])
def test_code_running_pickle_is_refused_unrun(container, tmp_path):
    marker = tmp_path / "marker"
    src = tmp_path / "evil.pth"
    payload = {**_small_wrn_state(), "optimizer": _WritesMarker(marker)}
    if container == "torch_zip":
        torch.save(payload, src)
    else:
        src.write_bytes(pickle.dumps(payload, protocol=2))
    dst = tmp_path / "out"
    with pytest.raises(convert.ConversionError, match=r"evil\.pth: refused to unpickle.*Nothing from the file was run"):
        convert.convert_file(src, dst, arch="wide_resnet", num_classes=10, kwargs={"depth": 10, "width": 1})
    assert not marker.exists()
    _assert_nothing_written(tmp_path, dst)


def test_mismatch_lists_missing_unexpected_and_shapes(tmp_path):
    state = _small_wrn_state()
    del state["block2.layer.0.bn1.running_var"]
    state["extra.layer.weight"] = torch.zeros(3)
    state["fc.weight"] = torch.zeros(7, 64)
    src = tmp_path / "wrong.pt"
    torch.save(state, src)
    dst = tmp_path / "out"
    with pytest.raises(convert.ConversionError) as info:
        convert.convert_file(src, dst, arch="wide_resnet", num_classes=10, kwargs={"depth": 10, "width": 1})
    message = str(info.value)
    assert str(src) in message and "wide_resnet(num_classes=10, depth=10, width=1)" in message
    assert "missing keys (1): [block2.layer.0.bn1.running_var]" in message
    assert "unexpected keys (1): [extra.layer.weight]" in message
    assert "shape mismatches (1): [fc.weight: file (7, 64) vs expected (10, 64)]" in message
    _assert_nothing_written(tmp_path, dst)


def test_wrong_architecture_fails_before_writing(tmp_path):
    src = tmp_path / "wrn10.pt"
    torch.save(_small_wrn_state(), src)
    dst = tmp_path / "out"
    with pytest.raises(convert.ConversionError, match=r"(?s)missing keys .*unexpected keys .*shape mismatches") as info:
        convert.convert_file(src, dst, robustbench="Addepalli2021Towards_RN18", dataset="cifar10")
    # The message says what the file does fit, read off its names and shapes.
    assert "The file fits wide_resnet(num_classes=10, depth=10, width=1)" in str(info.value)
    assert """--arch=wide_resnet --arch_kwargs='{"depth": 10, "width": 1}' --num_classes=10""" in str(info.value)
    _assert_nothing_written(tmp_path, dst)


@pytest.mark.parametrize("constructor, expected", [
    (lambda: rb("wide_resnet").WideResNet(depth=34, widen_factor=20, num_classes=100, sub_block1=True),
     ("wide_resnet", 100, {"depth": 34, "width": 20})),
    (lambda: rb("wide_resnet").WideResNet(depth=16, widen_factor=1, bias_last=False),
     ("wide_resnet", 10, {"depth": 16, "width": 1, "bias_last": False})),
    (lambda: _dm(100, 70, 16), ("dm_wide_resnet", 100, {"depth": 70, "width": 16})),
    (lambda: _dm(10, 94, 16, activation_fn=torch.nn.SiLU), ("dm_wide_resnet", 10, {"depth": 94, "width": 16})),
    (lambda: _dm_preact(100, 18, 0, activation_fn=torch.nn.SiLU), ("dm_preact_resnet", 100, {"depth": 18})),
    (lambda: _dm_preact(10, 34), ("dm_preact_resnet", 10, {"depth": 34})),
    (lambda: _resnet18(10), ("resnet18", 10, {})),
    (lambda: rb("resnet").PreActResNet(rb("resnet").PreActBlockV2, [2, 2, 2, 2], 100, bn_before_fc=True),
     ("preact_resnet18", 100, {"bn_before_fc": True})),
    (lambda: MobileNetV2(100), ("mobilenet_v2", 100, {})),
    (lambda: rb("resnet").ResNet(rb("resnet").Bottleneck, [3, 4, 6, 3]), ("resnet50", 10, {})),
    (lambda: tv.resnet18(), ("torchvision_resnet18", 1000, {})),
    (lambda: tv.resnet50(), ("torchvision_resnet50", 1000, {})),
    (lambda: tv.resnet50(num_classes=10, width_per_group=32), ("torchvision_resnet50", 10, {"width_per_group": 32})),
    (lambda: tv.wide_resnet50_2(), ("torchvision_wide_resnet50_2", 1000, {})),
])
def test_infer_architecture_reads_peer_state_dicts(constructor, expected):
    """Shapes only (meta device): the names and shapes of RobustBench's modules give back their settings."""
    with torch.device("meta"):
        state = convert.drop_unused(constructor().state_dict())
    assert convert.infer_architecture(state) == expected


def test_existing_destination_needs_overwrite(tmp_path):
    src = tmp_path / "wrn.pt"
    torch.save(_small_wrn_state(), src)
    arguments = {"arch": "wide_resnet", "num_classes": 10, "kwargs": {"depth": 10, "width": 1}}
    dst = convert.convert_file(src, tmp_path / "out", **arguments)
    first = (dst / "model.json").read_text()
    with pytest.raises(convert.ConversionError, match="already exists"):
        convert.convert_file(src, dst, **arguments)
    torch.save(_small_wrn_state(seed=4), src)
    convert.convert_file(src, dst, overwrite=True, **arguments)
    assert (dst / "model.json").read_text() != first  # new sha256


def test_convert_state_dict_api_matches_naming_rule():
    """The in-memory API: layouts follow `naming`, integers and dropped leaves are gone."""
    state = _small_wrn_state()
    variables = convert.convert_state_dict({"state_dict": state}, "wide_resnet", 10, {"depth": 10, "width": 1})
    flat = naming.flatten_variables(variables)
    conv1 = state["conv1.weight"].numpy().transpose(2, 3, 1, 0)
    np.testing.assert_array_equal(flat[("params", "conv1", "kernel")], conv1)
    np.testing.assert_array_equal(flat[("params", "fc", "kernel")], state["fc.weight"].numpy().T)
    np.testing.assert_array_equal(flat[("batch_stats", "bn1", "var")], state["bn1.running_var"].numpy())
    assert len(flat) == sum(not k.endswith("num_batches_tracked") for k in state)


def test_normalisation_buffers_are_read_or_refused_clearly(tmp_path):
    """`mu`/`sigma` and `normalize.mean`/`.std` become the model's statistics; a lone one, a model without a place
    for them, or statistics the in-memory API was not given are one-line errors."""
    state = _small_wrn_state()
    stats = {"mu": torch.full((1, 3, 1, 1), 0.5), "sigma": torch.full((1, 3, 1, 1), 0.25)}
    kept, found = convert.split_normalization({**state, **stats})
    assert set(kept) == set(state) and found == {"mean": (0.5,) * 3, "std": (0.25,) * 3}
    wrapped = {"normalize.mean": stats["mu"], "normalize.std": stats["sigma"], **{f"model.{k}": v for k, v in
                                                                                   state.items()}}
    assert set(convert.unwrap_state_dict({"state_dict": wrapped})) == set(state) | {"normalize.mean", "normalize.std"}
    with pytest.raises(convert.ConversionError, match="'mu' without its pair"):
        convert.split_normalization({**state, "mu": stats["mu"]}, "x.pt")
    with pytest.raises(convert.ConversionError, match="mobilenet_v2 has no place for"):
        convert.adopt_normalization(found, "mobilenet_v2", {}, "x.pt")
    kwargs = {"depth": 10, "width": 1}
    with pytest.raises(convert.ConversionError, match=r"normalises its input with mean \(0.5, 0.5, 0.5\)"):
        convert.convert_state_dict({**state, **stats}, "wide_resnet", 10, kwargs)
    variables = convert.convert_state_dict({**state, **stats}, "wide_resnet", 10, {**kwargs, "mean": 0.5, "std": 0.25})
    assert "mu" not in variables["params"]
    src = tmp_path / "wrn_stats.pt"
    torch.save({**state, **stats}, src)
    messages = []
    dst = convert.convert_file(src, tmp_path / "out", arch="wide_resnet", num_classes=10,
                               kwargs={**kwargs, "mean": [0.4] * 3, "std": [0.2] * 3}, progress=messages.append)
    assert json.loads((dst / "model.json").read_text())["kwargs"]["std"] == [0.25] * 3
    replaced = "the file's normalisation (mean (0.5, 0.5, 0.5), std (0.25, 0.25, 0.25)) replaces"
    assert any(replaced in m for m in messages)


def test_bad_requests_are_clear(tmp_path):
    src = tmp_path / "wrn.pt"
    torch.save(_small_wrn_state(), src)
    with pytest.raises(convert.ConversionError, match="no such checkpoint file"):
        convert.convert_file(tmp_path / "missing.pt", tmp_path / "o", arch="resnet18", num_classes=10)
    other = tmp_path / "weights.npz"
    other.write_bytes(b"")
    with pytest.raises(convert.ConversionError, match="unknown checkpoint type"):
        convert.read_checkpoint(other)
    with pytest.raises(convert.ConversionError, match="--dataset"):
        convert.convert_file(src, tmp_path / "o", robustbench="Zhang2019Theoretically")
    with pytest.raises(convert.ConversionError, match="either a RobustBench name or --arch"):
        convert.convert_file(src, tmp_path / "o", robustbench="Zhang2019Theoretically", dataset="cifar10",
                             arch="resnet18")
    with pytest.raises(convert.ConversionError, match="Unknown model"):
        convert.convert_file(src, tmp_path / "o", arch="resnet1000", num_classes=10)
    with pytest.raises(convert.ConversionError, match="found no state_dict"):
        convert.unwrap_state_dict({"epoch": 3, "optimizer": {"lr": 0.1}}, "x.pt")
