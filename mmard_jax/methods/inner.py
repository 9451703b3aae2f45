"""Inner objectives, keyed by objective: the per-example loss each method's attack maximizes over x'.

Methods that share an objective share its row (SAT, ARD, IAD and MTARD all maximize CE; MMARD, AdaAD and
AdaIAD all maximize KL(S(x'), T(x'))); the start and the BatchNorm mode of the attack belong to the method
(`MethodRow.init`, `MethodRow.student_bn`; config `attack.init`, `attack.student_bn`).
"""

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


INNER = {
    "none": InnerObjective("none", None, frozenset()),
    "ce": InnerObjective("ce", _ce, frozenset()),
    "kl_self": InnerObjective("kl_self", _kl_self, frozenset({"s_nat"})),
    "kl_teacher_nat": InnerObjective("kl_teacher_nat", _kl_teacher_nat, frozenset({"t_nat"})),
    "kl_teacher_adv": InnerObjective("kl_teacher_adv", _kl_teacher_adv, frozenset({"t_iter"})),
    "kl_peer_nat": InnerObjective("kl_peer_nat", _kl_peer_nat, frozenset({"p_nat"})),
}
