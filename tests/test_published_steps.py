"""The 2023-2026 methods' train steps against PyTorch transcriptions of their published scripts
(tests/peers/published_steps.py): ABSLD, SAAD, DGAD and Fair-ARD's plug-in on ARD, IAD, RSLAD and MTARD, with
test_benchmark.py's comparison (`_step_equals_ours`), in a file of their own so that pytest-xdist runs them in
parallel with the twelve original methods'."""

import jax
import pytest

from mmard_jax import train_step
from test_benchmark import LATER_METHODS, _cases, _flip, _step_equals_ours


@pytest.mark.parametrize("method_name,phase", [c for c in _cases() if c.values[0] in LATER_METHODS])
def test_later_method_step_equals_the_published_script(method_name, phase, capsys, monkeypatch):
    """Two train steps of ABSLD, SAAD and DGAD, ours vs the transcription of the published script, as
    test_benchmark.py's `test_torch_step_equals_ours` does for the twelve (losses, parameters, BatchNorm statistics,
    and the method state an epoch boundary makes: ABSLD's temperatures)."""
    monkeypatch.setattr(train_step, "crop_and_flip", _flip)
    with jax.enable_x64(True):
        _step_equals_ours(method_name, phase, capsys)


@pytest.mark.parametrize("method_name,phase", [("ard", "main"), ("iad", "main"), ("rslad", "main"),
                                               ("mtard", "main")])
def test_fair_step_equals_the_published_script(method_name, phase, capsys, monkeypatch):
    """Fair-ARD's plug-in on ARD, IAD, RSLAD and MTARD against transcriptions of Fair-ARD.py, Fair-IAD.py,
    Fair-RSLAD.py and Fair-MTARD.py from non-uniform class weights: the losses, parameters and BatchNorm statistics
    after two steps (MTARD's weight too), the per-class counts of correct attack iterates (Kappa_total) and the
    class weights the epoch boundary makes of them (weight_assign)."""
    monkeypatch.setattr(train_step, "crop_and_flip", _flip)
    with jax.enable_x64(True):
        _step_equals_ours(method_name, phase, capsys, plugins=("fair",), torch_method=f"fair_{method_name}")


@pytest.mark.parametrize("hparams", [{"beta": 0.5, "gamma": 2.0, "lambda_inner": 20.0}])
def test_saad_step_with_its_clean_term_equals_the_published_script(hparams, capsys, monkeypatch):
    """SAAD's options main.sh leaves at their defaults (beta 0 drops the clean term): the clean term, a Renyi order
    other than Shannon's and a larger attack correction, the same on both sides (saad.py:68-82, attacks.py:177)."""
    monkeypatch.setattr(train_step, "crop_and_flip", _flip)
    with jax.enable_x64(True):
        _step_equals_ours("saad", "main", capsys, hparams=hparams)


