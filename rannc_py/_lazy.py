"""Attributes of a package loaded on first use, so importing the package stays cheap.

Imports only the standard library: ``rannc_py/__init__.py`` uses it, and
``import rannc_py`` must not load torch or MPI.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_attributes(package: str, names: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A module's ``__getattr__`` and ``__dir__`` for ``names`` (public name -> module defining it).

    The first access imports the defining module and caches the value in
    ``package``'s namespace; an unknown name raises ``AttributeError`` as
    Python's own lookup does.
    """

    def getattr_(name: str) -> Any:
        module = names.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def dir_() -> list[str]:
        return sorted(set(names) | set(vars(sys.modules[package])))

    return getattr_, dir_
