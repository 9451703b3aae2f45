"""scripts/profile_ops.py's pieces (mmard_jax.tools.profile_ops and its PyTorch side, peers.torch_profile): every row
is there for an architecture with arguments, and each layer row's two sides compute the same convolution."""

import numpy as np
import pytest

from mmard_jax.tools import profile_ops
from peers import torch_profile


def test_parse_kwargs_reads_integers_and_names_a_bad_item():
    assert profile_ops.parse_kwargs("depth=10,width=1") == {"depth": 10, "width": 1}
    assert profile_ops.parse_kwargs("") == {}
    with pytest.raises(ValueError, match="'width'"):
        profile_ops.parse_kwargs("depth=10,width")


def test_layer_rows_compute_the_same_convolutions_on_both_sides():
    """The forward of each layer row (1x1, 3x3 depthwise in each form, 3x3, the RGB stem) equals PyTorch's on the
    same inputs: the rows time the same work."""
    channels = 12
    inputs = profile_ops.layer_inputs(2, 4, channels)
    assert inputs["xs"].shape == (2, 8, 8, 3) and inputs["w3"].shape == (3, 3, channels, channels)
    torch_rows = torch_profile.torch_layer_pieces(inputs, channels)
    for layer, pieces in profile_ops.jax_layer_pieces(inputs).items():
        for (name, piece), fn in pieces.items():
            if piece == "forward":
                theirs = torch_rows[layer]["forward"]().detach().numpy().transpose(0, 2, 3, 1)
                np.testing.assert_allclose(np.asarray(fn()), theirs, rtol=1e-5, atol=1e-5, err_msg=name)


def test_profile_has_every_row_for_a_wide_resnet():
    """A WRN-10-1 through `profile` (tiny shapes, one timed call): its three network rows and every layer row's three
    pieces, each timed on both sides; the table names the architecture's arguments."""
    kwargs = {"depth": 10, "width": 1}
    rows = profile_ops.profile("wide_resnet", 2, 8, 12, 1, torch_profile.torch_network,
                               torch_profile.torch_layer_pieces, kwargs)
    layers = ("1x1 conv", "3x3 depthwise (library)", "3x3 depthwise (taps, autodiff)",
              "3x3 depthwise (taps, hand-written VJP)", "3x3 conv", "3x3 stem")
    expected = [("wide_resnet", p) for p in profile_ops.NETWORK_PIECES]
    expected += [(layer, p) for layer in layers for p in profile_ops.LAYER_PIECES]
    assert sorted((what, piece) for what, piece, _, _ in rows) == sorted(expected)
    assert all(j > 0 and t > 0 for _, _, j, t in rows)
    table = profile_ops.table(rows, "wide_resnet", 2, 8, 12, 1, kwargs)
    assert "wide_resnet depth=10 width=1, batch 2, 8x8" in table and table.count("\n| ") == len(rows) + 1
