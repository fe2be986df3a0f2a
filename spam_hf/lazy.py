"""Public names that load on first use (PEP 562), so importing a package imports none of its heavy modules."""

from __future__ import annotations

import importlib
from typing import Callable, Dict, List, Tuple


def lazy_exports(package: str, public: Dict[str, str],
                 namespace: dict) -> Tuple[Callable[[str], object], Callable[[], List[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``: ``public`` maps each name to the submodule (relative to
    ``package``) that defines it; the first lookup imports it and stores the value in ``namespace`` (the package's
    ``globals()``), so later lookups are plain attribute reads."""
    def __getattr__(name: str):
        if name not in public:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{public[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> List[str]:
        return sorted(list(namespace) + list(public))

    return __getattr__, __dir__
