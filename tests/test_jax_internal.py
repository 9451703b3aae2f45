"""jax_internal: the private JAX API this project reads works on the installed JAX, and a moved one is a
RuntimeError naming what moved and the JAX version it was checked against (not an AttributeError elsewhere)."""

import pytest
from jax._src import distributed as jax_distributed

from mmard_jax import jax_internal


def test_accessors_read_jax_state_before_joining():
    assert jax_internal.coordination_client() is None  # single process: jax.distributed never initialized
    assert jax_internal.coordinator_address() is None


def test_cluster_address_as_jax_derives_it(monkeypatch):
    for k, v in {"SLURM_JOB_ID": "4103", "SLURM_STEP_NODELIST": "gpu[017-018]", "SLURM_NTASKS": "2",
                 "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("JAX_COORDINATOR_PORT", "1234")
    assert jax_internal.cluster_coordinator_address("SLURM") == "gpu017:1234"


def test_moved_private_api_names_itself_and_the_checked_version(monkeypatch):
    monkeypatch.delattr(jax_distributed, "global_state")
    with pytest.raises(RuntimeError, match=r"global_state is not where .* \(checked against jax 0\.10\.2\)"):
        jax_internal.coordination_client()
    monkeypatch.undo()
    monkeypatch.setattr(jax_distributed, "global_state", object())
    with pytest.raises(RuntimeError, match=r"global_state\.coordinator_address is not where"):
        jax_internal.coordinator_address()
