"""Peer packages of requirements-nodeps.txt: imported on demand, a missing one fails (never skips) its users."""

import importlib
import importlib.util
import pathlib

NODEPS_INSTALL = "pip install --no-deps -r requirements-nodeps.txt"


def require(name: str):
    """The spec of installed package `name`; RuntimeError with the install command when it is missing."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        # A missing peer must fail the suite, not skip it: the comparisons are the point of these tests.
        raise RuntimeError(f"{name} is not installed: {NODEPS_INSTALL}")
    return spec


def import_peer(name: str):
    """Imports a peer package of requirements-nodeps.txt; a missing one fails (never skips) the tests that use it."""
    require(name)
    return importlib.import_module(name)


def package_dir(name: str) -> pathlib.Path:
    """The folder of installed package `name`, without importing it."""
    spec = require(name)
    if not spec.submodule_search_locations:
        raise RuntimeError(f"{name} is installed but is not a package: {NODEPS_INSTALL}")
    return pathlib.Path(list(spec.submodule_search_locations)[0])
