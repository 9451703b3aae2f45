"""Inner objectives, keyed by objective: the per-example loss each method's attack maximizes over x'.

Methods that share an objective share its row (SAT, ARD, IAD and MTARD all maximize CE; MMARD, AdaAD and
AdaIAD all maximize KL(S(x'), T(x'))); the start and the BatchNorm mode of the attack belong to the method
(`MethodRow.init`, `MethodRow.student_bn`; config `attack.init`, `attack.student_bn`).
"""

import jax
import jax.numpy as jnp

from mmard_jax import losses
from mmard_jax.methods.core import InnerInputs, InnerObjective


def _ce(inp: InnerInputs):
    return losses.cross_entropy(inp.s_adv, inp.labels)


def _kl_self(inp: InnerInputs):
    return losses.kl_div(inp.s_adv, inp.s_nat)


def _kl_teacher_nat(inp: InnerInputs):
    return losses.kl_div(inp.s_adv, inp.t_nat)


def _kl_teacher_adv(inp: InnerInputs):
    # Eq. 3 / AdaAD AT_helper.py:33-36: differentiated through the student AND the teacher at x'.
    return losses.kl_div(inp.s_adv, inp.t_adv)


def _kl_peer_nat(inp: InnerInputs):
    # PeerAiD attack_function.py:67-78: the peer's clean logits are a fixed target.
    return losses.kl_div(inp.s_adv, inp.p_nat)


def linearized_teacher(t_nat, t_grad, delta, labels, scale):
    """SAAD's attack target (HongsinLee/saad @295121c attacks.py:169-177): T(x) with the label's logit moved by
    scale * <d T_y(x)/dx, x' - x>, the first-order Taylor step of the teacher's label logit (differentiable in x')."""
    correction = jnp.sum((t_grad * delta).reshape(delta.shape[0], -1), axis=-1)  # einsum('bchw,bchw->b')
    onehot = jax.nn.one_hot(labels, t_nat.shape[-1], dtype=t_nat.dtype)
    return t_nat + scale * onehot * correction[:, None].astype(t_nat.dtype)


def _kl_teacher_linearized(inp: InnerInputs):
    # saad attacks.py:182-185: KLDivLoss(sum)(log_softmax(S(x')), softmax(corrected)), differentiated through the
    # student and through the correction (it depends on x'; attacks.py:167-177 builds it under enable_grad).
    target = linearized_teacher(inp.t_nat, inp.t_grad, inp.delta, inp.labels, inp.hp["lambda_inner"])
    return losses.kl_div(inp.s_adv, target)


INNER = {
    "none": InnerObjective("none", None, frozenset()),
    "ce": InnerObjective("ce", _ce, frozenset()),
    "kl_self": InnerObjective("kl_self", _kl_self, frozenset({"s_nat"})),
    "kl_teacher_nat": InnerObjective("kl_teacher_nat", _kl_teacher_nat, frozenset({"t_nat"})),
    "kl_teacher_adv": InnerObjective("kl_teacher_adv", _kl_teacher_adv, frozenset({"t_iter"})),
    "kl_peer_nat": InnerObjective("kl_peer_nat", _kl_peer_nat, frozenset({"p_nat"})),
    # SAAD: lambda_inner 1 ('--lambda_inner', saad args.py:15; saad.py:56 passes it as `beta`).
    "kl_teacher_linearized": InnerObjective("kl_teacher_linearized", _kl_teacher_linearized,
                                            frozenset({"t_nat", "t_grad"}), {"lambda_inner": 1.0}),
}
