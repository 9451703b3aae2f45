"""The losses of the published training scripts, as each script writes them (reductions, temperatures, RSLAD's
1e-5); `peers.published_steps` composes them into one step per method."""

import math

import torch
import torch.nn.functional as F


def up(t: torch.Tensor) -> torch.Tensor:
    """Logits for a loss: bf16/fp16 upcast to float32, float32 and float64 unchanged."""
    return t.float() if t.dtype in (torch.bfloat16, torch.float16) else t


def kl_none(log_input_logits: torch.Tensor, target_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """`nn.KLDivLoss(reduction='none')(F.log_softmax(s / T), F.softmax(t / T))`: elementwise, shape [B, C]."""
    return F.kl_div(F.log_softmax(up(log_input_logits) / temperature, dim=1),
                    F.softmax(up(target_logits) / temperature, dim=1), reduction="none")


def kl_mean(s, t, temperature: float = 1.0) -> torch.Tensor:
    """`nn.KLDivLoss()` (reduction 'mean'): the elementwise sum over B*C elements."""
    return kl_none(s, t, temperature).mean()


def kl_batchmean(s, t, temperature: float = 1.0) -> torch.Tensor:
    """`(1 / B) * sum(KLDivLoss(reduce=False)(...))` = reduction 'batchmean'."""
    return kl_none(s, t, temperature).sum() / s.shape[0]


def kl_loss_rslad(log_probs: torch.Tensor, probs: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """RSLAD's/MTARD's elementwise `kl_loss(a, b) = -a * b + log(b + 1e-5) * b` (resnet18_rslad_cifar10.py:38-40,
    mtard_resnet18_cifar10.py:51-53); `exact=True`: b * (log b - a), the true KL (ours)."""
    if exact:
        return F.kl_div(log_probs, probs, reduction="none")
    return -log_probs * probs + torch.log(probs + 1e-5) * probs


def ce_mean(logits, labels) -> torch.Tensor:
    """`nn.CrossEntropyLoss()` / `F.cross_entropy`: the batch mean."""
    return F.cross_entropy(up(logits), labels)


def ce_sum(logits, labels) -> torch.Tensor:
    """`F.cross_entropy(..., size_average=False)` (ARD main.py:74) / Madry's `model.xent` (model.py:96): the sum."""
    return F.cross_entropy(up(logits), labels, reduction="sum")


def _unit_residual_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Unit vector of softmax(z) - onehot(y), computed from the wrong-class softmax (no cancellation)."""
    z = up(logits)
    onehot = F.one_hot(labels, z.shape[-1]).to(z.dtype)
    r = torch.softmax(z.masked_fill(onehot > 0, -math.inf), dim=-1)
    return (r - onehot) / torch.sqrt(torch.sum(r * r, dim=-1, keepdim=True) + 1.0)


def trd_loss(s_nat, s_adv, t_nat, t_adv, labels, delta: float = 1.0) -> torch.Tensor:
    """MMARD's triangular relationship loss (Eq. 5-6): batch mean of Huber_delta(psi_s - psi_t), psi_t constant."""
    psi_s = torch.sum(_unit_residual_probs(s_nat, labels) * _unit_residual_probs(s_adv, labels), dim=-1)
    with torch.no_grad():
        psi_t = torch.sum(_unit_residual_probs(t_nat, labels) * _unit_residual_probs(t_adv, labels), dim=-1)
    return F.huber_loss(psi_s, psi_t, reduction="mean", delta=delta)


def iad_trust(guide: torch.Tensor, labels: torch.Tensor, beta: float) -> torch.Tensor:
    """IAD's per-example trust `softmax(guide)[i][y_i] ** beta`, taken with `.item()`: a constant (IAD-I.py:174-178,
    AdaAD main.py:372-376)."""
    p_y = F.softmax(up(guide), dim=1).gather(1, labels[:, None])[:, 0]
    return (p_y ** beta).detach()
