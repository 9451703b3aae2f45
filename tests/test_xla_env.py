"""The CPU XLA defaults: added only where missing, only for the jaxlib versions that have the flag (XLA aborts on
an unknown flag), only when JAX will run on the CPU, and only by an entry point: `import mmard_jax` leaves
XLA_FLAGS alone."""

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


def _xla_flags_in_child(env_extra, apply=True):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "MMARD_JAX_XLA_DEFAULTS")}
    env.update(env_extra)
    setup = "from mmard_jax import xla_env; xla_env.apply_cpu_defaults(); " if apply else ""
    code = setup + "import os, mmard_jax, jax; jax.numpy.ones(2).block_until_ready(); print(os.environ.get('XLA_FLAGS', ''))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""


def test_entry_point_sets_flag_import_does_not_and_opt_out(monkeypatch):
    base = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
    assert _xla_flags_in_child(base, apply=False).split() == ["--xla_force_host_platform_device_count=2"]
    if not xla_env._jaxlib_version().startswith(xla_env.JAXLIB_VERSIONS):
        assert _xla_flags_in_child(base) == base["XLA_FLAGS"]
        return
    assert _xla_flags_in_child(base).split() == ["--xla_force_host_platform_device_count=2", FLAG]
    assert _xla_flags_in_child({**base, "MMARD_JAX_XLA_DEFAULTS": "0"}) == base["XLA_FLAGS"]


def test_cpu_only_by_default(monkeypatch):
    """A GPU run (JAX_PLATFORMS names another backend first) does not get the CPU flag unless asked for."""
    monkeypatch.delenv("MMARD_JAX_XLA_DEFAULTS", raising=False)
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not xla_env.cpu_backend_expected()
    assert xla_env.apply_cpu_defaults() == ()
    monkeypatch.setenv("MMARD_JAX_XLA_DEFAULTS", "1")
    expected = (FLAG,) if xla_env._jaxlib_version().startswith(xla_env.JAXLIB_VERSIONS) else ()
    assert xla_env.apply_cpu_defaults() == expected
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert xla_env.cpu_backend_expected()
