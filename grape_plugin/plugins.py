"""The plugin manager: built-in plugins, then third parties from the ``grape_plugin`` entry-point group."""

from __future__ import annotations

import importlib
from typing import Any

import pluggy

from . import hookspecs

DEFAULT_PLUGINS = (
    "grape_plugin.formats", "grape_plugin.render", "grape_plugin.scoring", "grape_plugin.selection",
    "grape_plugin.metrics",
)  # fmt: skip
KINDS = ("formats", "renderers", "scorers", "selectors", "metrics", "commands")

pm = pluggy.PluginManager("grape_plugin")
pm.add_hookspecs(hookspecs)
_loaded = False


def load_plugins() -> pluggy.PluginManager:
    """Register the default plugins and the installed entry points, once per process."""
    global _loaded
    if not _loaded:
        _loaded = True
        for name in DEFAULT_PLUGINS:
            pm.register(importlib.import_module(name), name=name)
        pm.load_setuptools_entrypoints("grape_plugin")
    return pm


def registry(kind: str) -> dict[str, Any]:
    """Everything registered for ``kind`` (one of ``KINDS``), in registration order; later names win."""
    found: dict[str, Any] = {}

    def register(name: str, obj: Any) -> None:
        found[name] = obj

    # get_hookimpls() is in registration order (pluggy *calls* them in reverse): built-ins first, plugins override
    hook = getattr(load_plugins().hook, f"grape_register_{kind}")
    for impl in hook.get_hookimpls():
        impl.function(register)
    return found

