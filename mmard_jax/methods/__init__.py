"""The method table: every training method is an inner objective (maximized over x'), an outer objective
(minimized over the trained networks), optional plug-in terms and hyper-parameters, looked up by name.

A method is data, not a branch in the train loop (`core` has the vocabulary and the interfaces, `inner`
the inner objectives, `baselines` the paper's methods, `sota` AdaAD, AdaIAD, IGDM and PeerAiD, `fair` Fair-ARD,
`absld` ABSLD, `saad` SAAD, `dgad` DGAD,
`ciard` CIARD). Inner and outer objectives combine freely (the paper's Table 6 and
Figure 4); plug-ins add to any outer objective (IGDM on AdaAD, AdaIAD, RSLAD or MMARD). Adding a method is an outer
function, an `Objective` and a row.
"""

import warnings
from typing import Any, Dict, Mapping, Optional, Sequence

from mmard_jax.methods import absld, baselines, ciard, dgad, fair, saad, sota
from mmard_jax.methods.core import (
    INNER_FORWARDS,
    OUTER_FORWARDS,
    TRAIN_FORWARDS,
    TRAINED,
    InnerInputs,
    InnerObjective,
    Logits,
    Method,
    MethodRow,
    Objective,
    StepInfo,
    global_mean,
)
from mmard_jax.methods.inner import INNER

OUTER: Dict[str, Objective] = {**baselines.OUTER, **sota.OUTER, **absld.OUTER, **saad.OUTER, **dgad.OUTER,
                               **ciard.OUTER}
PLUGINS: Dict[str, Objective] = {**sota.PLUGINS, "fair": fair.FAIR}
ROWS: Dict[str, MethodRow] = {**baselines.ROWS, **sota.ROWS, **absld.ROWS, **saad.ROWS, **dgad.ROWS, **ciard.ROWS}
DATASET_HPARAMS = {**baselines.DATASET_HPARAMS, **sota.DATASET_HPARAMS, **saad.DATASET_HPARAMS}
METHODS = tuple(ROWS)
METHOD_HPARAMS = {"train_forwards": "published"}  # hyper-parameters of every method (core.TRAIN_FORWARDS)


def _lookup(table: Mapping[str, Any], name: str, what: str):
    if name not in table:
        raise ValueError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]


def inner_row(name: str, inner: Optional[str]) -> MethodRow:
    """The row whose attack a method uses: its own, or that of the method named by `inner`."""
    return ROWS[inner] if inner in ROWS else _lookup(ROWS, name, "method")


def attack_defaults(name: str, inner: Optional[str] = None) -> Dict[str, str]:
    """The published start and student BatchNorm mode of the attack (config `attack.init`, `attack.student_bn`)."""
    row = inner_row(name, inner)
    return {"init": row.init, "student_bn": row.student_bn}


def dataset_hparams(name: str, dataset: str, plugins: Sequence[str] = ()) -> Dict[str, Any]:
    """Published hyper-parameters that depend on the data set (RSLAD/MTARD's x10 on CIFAR-100, IGDM's alpha 20, ...),
    for the method and every plug-in it runs (its row's and `plugins`)."""
    hp = dict(DATASET_HPARAMS.get((name, dataset), {}))
    for plugin in dict.fromkeys(tuple(ROWS[name].plugins if name in ROWS else ()) + tuple(plugins)):
        hp.update(sota.PLUGIN_DATASET_HPARAMS.get((plugin, dataset), {}))
    return hp


def _check_vocabulary(method: Method) -> None:
    """Every declared forward is in the one vocabulary (a misspelled need fails here, not inside a trace)."""
    for phase in method.phases:
        declared = set(method.outer_needs(phase)) | set(method.train_order(phase))
        unknown = sorted(declared - set(OUTER_FORWARDS))
        if unknown:
            raise ValueError(f"method {method.name!r} declares unknown outer forward(s) {unknown} in phase {phase!r}; "
                             f"known: {', '.join(OUTER_FORWARDS)}")
    for phase in method.phases:
        before = [n for n in method.pre_attack_order(phase)
                  if n not in OUTER_FORWARDS or OUTER_FORWARDS[n][1] != "nat" or OUTER_FORWARDS[n][0] not in TRAINED]
        if before:
            raise ValueError(f"method {method.name!r}: forward(s) {before} cannot run before the attack (only a "
                             "trained network's forward at x can)")
    unknown = sorted(set(method.inner.needs) - set(INNER_FORWARDS))
    if unknown:
        raise ValueError(f"inner objective {method.inner.name!r} declares unknown forward(s) {unknown}; "
                         f"known: {', '.join(INNER_FORWARDS)}")


def _plugin_rows(name: str, row: MethodRow, outer: str, plugins: Sequence[Objective]) -> list:
    """The PluginRow of each plug-in that names its rows; a plug-in on a row (or an outer) it does not apply to is
    refused in one line."""
    out = []
    for p in plugins:
        if p.rows is None:
            continue
        if name not in p.rows or outer != row.outer:
            raise ValueError(f"plug-in {p.name!r} applies to the rows {', '.join(p.rows)} with their own outer "
                             f"objective, not to {name!r}" + (f" with outer {outer!r}" if outer != row.outer else ""))
        out.append(p.rows[name])
    return out


def _defaults(row: MethodRow, outer: Objective, plugins: Sequence[Objective], own_row: bool) -> Dict[str, Any]:
    """Merged defaults: every method's, the outer's, the plug-ins' (names must not clash), the row's overrides."""
    hp = dict(METHOD_HPARAMS)
    for term in (outer,) + tuple(plugins):
        clash = set(hp) & set(term.defaults)
        if clash and term is not outer:
            raise ValueError(f"plug-in {term.name!r} hyper-parameter(s) {sorted(clash)} clash with the outer's")
        hp.update(term.defaults)
    if own_row:
        hp.update(row.hparams)
    return hp


def get_method(name: str, inner: Optional[str] = None, outer: Optional[str] = None, plugins: Sequence[str] = (),
               **overrides) -> Method:
    """Resolves a method by name; `inner` (a method or an inner objective) and `outer` (an outer objective)
    replace the row's (Table 6, Figure 4); `plugins` add terms (the row's own always apply).

    Hyper-parameters belong to the outer objective and plug-ins: `overrides` update the published defaults;
    a name nobody takes, or a value that would not change the loss, is an error naming the accepted ones.
    """
    row = _lookup(ROWS, name, "method")
    inner_obj = INNER[inner] if inner in INNER else INNER[_lookup(ROWS, inner or name, "inner objective").inner]
    outer_name = outer or row.outer
    outer_obj = _lookup(OUTER, outer_name, "outer objective")
    plugin_objs = tuple(_lookup(PLUGINS, p, "plug-in") for p in dict.fromkeys(tuple(row.plugins) + tuple(plugins)))
    hp = _defaults(row, outer_obj, plugin_objs, own_row=outer_name == row.outer)
    for key, value in inner_obj.defaults.items():  # the inner objective's own (SAAD's lambda_inner)
        hp.setdefault(key, value)
    combos = _plugin_rows(name, row, outer_name, plugin_objs)
    for combo in combos:
        hp.update(combo.hparams)
    unknown = set(overrides) - set(hp)
    if unknown:
        raise ValueError(f"method {name!r} (outer {outer_obj.name!r}) takes no hyper-parameter {sorted(unknown)}; "
                         f"it takes {sorted(hp)}")
    for key, value in overrides.items():
        hp[key] = type(hp[key])(value) if not isinstance(hp[key], bool) else _as_bool(key, value)
    if hp["train_forwards"] not in TRAIN_FORWARDS:
        raise ValueError(f"train_forwards must be one of {TRAIN_FORWARDS}, got {hp['train_forwards']!r}")
    for combo, plugin in zip(combos, (p for p in plugin_objs if p.rows is not None)):
        for key, only in combo.fixed.items():
            if hp[key] != only:
                raise ValueError(f"{key}={hp[key]!r} is not read (or not implemented) by plug-in {plugin.name!r} on "
                                 f"{name!r}, which takes only {key}={only!r} ({combo.source})")
    for term in (outer_obj,) + plugin_objs:
        term.check(hp)
    _warn_inert(hp, {k: v for k, v in overrides.items() if v != outer_obj.defaults.get(k, hp.get(k))})
    order = row.order if outer_name == row.outer else None
    order = next((c.order for c in combos if c.order is not None), order)
    method = Method(name, inner_obj, outer_obj, plugin_objs, hp, order_override=order)
    _check_vocabulary(method)
    return method


def _as_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "false", "0"):
        return str(value).lower() in ("true", "1")
    raise ValueError(f"hyper-parameter {key} expects true/false, got {value!r}")


def _warn_inert(hp: Mapping[str, Any], overrides: Mapping[str, Any]) -> None:
    """MMARD's Huber delta is inert on probabilities for delta >= 0.5: psi lies in [0.5, 1] (docs/design.md)."""
    if "delta" in overrides and hp.get("trd_use_probs") and hp["delta"] >= 0.5:
        warnings.warn(f"delta={hp['delta']} is inert: on probabilities |psi_s - psi_t| <= 0.5, so the Huber loss is "
                      f"0.5 r^2 for every delta >= 0.5; use delta < 0.5 or trd_use_probs=False", stacklevel=3)


__all__ = [
    "INNER", "INNER_FORWARDS", "METHODS", "OUTER", "OUTER_FORWARDS", "PLUGINS", "ROWS", "InnerInputs",
    "InnerObjective", "Logits", "Method", "MethodRow", "Objective", "StepInfo", "attack_defaults",
    "dataset_hparams", "get_method", "global_mean",
]
