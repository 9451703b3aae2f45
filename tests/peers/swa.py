"""PyTorch references of the published SWA BatchNorm passes: PeerAiD's `bn_update` (jaewonalive/PeerAiD @cd12e92
`utils/SWA.py:48-88`, transcribed: reset running mean/var to 0/1, train mode, momentum b / (n + b) before each
batch, the original momenta restored after) and torch's own `torch.optim.swa_utils.update_bn` (SAAD `saad.py:94`)."""

import torch


def peeraid_bn_update(batches, model) -> None:
    """PeerAiD's `bn_update(loader, model)` over an iterable of input tensors (no labels, on the CPU)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    model.train()
    momenta = {}
    for m in bns:
        m.running_mean = torch.zeros_like(m.running_mean)
        m.running_var = torch.ones_like(m.running_var)
        momenta[m] = m.momentum
    n = 0
    with torch.no_grad():  # the original keeps autograd on; the statistics are the same
        for x in batches:
            b = x.size(0)
            for m in bns:
                m.momentum = b / (n + b)
            model(x)
            n += b
    for m in bns:
        m.momentum = momenta[m]


def torch_update_bn(batches, model) -> None:
    """torch.optim.swa_utils.update_bn over an iterable of input tensors (SAAD's pass)."""
    torch.optim.swa_utils.update_bn(list(batches), model)
