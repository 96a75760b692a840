"""pluggy hook specifications. Each hook hands a ``register(name, obj)`` callback; built-ins use them too."""

from __future__ import annotations

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("grape_plugin")
hookimpl = HookimplMarker("grape_plugin")


@hookspec
def grape_register_formats(register):
    """Register input shapes: ``register(name, Format)``."""


@hookspec
def grape_register_renderers(register):
    """Register templates: ``register(name, factory)``, ``factory(tokenizer, cfg) -> render(group, candidate)``."""


@hookspec
def grape_register_scorers(register):
    """Register scorers: ``register(name, factory)``, ``factory(cfg) -> Scorer`` (weights loaded on first use)."""


@hookspec
def grape_register_selectors(register):
    """Register selection strategies: ``register(name, Selector)``."""


@hookspec
def grape_register_metrics(register):
    """Register fit metrics: ``register(name, Metric)``; ``Metric.fit(score, cfg)`` is higher for a better fit."""


@hookspec
def grape_register_commands(register):
    """Register ``grape-plugin`` subcommands: ``register(name, setup)``, ``setup(subparsers)`` adds its argparse
    parser (with ``set_defaults(func=...)``); a host integration's commands come this way."""
