"""The plugins a run uses, resolved once when it starts: stages get objects, never names.

Each plugin kind has a protocol (see docs/plugins.md): required members, optional ones with a default, and
optional keyword parameters of its methods. A plugin that lacks a required member is refused with one line naming
the plugin, the member and the protocol; one that lacks an optional member gets its default, and a method without
an optional parameter is called without it, so a plugin written against an older protocol keeps working.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional

from . import plugins
from .config import GrapeConfig
from .errors import GrapeError
from .metrics import Metric, fit_function
from .records import Drops, Group, GroupOutline, Score
from .selection import Selector, choose

HOST_TEMPLATE = "train"  # a host's own tokens and labels: the default template of every host integration


@dataclass(frozen=True)
class Protocol:
    """A plugin kind's members: the required ones, the optional ones with their defaults, and the optional keyword
    parameters of its methods (by method)."""

    name: str
    required: tuple[str, ...]
    optional: Mapping[str, Any]
    keywords: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


SCORER = Protocol("Scorer", ("tokenizer", "identity", "score"),
                  {"context_length": None, "loaded": None, "about": {}, "load": lambda: None, "close": lambda: None},
                  {"score": ("done",)})  # fmt: skip
RENDERER = Protocol("Renderer", ("__call__",), {"key": None, "render_many": None, "cut": None})
FORMAT = Protocol("Format", ("name", "detect", "read_row", "selected"),
                  {"needs": "its columns", "selected_reads_texts": True, "options": frozenset({"source_column"}),
                   "field_options": frozenset(), "prepared": lambda rows, ctx: ctx, "check": lambda ctx, sample: None,
                   "reading": lambda ctx: {}})  # fmt: skip
SELECTOR = Protocol("Selector", ("pick",), {"budget_sign": 1})
METRIC = Protocol("Metric", ("fit",), {"needs": ()})


class Conformed:
    """A plugin object seen through its protocol: the defaults of the members it lacks, its methods that lack an
    optional parameter adapted, and its own members otherwise."""

    def __init__(self, obj: Any, given: Mapping[str, Any]):
        self._obj, self._given = obj, given

    def __getattr__(self, name: str) -> Any:
        if name in self._given:
            return self._given[name]
        return getattr(self._obj, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._obj(*args, **kwargs)


def conform(obj: Any, protocol: Protocol, plugin: str) -> Any:
    """``obj`` when it has every member of ``protocol``; with defaults for missing optional members otherwise; a
    one-line error when a required member is missing."""
    for member in protocol.required:
        if not hasattr(obj, member):
            raise GrapeError(f"plugin '{plugin}': {type(obj).__name__} has no '{member}', which the {protocol.name} "
                             f"protocol requires (docs/plugins.md)")  # fmt: skip
    given = {k: v for k, v in protocol.optional.items() if not hasattr(obj, k)}
    for method, names in protocol.keywords.items():
        lacking = tuple(n for n in names if not takes(getattr(obj, method), n))
        if lacking:
            given[method] = without(getattr(obj, method), lacking)
    return Conformed(obj, given) if given else obj


def takes(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` accepts the keyword argument ``name``."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # no signature to read (a builtin): assume it does
        return True
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def without(fn: Callable[..., Any], names: tuple[str, ...]) -> Callable[..., Any]:
    """``fn`` called without the keyword arguments ``names``."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return fn(*args, **{k: v for k, v in kwargs.items() if k not in names})

    return call


def pick(kind: str, name: str) -> Any:
    """One registered object, or a one-line error listing what is registered."""
    found = plugins.registry(kind)
    if name not in found:
        raise GrapeError(f"no {kind[:-1]} named '{name}'; registered: {', '.join(found) or 'none'}")
    return found[name]


@dataclass(frozen=True)
class Components:
    """What one run uses, resolved from its options (``cfg``) before it reads or scores anything. ``template`` is
    None for a host's own rendering (``template: train``)."""

    cfg: GrapeConfig
    formats: Mapping[str, Any]
    template: Optional[Callable[[Any, GrapeConfig], Any]]
    scorer: Callable[[GrapeConfig], Any]
    selector: Selector
    metric: Metric

    @classmethod
    def of(cls, cfg: GrapeConfig, host_template: bool = False) -> "Components":
        """Resolve every plugin ``cfg`` names (``host_template``: the host renders ``template: train`` itself), and
        refuse a metric that needs per-token values the run will not keep."""
        formats = {name: conform(f, FORMAT, name) for name, f in plugins.registry("formats").items()}
        templates = plugins.registry("renderers")
        own = host_template and cfg.template == HOST_TEMPLATE
        if not own and cfg.template not in templates:
            known = (HOST_TEMPLATE,) * host_template + tuple(templates)
            raise GrapeError(f"template '{cfg.template}' is not one of {', '.join(known)}")
        template = None if own else templates[cfg.template]
        metric = conform(pick("metrics", cfg.metric), METRIC, cfg.metric)
        if metric.needs and not cfg.keep_token_scores:
            raise GrapeError(f"metric '{cfg.metric}' needs per-token {' and '.join(metric.needs)}: "
                             "set keep_token_scores (--keep-token-scores)")  # fmt: skip
        selector = conform(pick("selectors", cfg.strategy), SELECTOR, cfg.strategy)
        return cls(cfg, formats, template, pick("scorers", cfg.scorer), selector, metric)

    @property
    def fit(self) -> Callable[[Score], float]:
        """The run's metric as a function of a score."""
        return fit_function(self.metric, self.cfg.metric, self.cfg)

    def make_scorer(self) -> Any:
        """The configured scorer: its tokenizer and identity now, its weights when first needed."""
        return conform(self.scorer(self.cfg), SCORER, self.cfg.scorer)

    def make_renderer(self, scorer: Any) -> Any:
        """The configured template built on the scorer's tokenizer."""
        return conform(self.template(scorer.tokenizer, self.cfg), RENDERER, self.cfg.template)

    def select(self, groups: Iterable[Group | GroupOutline], scores: Mapping[tuple[str, int], Score]) -> tuple[dict, Drops]:
        """Kept candidate indices per group key, and what was not kept (``selection.choose``)."""
        fit = self.fit
        return choose(groups, {key: fit(score) for key, score in scores.items()}, self.selector, self.cfg)


def select(groups: Iterable[Group | GroupOutline], scores: Mapping[tuple[str, int], Score], cfg: GrapeConfig) -> tuple[dict, Drops]:
    """Select from scores already computed, with the strategy, metric and budget ``cfg`` names."""
    return Components.of(cfg).select(groups, scores)
