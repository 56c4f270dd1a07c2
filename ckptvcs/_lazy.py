"""Deferred imports: torch costs over a second to import, and most commands never need it.

``torch = LazyModule("torch")`` at the top of a module keeps ``torch.Tensor``-style code
unchanged while importing torch only when an attribute is first read: on a commit, a
load or a diff, never for ``log``, ``status`` or ``--help``. ``LazyMapping`` does the same
for a module-level table built from torch (dtype names).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any, TypeVar

__all__ = ["LazyModule", "LazyMapping", "lazy_attributes"]

K = TypeVar("K")
V = TypeVar("V")


class LazyModule:
    """Stands for a module and imports it on first attribute access."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._module: ModuleType | None = None

    def _load(self) -> ModuleType:
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return self._module

    def __getattr__(self, attr: str) -> Any:
        if attr in ("_name", "_module"):  # not set yet (mid-construction or unpickling)
            raise AttributeError(attr)
        value = getattr(self._load(), attr)
        if isinstance(value, (type, ModuleType)):
            # Classes and submodules never change: keep them here so later reads skip this
            # method (a commit reads torch.Tensor thousands of times). Functions and other
            # values are looked up each time (they may be replaced, e.g. by a test).
            object.__setattr__(self, attr, value)
        return value

    def __repr__(self) -> str:
        state = "loaded" if self._module is not None else "not loaded yet"
        return f"<lazy module {self._name!r} ({state})>"


class LazyMapping(Mapping[K, V]):
    """A read-only mapping built by ``build()`` on first use."""

    def __init__(self, build: Callable[[], Mapping[K, V]]) -> None:
        self._build = build
        self._data: Mapping[K, V] | None = None

    def _get(self) -> Mapping[K, V]:
        if self._data is None:
            self._data = dict(self._build())
        return self._data

    def __getitem__(self, key: K) -> V:
        return self._get()[key]

    def __iter__(self) -> Iterator[K]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())

    def __contains__(self, key: object) -> bool:
        return key in self._get()

    def __repr__(self) -> str:
        return repr(self._get())


def lazy_attributes(
    package: str, modules: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """A package's PEP 562 ``__getattr__`` and ``__dir__``: ``name`` is imported from the
    submodule ``modules[name]`` (relative to ``package``) on first use, then cached in the
    package's ``namespace`` (its ``globals()``), so later reads cost nothing."""

    def __getattr__(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(modules))

    return __getattr__, __dir__
