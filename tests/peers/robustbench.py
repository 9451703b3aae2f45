"""The one loader of RobustBench's architecture files (`robustbench/model_zoo/architectures/<module>.py`).

`import robustbench` pulls in torchvision, which does not import beside the CPU torch used here, so each file is
executed on its own (docs/design.md, "Teachers and conversion").
"""

import functools
import importlib.util
import pathlib
import sys

from peers import packages


def arch_file(module: str) -> pathlib.Path:
    """Path of `robustbench/model_zoo/architectures/<module>.py` (robustbench itself is not imported)."""
    return packages.package_dir("robustbench") / "model_zoo" / "architectures" / f"{module}.py"


def exec_file(path, name: str):
    """Executes the Python file `path` as a new module `name` (registered in sys.modules, for pickling)."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@functools.cache
def load_arch(module: str):
    """The architecture file `module` as a Python module, executed once per session."""
    return exec_file(arch_file(module), f"_rb_arch_{module}")
