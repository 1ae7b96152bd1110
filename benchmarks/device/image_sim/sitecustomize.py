"""Makes this interpreter import only what the device machine's image has, so its CPU side can be tried here.

Put this folder first on ``PYTHONPATH`` (or copy this file into the folder ``run.sh`` installs wheels into): at
start-up Python imports ``sitecustomize`` and every installed distribution missing from ``image_packages.txt``
(beside this folder, or the file ``MOE_DEVICE_IMAGE_PACKAGES`` names) then looks absent, as it is there: its import
raises ``ModuleNotFoundError``, ``importlib.util.find_spec`` returns ``None`` and ``importlib.metadata`` does not
find it (the checks libraries such as transformers make before importing an optional package). The wheels
``wheels.sh`` carries (``MOE_DEVICE_CARRIED``, default ``megatron-core moewatch``) and moe-monitor itself stay.
Versions are not simulated: here the packages keep this machine's versions.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata
import importlib.util
import os
import sys


def _normalise(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _image_packages() -> set[str]:
    here = os.path.dirname(os.path.abspath(__file__))
    default = os.path.join(os.path.dirname(here), "image_packages.txt")
    if not os.path.exists(default):
        default = os.path.join(here, "image_packages.txt")
    path = os.environ.get("MOE_DEVICE_IMAGE_PACKAGES", default)
    with open(path, encoding="utf-8") as file:
        return {_normalise(line.strip()) for line in file if line.strip() and not line.startswith("#")}


_KEPT = _image_packages() | {_normalise(n) for n in os.environ.get("MOE_DEVICE_CARRIED", "megatron-core moewatch")
                             .split()} | {"moe-monitor"}  # fmt: skip
_DISTRIBUTIONS = importlib.metadata.packages_distributions()
_STANDARD = set(sys.builtin_module_names) | set(sys.stdlib_module_names)
BLOCKED_MODULES = {
    top for top, dists in _DISTRIBUTIONS.items()
    if top not in _STANDARD and not any(_normalise(d) in _KEPT for d in dists)
}  # fmt: skip
BLOCKED_DISTRIBUTIONS = {
    _normalise(d) for top in BLOCKED_MODULES for d in _DISTRIBUTIONS[top] if _normalise(d) not in _KEPT
}


def _blocked(name: str) -> bool:
    return name.partition(".")[0] in BLOCKED_MODULES


class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if _blocked(name):
            raise ModuleNotFoundError(f"No module named {name!r} (not in the device image)", name=name)
        return None


_find_spec = importlib.util.find_spec
_version = importlib.metadata.version
_distribution = importlib.metadata.distribution


def find_spec(name, package=None):
    return None if _blocked(name) else _find_spec(name, package)


def version(name):
    if _normalise(name) in BLOCKED_DISTRIBUTIONS:
        raise importlib.metadata.PackageNotFoundError(name)
    return _version(name)


def distribution(name):
    if _normalise(name) in BLOCKED_DISTRIBUTIONS:
        raise importlib.metadata.PackageNotFoundError(name)
    return _distribution(name)


sys.meta_path.insert(0, _Absent())
importlib.util.find_spec = find_spec
importlib.metadata.version = version
importlib.metadata.distribution = distribution
