"""The naming rule that ties PyTorch state_dict keys to Flax variable paths, and the weight layouts.

Rule: split the key on '.', fuse every purely numeric segment onto the previous one with '_'
(a PyTorch `nn.Sequential` child `layer1.0` becomes the Flax submodule `layer1_0`); the last segment is
the leaf. Leaves map as

    conv/linear weight -> params/kernel      (OIHW -> HWIO, (out, in) -> (in, out))
    BN weight          -> params/scale
    bias               -> params/bias
    running_mean       -> batch_stats/mean
    running_var        -> batch_stats/var
    num_batches_tracked   dropped

`weight` is the one ambiguous leaf: its rank tells (1: BatchNorm scale, otherwise a kernel).

The inverse needs to know which fused names came from a numeric index: `layer1_0` was `layer1.0`,
but DeepMind's `conv_0` is a real attribute name. `join_torch_key` therefore takes the set of PyTorch
container names (the `nn.Sequential`/`nn.ModuleList` attributes, e.g. {'layer1', 'shortcut'});
`torch_containers` derives that set from a list of keys, and `match_variables` maps a whole Flax
variable tree onto a list of torch keys, reporting anything left unmatched on either side.
"""

import re
from typing import Any, Dict, Iterable, Mapping, Tuple

import numpy as np

Path = Tuple[str, ...]

DROPPED_LEAVES = frozenset({"num_batches_tracked"})
_TORCH_TO_FLAX_LEAF = {
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}
_FLAX_TO_TORCH_LEAF = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
_FUSED = re.compile(r"^(?P<base>.+?)(?P<indices>(?:_\d+)+)$")


def _is_index(segment: str) -> bool:
    """True for a purely numeric key segment (an index into a PyTorch container)."""
    return segment.isdigit() and segment.isascii()


def split_torch_key(key: str) -> Tuple[Path, str]:
    """`'layer1.0.conv1.weight'` -> `(('layer1_0', 'conv1'), 'weight')`: the Flax module path and the torch leaf."""
    segments = key.split(".")
    if len(segments) < 2 or not all(segments) or _is_index(segments[-1]):
        raise ValueError(f"Not a parameter/buffer key of a submodule: {key!r}")
    if _is_index(segments[0]):
        raise ValueError(f"Key starts with a container index (strip the wrapper prefix first): {key!r}")
    path = []
    for segment in segments[:-1]:
        if _is_index(segment):
            path[-1] = f"{path[-1]}_{segment}"
        else:
            path.append(segment)
    return tuple(path), segments[-1]


def torch_containers(torch_keys: Iterable[str]) -> frozenset:
    """Names of the PyTorch containers in `torch_keys`: the segments directly followed by an index."""
    names = set()
    for key in torch_keys:
        segments = key.split(".")
        names.update(a for a, b in zip(segments, segments[1:]) if not _is_index(a) and _is_index(b))
    return frozenset(names)


def _unfuse(name: str, containers: frozenset) -> Tuple[str, ...]:
    """`'layer1_0'` -> `('layer1', '0')` when `layer1` is a container; `'conv_0'` unchanged otherwise."""
    parts = name.split("_")
    candidates = []
    # Try every split into (base, trailing indices): `layer_0_1` may be container `layer_0` index 1
    # (DeepMind's PreAct net) or container `layer` indices 0, 1 (nested Sequentials).
    for cut in range(1, len(parts)):
        base, indices = "_".join(parts[:cut]), parts[cut:]
        if base in containers and all(_is_index(i) for i in indices):
            candidates.append((base, *indices))
    if len(candidates) > 1:
        raise ValueError(f"Ambiguous fused name {name!r}: {candidates} with containers {sorted(containers)}")
    return candidates[0] if candidates else (name,)


def join_torch_key(module_path: Path, leaf: str, containers: Iterable[str]) -> str:
    """Inverse of `split_torch_key`: `(('layer1_0', 'conv1'), 'weight')` -> `'layer1.0.conv1.weight'`."""
    containers = frozenset(containers)
    segments = [s for name in module_path for s in _unfuse(name, containers)]
    return ".".join([*segments, leaf])


def torch_leaf_to_flax(leaf: str, ndim: int) -> Tuple[str, str]:
    """(collection, Flax leaf) of a torch leaf; `ndim` (the tensor's rank) disambiguates `weight`."""
    if leaf == "weight":
        return ("params", "scale") if ndim == 1 else ("params", "kernel")
    if leaf in _TORCH_TO_FLAX_LEAF:
        return _TORCH_TO_FLAX_LEAF[leaf]
    raise ValueError(f"No Flax counterpart for torch leaf {leaf!r}")


def flax_leaf_to_torch(collection: str, leaf: str) -> str:
    """Torch leaf of a Flax (collection, leaf) pair."""
    try:
        return _FLAX_TO_TORCH_LEAF[(collection, leaf)]
    except KeyError:
        raise ValueError(f"No torch counterpart for Flax variable {collection}/{leaf}") from None


def torch_key_to_flax_path(key: str, ndim: int) -> Path:
    """`'bn1.running_var'` -> `('batch_stats', 'bn1', 'var')`: the full Flax variable path of a torch entry."""
    module_path, leaf = split_torch_key(key)
    collection, flax_leaf = torch_leaf_to_flax(leaf, ndim)
    return (collection, *module_path, flax_leaf)


def flax_path_to_torch_key(path: Path, containers: Iterable[str]) -> str:
    """`('params', 'layer1_0', 'conv1', 'kernel')` -> `'layer1.0.conv1.weight'` (inverse of the above)."""
    collection, *module_path, leaf = path
    return join_torch_key(tuple(module_path), flax_leaf_to_torch(collection, leaf), containers)


def to_flax_layout(array: Any) -> np.ndarray:
    """Torch layout -> Flax: conv OIHW -> HWIO (depthwise (C,1,k,k) -> (k,k,1,C)), linear (out,in) -> (in,out)."""
    array = np.asarray(array)
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if array.ndim == 2:
        return array.T
    return array


def to_torch_layout(array: Any) -> np.ndarray:
    """Flax layout -> torch (inverse of `to_flax_layout`)."""
    array = np.asarray(array)
    if array.ndim == 4:
        return array.transpose(3, 2, 0, 1)
    if array.ndim == 2:
        return array.T
    return array


def flatten_variables(variables: Mapping) -> Dict[Path, Any]:
    """Nested Flax variables -> {(collection, *module_path, leaf): array}."""
    flat = {}

    def visit(prefix: Path, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                visit((*prefix, k), v)
        else:
            flat[prefix] = node

    visit((), variables)
    return flat


def match_variables(flax_variables: Mapping, torch_keys: Iterable[str]) -> Dict[Path, str]:
    """{Flax variable path: torch key} built from the torch side; ValueError if either side has leftovers.

    A torch `weight` maps to the `kernel` or the `scale` its Flax module actually has, so no shapes are
    needed. Entries with a dropped leaf (`num_batches_tracked`) are ignored; wrapper prefixes (`module.`)
    and unused submodules (TRADES's `sub_block1`) must be removed by the caller.
    """
    flat = flatten_variables(flax_variables)
    mapping: Dict[Path, str] = {}
    unmatched_torch = []
    for key in torch_keys:
        module_path, leaf = split_torch_key(key)
        if leaf in DROPPED_LEAVES:
            continue
        candidates = [(collection, *module_path, flax_leaf) for collection, flax_leaf in _flax_leaves(leaf)]
        found = [path for path in candidates if path in flat]
        if len(found) != 1 or found[0] in mapping:
            unmatched_torch.append(key)
            continue
        mapping[found[0]] = key
    unmatched_flax = sorted("/".join(p) for p in flat if p not in mapping)
    if unmatched_torch or unmatched_flax:
        raise ValueError(
            f"Names do not correspond. Torch keys without a Flax variable: {unmatched_torch}; "
            f"Flax variables without a torch key: {unmatched_flax}"
        )
    return mapping


def _flax_leaves(torch_leaf: str) -> Tuple[Tuple[str, str], ...]:
    """Every (collection, Flax leaf) a torch leaf may map to (`weight` is a kernel or a scale)."""
    if torch_leaf == "weight":
        return (("params", "kernel"), ("params", "scale"))
    return (torch_leaf_to_flax(torch_leaf, ndim=0),)
