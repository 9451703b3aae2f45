"""Fair-ARD (NeurIPS 2023) as the plug-in `fair`: per-class weights on ARD, IAD, RSLAD and MTARD's per-example
terms, from the previous epoch's per-class robustness (NISP-official/Fair-ARD @910c8cd, the only commit).

Robustness of class c is Kappa_c: summed over the epoch's training examples of class c, the number of attack
iterates x_0 .. x_{K-1} at which the student (in the attack's BatchNorm mode) predicted the label
(Fair-ARD.py:64-71, 134-135), divided by (examples / classes) (Fair-ARD.py:166). The next epoch's weights are
w = clip((1 / (Kappa + eps))^beta * C / sum_c (1 / (Kappa_c + eps))^beta, 5/6, 5/2) (Fair-ARD.py:116-125), ones
in the first epoch (Fair-ARD.py:161); example b's per-example loss terms are multiplied by w[y_b] and the batch
loss stays the plain mean over the batch (Fair-ARD.py:140-148): no renormalisation by the weights' sum.
"""

import jax.numpy as jnp

from mmard_jax.methods.core import EpochState, Objective, PluginRow, Tally, order_of


def class_weights(kappa, hp):
    """Fair-ARD.py:116-125: (1 / (Kappa + eps))^beta scaled to sum to C, then clipped to [fair_min, fair_max]."""
    inv = (1.0 / (kappa + hp["fair_eps"])) ** hp["fair_beta"]
    w = inv * (kappa.shape[0] / jnp.sum(inv))
    return jnp.clip(w, hp["fair_min"], hp["fair_max"])


def kappa_of(sums):
    """Per-class robustness of an epoch: correct iterates per class / (examples / classes) (Fair-ARD.py:166).

    The script divides by the training set's size (its loader keeps the last partial batch); the trainer drops
    that batch, so the examples attacked this epoch are counted instead (docs/design.md, "Deviations")."""
    num_classes = sums["correct"].shape[0]
    seen = jnp.sum(sums["examples"]).astype(jnp.float32)
    return sums["correct"].astype(jnp.float32) / (seen / num_classes)


def _init(hp, num_classes):
    # Weights of the first epoch: ones (Fair-ARD.py:161; Fair-RSLAD.py:109; Fair-MTARD.py:112).
    zeros = jnp.zeros((num_classes,), jnp.int32)
    return {"sums": {"correct": zeros, "examples": jnp.zeros((num_classes,), jnp.int32)},
            "value": {"weights": jnp.ones((num_classes,), jnp.float32)}}


def _accumulate(tally: Tally, hp):
    """This device's contribution: per class, the correct iterates and the examples (Fair-ARD.py:134-135)."""
    num_classes = next(v for v in tally.logits if v is not None).shape[-1]
    onehot = (tally.labels[:, None] == jnp.arange(num_classes)[None, :]).astype(jnp.int32)
    return {"correct": jnp.sum(onehot * tally.correct_iterates[:, None], axis=0, dtype=jnp.int32),
            "examples": jnp.sum(onehot, axis=0, dtype=jnp.int32)}  # int32 under jax_enable_x64 too (the state's)


def _epoch_update(state, hp, lr_scale):
    """Fair-ARD.py:165-167: the next epoch's weights from this epoch's Kappa; the sums start again at zero."""
    weights = class_weights(kappa_of(state["sums"]), hp)
    return {"sums": {k: jnp.zeros_like(v) for k, v in state["sums"].items()}, "value": {"weights": weights}}


def _summary(state, hp):
    """The weights used this epoch and the epoch's Kappa (the script prints both, Fair-ARD.py:117-119, 168-170)."""
    sums = state["sums"]
    kappa = kappa_of(sums) if int(jnp.sum(sums["examples"])) else jnp.zeros_like(state["value"]["weights"])
    return {"fair_weights": [float(v) for v in state["value"]["weights"]], "fair_kappa": [float(v) for v in kappa]}


def _example_weights(value, labels, hp):
    return value["weights"][labels]


def _no_term(lg, y, state, hp, info):
    return jnp.zeros((), jnp.float32), {}, state


def _needs_nothing(hp, phase):
    return frozenset()


def _check(hp):
    if not 0.0 <= hp["fair_min"] <= hp["fair_max"]:
        raise ValueError(f"fair_min must be in [0, fair_max], got fair_min={hp['fair_min']}, fair_max={hp['fair_max']}")
    if hp["fair_eps"] < 0.0:
        raise ValueError(f"fair_eps must be >= 0, got {hp['fair_eps']}")
    if hp["fair_mtard_nat_teacher"] not in ("t_adv", "t2_nat"):
        raise ValueError(f"fair_mtard_nat_teacher must be 't_adv' or 't2_nat', got {hp['fair_mtard_nat_teacher']!r}")


_ON_MTARD_ONLY = {"fair_mtard_nat_teacher": "t_adv"}  # read by the MTARD combination only

# Each combination as its script applies it (every row keeps its own attack: start, BatchNorm mode, objective).
ROWS = {
    # Fair-ARD.py: ARD's loss and forwards (S(x') from the attack, :78; S(x), :137), the weights on KL and CE.
    "ard": PluginRow(fixed=_ON_MTARD_ONLY, source="NISP-official/Fair-ARD Fair-ARD.py"),
    # Fair-IAD.py: IAD-I's form (alpha T^2 KL_T + alpha (1 - w) KL_S, :192; warm-up KL_T alone, :199), T = 1 (:22),
    # beta_iad 0.1 (:29), begin 60 (:30); train-mode forwards S(x') (attack, :94), S(x) (:165), S(x') (:170).
    # Its CE term reads S(x') (:185) and is absent in warm-up (:199), IAD-I's reads S(x): alpha != 1 is refused.
    "iad": PluginRow(hparams={"iad_form": "iad1"}, order=order_of("s_adv", "s_nat", "s_adv"),
                     fixed={**_ON_MTARD_ONLY, "alpha": 1.0, "iad_form": "iad1"},
                     source="NISP-official/Fair-ARD Fair-IAD.py"),
    # Fair-RSLAD.py: weights without eps (1 / Kappa)^beta (:99), weights on both KL terms (:131-133).
    "rslad": PluginRow(hparams={"fair_eps": 0.0}, fixed=_ON_MTARD_ONLY, source="NISP-official/Fair-ARD Fair-RSLAD.py"),
    # Fair-MTARD.py: weights on both KL terms (:145-147), the natural term against T_adv(x') (:144).
    "mtard": PluginRow(source="NISP-official/Fair-ARD Fair-MTARD.py"),
}

FAIR = Objective(
    "fair", _no_term, _needs_nothing, lambda hp, phase: (),
    # beta 2 (Fair-ARD.py:25, README.md's commands); clip [5/6, 5/2] (Fair-ARD.py:124); eps 1e-5 (Fair-ARD.py:120);
    # Fair-MTARD's natural term distils T_adv(x') (Fair-MTARD.py:144), MTARD's own reads T_nat(x).
    {"fair_beta": 2.0, "fair_min": 5.0 / 6.0, "fair_max": 5.0 / 2.0, "fair_eps": 1e-5,
     "fair_mtard_nat_teacher": "t_adv"},
    check=_check,
    epoch_state=EpochState(_init, _accumulate, _epoch_update, frozenset({"correct_iterates"}), _summary),
    example_weights=_example_weights,
    rows=ROWS,
)
