"""Flax variables into a PyTorch peer, and seeded BatchNorm statistics for one (used by tests/ and scripts/).

Both need the same two moves: give a PyTorch module non-trivial BatchNorm statistics (so eval-mode
BatchNorm is really compared), and copy Flax variables into a PyTorch module by the naming rule of
`interop/naming.py`. PyTorch is imported by the caller; nothing here imports it at module level.
"""

from typing import Mapping

import numpy as np

from mmard_jax.interop import naming


def randomize_batch_norm(net, seed: int = 0, linear_bias: bool = False):
    """Seeded random BatchNorm affine parameters and running statistics (and Linear biases if asked),
    in place; returns `net` in eval mode. PyTorch's init leaves them at 1/0/0/1, which hides layout bugs."""
    import torch  # noqa: PLC0415

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_mean.copy_(0.1 * torch.randn(n, generator=gen))
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                m.num_batches_tracked.fill_(123)
            elif linear_bias and isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.copy_(0.1 * torch.randn(m.out_features, generator=gen))
    return net.eval()


def copy_into_torch(variables: Mapping, net):
    """Loads Flax `variables` into the PyTorch module `net` (strict: every key of `net` must be matched by
    the naming rule, with the right shape); returns `net` in eval mode."""
    import torch  # noqa: PLC0415

    state = net.state_dict()
    flat = naming.flatten_variables(variables)
    for path, key in naming.match_variables(variables, state.keys()).items():
        state[key] = torch.from_numpy(np.array(naming.to_torch_layout(np.asarray(flat[path], np.float32)), order="C"))
    net.load_state_dict(state, strict=True)
    return net.eval()
