"""Packages whose public names load on first use: importing one module of a package does not import its siblings.

A package's ``__init__`` maps each public name to the module that defines it and calls :func:`lazy_names`;
``from gere_hf.continual import Recipe`` then imports ``gere_hf.continual.recipe`` alone, and ``gere-hf inspect``
does not pay for trl and the Trainer stack. This module imports nothing of gere_hf.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping


def lazy_names(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for the package ``package`` whose public names are ``{name: ".module"}``."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(names[name], package), name)
            namespace[name] = value
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(names))

    return __getattr__, __dir__
