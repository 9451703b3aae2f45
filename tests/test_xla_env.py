"""The CPU XLA defaults: added only where missing, only for the jaxlib versions that have the flag (XLA aborts on
an unknown flag), only when JAX will run on the CPU, and only by an entry point: `import mmard_jax` leaves
XLA_FLAGS alone."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from mmard_jax import xla_env

REPO = pathlib.Path(__file__).resolve().parent.parent

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
    code = setup + ("import os, mmard_jax, jax; jax.numpy.ones(2).block_until_ready(); "
                    "print(os.environ.get('XLA_FLAGS', ''))")
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


def test_default_mode_reads_the_environment():
    for value, mode in (("", "auto"), ("auto", "auto"), ("1", "on"), ("on", "on"), ("0", "off"), ("OFF", "off"),
                        ("no", "off")):
        assert xla_env.default_mode({xla_env.DEFAULTS_ENV: value}) == mode, value
    assert xla_env.default_mode({}) == "auto"


# Runs an entry point's `run()` with ARGV; at exit (it fails on purpose, after its setup) prints what reached XLA
# and JAX: XLA_FLAGS, the compilation cache directory, and whether a backend had started when the XLA flags were set.
ENTRY = '''
import atexit, importlib, json, os, sys
import jax
from jax._src import xla_bridge
from mmard_jax import xla_env
seen = {}
apply = xla_env.apply_cpu_defaults
def spy(mode=None):
    seen["backend_started"] = xla_bridge.backends_are_initialized()
    return apply(mode)
xla_env.apply_cpu_defaults = spy
atexit.register(lambda: print("OBSERVED " + json.dumps(dict(seen, xla=os.environ.get("XLA_FLAGS", ""),
                                                            cache=jax.config.jax_compilation_cache_dir))))
module, sys.argv = sys.argv[1], sys.argv[1:]
importlib.import_module(module).run()
'''


@pytest.mark.parametrize("module,args,compiles", [
    ("mmard_jax.train", ["--config=configs/demo.py", "--workdir={tmp}/run"], True),  # no teacher: a ConfigError
    ("mmard_jax.evaluate", ["--checkpoint={tmp}", "--dataset=digits"], True),  # no model.json: a CheckpointError
    ("mmard_jax.demo", ["--workdir={tmp}/file"], True),  # a file, not a directory
    ("mmard_jax.interop.export", ["--src={tmp}/missing", "--dst={tmp}/x.pt"], False),
    ("mmard_jax.interop.convert", ["--src={tmp}/missing.pt", "--dst={tmp}/model"], False),
])
def test_entry_point_flags_take_effect_over_the_environment(tmp_path, module, args, compiles):
    """--xla_cpu_defaults and --compilation_cache beat their environment defaults, and the XLA flags are set
    before any JAX backend starts (else XLA would never see them)."""
    (tmp_path / "file").write_text("")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update({"JAX_PLATFORMS": "cpu", xla_env.DEFAULTS_ENV: "0", "MMARD_XLA_CACHE": "off",
                "PYTHONPATH": str(REPO)})
    cache = tmp_path / "xla_cache"
    argv = [a.format(tmp=tmp_path) for a in args] + ["--xla_cpu_defaults=on"]
    argv += [f"--compilation_cache={cache}"] if compiles else []
    proc = subprocess.run([sys.executable, "-c", ENTRY, module, *argv], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]  # the intended one-line user error, after the set-up
    observed = json.loads(proc.stdout.split("OBSERVED ", 1)[1])
    assert observed["backend_started"] is False
    if xla_env._jaxlib_version().startswith(xla_env.JAXLIB_VERSIONS):
        assert FLAG in observed["xla"].split()
    if compiles:
        assert observed["cache"] == str(cache) and cache.is_dir()
