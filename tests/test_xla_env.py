"""The CPU XLA defaults: added only where missing and only for the jaxlib versions that have the flag
(XLA aborts on an unknown flag), and really in XLA_FLAGS of a process that imports mmard_jax."""

import os
import subprocess
import sys

from mmard_jax import xla_env

FLAG = xla_env.CPU_FLAGS[0]


def test_added_for_known_jaxlib_after_existing_flags():
    assert xla_env.cpu_flags_to_add("--xla_force_host_platform_device_count=2", "0.10.2") == (FLAG,)


def test_user_value_wins():
    name = FLAG.split("=", 1)[0]
    assert xla_env.cpu_flags_to_add(f"{name}=dot", "0.10.2") == ()


def test_unknown_jaxlib_left_alone():
    assert xla_env.cpu_flags_to_add("", "0.11.0") == ()
    assert xla_env.cpu_flags_to_add("", "") == ()


def _xla_flags_in_child(env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MMARD_JAX_XLA_DEFAULTS")}
    env.update(env_extra)
    code = "import os, mmard_jax, jax; jax.numpy.ones(2).block_until_ready(); print(os.environ.get('XLA_FLAGS', ''))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def test_import_sets_flag_and_opt_out(monkeypatch):
    if not xla_env._jaxlib_version().startswith(xla_env.JAXLIB_VERSIONS):
        assert _xla_flags_in_child({}) == ""
        return
    assert _xla_flags_in_child({"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}).split() == [
        "--xla_force_host_platform_device_count=2", FLAG]
    assert _xla_flags_in_child({"MMARD_JAX_XLA_DEFAULTS": "0"}) == ""
