"""The PyTorch side of scripts/profile_ops.py (our side: mmard_jax.tools.profile_ops): the same pieces of the
student network and of MobileNetV2's layer types, PyTorch eager float32, on the same inputs."""

from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn.functional as F

from mmard_jax.tools.profile_ops import LAYER_PIECES, NETWORK_PIECES
from peers.architectures import build_model


def torch_threads() -> int:
    return torch.get_num_threads()


def torch_network(arch: str, x: np.ndarray, labels: np.ndarray,
                  arch_kwargs: Optional[Dict] = None) -> Dict[str, Callable[[], object]]:
    """{piece: callable} of the PyTorch peer (`peers.architectures`), eager float32, NHWC `x` as NCHW."""
    net = build_model(arch, 10, arch_kwargs)
    xt, yt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), torch.from_numpy(labels).long()

    def forward():
        net.eval()
        with torch.no_grad():
            net(xt)

    def input_grad():
        net.eval()
        z = xt.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(net(z), yt), z)
        return grad

    def param_grad():
        net.train()
        net.zero_grad(set_to_none=True)
        F.cross_entropy(net(xt), yt).backward()

    return dict(zip(NETWORK_PIECES, (forward, input_grad, param_grad)))


def torch_layer_pieces(inputs: Dict[str, np.ndarray], channels: int) -> Dict[str, Dict[str, Callable[[], object]]]:
    """{layer: {piece: callable}} for `profile_ops.layer_inputs` (NHWC/HWIO, here NCHW/OIHW): the 1x1 conv, the 3x3
    depthwise conv, the plain 3x3 conv and the RGB stem, loss sum(sin(out)) for the gradients."""
    t = {k: torch.from_numpy(v.transpose((0, 3, 1, 2) if k[0] == "x" else (3, 2, 0, 1)).copy())
         for k, v in inputs.items()}
    torch_fns = {"1x1 conv": (lambda x, w: F.conv2d(x, w), t["x1"], t["w1"]),
                 "3x3 depthwise": (lambda x, w: F.conv2d(x, w, padding=1, groups=channels), t["xd"], t["wd"]),
                 "3x3 conv": (lambda x, w: F.conv2d(x, w, padding=1), t["x3"], t["w3"]),
                 "3x3 stem": (lambda x, w: F.conv2d(x, w, padding=1), t["xs"], t["ws"])}
    out = {}
    for layer, (tfn, tx, tw) in torch_fns.items():

        def tgrad(wrt, f=tfn, a=tx, b=tw):
            a, b = a.clone().requires_grad_(wrt == 0), b.clone().requires_grad_(wrt == 1)
            torch.autograd.grad(torch.sin(f(a, b)).sum(), a if wrt == 0 else b)

        out[layer] = dict(zip(LAYER_PIECES, (lambda f=tfn, a=tx, b=tw: f(a, b), lambda g=tgrad: g(0),
                                             lambda g=tgrad: g(1))))
    return out
