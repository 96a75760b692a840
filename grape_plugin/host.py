"""The host contract and the one orchestrator every host goes through: the CLI's files, Axolotl, LLaMA-Factory.

A host says where the groups come from, how a candidate is rendered, how the scoring model loads (the way the host
loads the model it trains), what else the selection depends on, and where and in what shape the selection is
written. ``prepare`` owns everything else: the selection key, reusing a selection already on disk, loading the
weights only when something is left to score, the score cache, sharding over ranks, publishing the folder whole and
the barrier after it, and saying which folder the run uses. ``BaseHost`` holds what hosts share: the default scorer
and renderer, the scorer recipe of a host that loads its own model, and the options a host refuses in its GRAPE block.

A host integration imports what it uses of the core from this module (``__all__``), and nothing else of it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Protocol, Sequence

from .components import HOST_TEMPLATE, Components
from .config import GrapeConfig, default_cache_dir
from .datafiles import pick_split, read_dataset, safe_filename
from .errors import GrapeError, input_error
from .formats import ADDED_RESPONSE, Context, Format, Input, detect_format, group_rows
from .outlines import READING
from .pipeline import run_groups
from .records import Candidate, Draft, Group, Grouped, Reason, Selection
from .render import Rendered, Renderer, labelled_span
from .scoring import Scorer
from .version import __version__

__all__ = [  # the core as a host integration sees it
    "ADDED_RESPONSE", "BaseHost", "Candidate", "Components", "Context", "Draft", "Format", "GrapeConfig", "GrapeError",
    "Group", "Input", "Prepared", "Reason", "Rendered", "Renderer", "Scorer", "Selection", "default_cache_dir",
    "detect_format", "input_error", "labelled_span", "output_folder", "pick_split", "prepare", "read_dataset",
    "safe_filename",
]  # fmt: skip
log = logging.getLogger(__name__)

MANIFEST = "selection.json"  # written last: a folder with it holds a whole selection
LAYOUT = 2  # bump when what a selection folder holds changes
PER_INPUT = set(READING) - {"min_candidates"}  # the options grouping reads from each input's own context
UNKEYED_OPTIONS = {"cache_dir", "batch_tokens", "device", "keep_token_scores"}  # where, how fast, what is cached
# options of the run, not of a host's GRAPE block: the scoring model is the model the run trains
HOST_DECIDES = {
    "model": "the scoring model is the model the run trains",
    "revision": "set the model's revision in the run's config",
    "trust_remote_code": "set trust_remote_code in the run's config",
    "dtype": "the run's dtype settings decide it",
    "device": "scoring runs on the run's devices",
    "scorer": "the run's model scores",
}


class Host(Protocol):
    """What a host supplies to ``prepare``. ``where`` names the host's input in messages; ``parts`` are the run's
    components (``components.Components``); ``log`` is where the run hears which selection it trains on."""

    where: str
    parts: Components
    log: logging.Logger

    def scorer(self) -> Scorer:
        """The scoring model as the host loads its training model: tokenizer and identity now, weights on first use."""

    def key_parts(self) -> Mapping[str, Any]:
        """What the selection depends on besides the options and the model: the data, the host's token settings."""

    def read(self) -> Grouped:
        """The candidates, grouped through the core's formats."""

    def renderer(self, scorer: Scorer) -> Renderer:
        """How a candidate becomes token ids and a response span (``template: train``: the host's own labels)."""

    def folder(self, key: str) -> Path:
        """Where the selection with this key lives."""

    def write(self, selection: Selection, folder: Path) -> dict[str, Path]:
        """The kept rows in the host's own shape, into ``folder``; the files written, by name."""

    def is_writer(self) -> bool:
        """Whether this process publishes the folder (one per file system)."""

    def publish(self, folder: Path, fill: Callable[[Path], None]) -> None:
        """Make ``folder`` hold what ``fill`` writes into the folder it is given."""

    def finish(self, selection: Selection) -> Selection:
        """The host's last word on a selection before it is written (its own caps)."""


class BaseHost:
    """Defaults for a host: its ``inputs`` grouped across them and keyed on their rows, the configured scorer and
    template, each input's ``limit`` as a cap on its kept rows, each input's kept rows in a file of its own
    (``kept_parts`` says which the run keeps), rank 0 writes, folders appear whole."""

    where = "input"
    log = logging.getLogger(__name__)  # where a run hears which selection it trains on
    inputs: Sequence[Input] = ()  # one per entry of the host's data (its own reading options in its context)

    def __init__(self, parts: Components):
        self.cfg, self.parts = parts.cfg, parts

    def read(self) -> Grouped:
        return group_rows(self.inputs, self.cfg.min_candidates)

    def key_parts(self) -> Mapping[str, Any]:
        """The inputs' rows (``datasets`` fingerprints: the files and their modification times); a host adds the
        settings of its own that shape a candidate's tokens."""
        return {"rows": [i.rows._fingerprint for i in self.inputs]}

    def scorer(self) -> Scorer:
        return self.parts.make_scorer()

    def renderer(self, scorer: Scorer) -> Renderer:
        """The configured template; ``template: train`` is the host's own (``train_renderer``)."""
        return self.train_renderer(scorer) if self.parts.template is None else self.parts.make_renderer(scorer)

    def train_renderer(self, scorer: Scorer) -> Renderer:
        raise GrapeError(f"{self.where}: template '{HOST_TEMPLATE}' is a host's own rendering; choose another template")

    def finish(self, selection: Selection) -> Selection:
        """An input's ``limit`` caps its kept rows too, by whole instructions (``Reason.OVER_MAX_SAMPLES``), so that the
        host's own cut (LLaMA-Factory's ``max_samples``) never splits one."""
        limits = [i.limit for i in self.inputs]
        return selection if all(n is None for n in limits) else selection.capped(limits, Reason.OVER_MAX_SAMPLES)

    def part_file(self, part: int) -> str:
        """The name of the file ``write`` gives input ``part``'s kept rows."""
        return f"selected_{part}.jsonl"

    def part_rows(self, part: int, picks: list[tuple[Group, Candidate]]) -> Any:
        """Input ``part``'s kept rows as a ``datasets.Dataset``, in its shape (its format's ``selected``)."""
        inp = self.inputs[part]
        return inp.format.selected(inp.rows, picks, inp.context)

    def write(self, selection: Selection, folder: Path) -> dict[str, Path]:
        """``part_rows`` as JSON lines in ``part_file``, for every input that kept any row."""
        by_part: dict[int, list[tuple[Group, Candidate]]] = {}
        for group, cand in selection.picks_in_order(texts=True):
            by_part.setdefault(cand.part, []).append((group, cand))
        files = {}
        for part, kept in sorted(by_part.items()):
            path = folder / self.part_file(part)
            self.part_rows(part, kept).to_json(str(path), lines=True, force_ascii=False)
            files[path.stem] = path
        return files

    def kept_parts(self, folder: Path) -> list[Optional[Path]]:
        """Each input's file in the selection ``folder``; None, with a warning, for an input none of whose candidates
        won: the run leaves it out."""
        files = (folder / self.part_file(part) for part in range(len(self.inputs)))
        paths = [path if path.is_file() else None for path in files]
        for inp, path in zip(self.inputs, paths):
            if path is None:
                self.log.warning("%s: no candidate of it was selected; it is left out of the run", inp.context.file)
        return paths

    def is_writer(self) -> bool:
        from .distributed import rank_world

        return rank_world()[0] == 0

    def publish(self, folder: Path, fill: Callable[[Path], None]) -> None:
        from .datafiles import publish_folder

        publish_folder(folder, fill)

    def model_scorer(self, host: str, tokenizer: Any, weights: Sequence[tuple[str, Optional[str]]],
                     settings: Mapping[str, Any], load: Callable[[], Any]) -> Scorer:  # fmt: skip
        """The scorer of a host that loads the model itself: ``weights`` are (path or hub id, revision), the base
        model first, then adapters; ``settings`` are the host's options that change the loaded model."""
        from .models import ModelSpec, weights_identity
        from .scoring import configured

        (name, revision), names = weights[0], [weights_identity(n, r) for n, r in weights]
        identity = "|".join([host, *names, json.dumps({k: str(v) for k, v in settings.items()}, sort_keys=True)])
        about = {"name": name, "revision": revision, "adapters": [n for n, _ in weights[1:]] or None,
                 "dtype": str(settings.get("dtype", self.cfg.dtype))}  # fmt: skip
        return configured(ModelSpec(name, tokenizer, identity, load, None, about), self.cfg)

    @staticmethod
    def options(block: Any, defaults: Mapping[str, Any], where: str, hints: Mapping[str, str],
                limit: Optional[tuple[str, Optional[int]]] = None) -> Optional[GrapeConfig]:  # fmt: skip
        """A host's GRAPE block (a mapping, or ``True``/``{}`` for the defaults) over the run's ``defaults``; None
        when there is no block (``None`` or ``False``).

        The keys of ``HOST_DECIDES`` and ``hints`` are refused with the host's hint (where to set it instead, the
        host's words over the defaults); the template is ``train`` or a registered one, and every named plugin exists.
        ``limit`` is the run's own length setting (name, value): a larger ``max_length`` is refused, since the run
        would cut the longer winners it lets in.
        """
        if block is None or block is False:
            return None
        block = {} if block is True else block
        if not isinstance(block, dict):
            raise GrapeError(f"{where}: must be an object of GRAPE options (or true), got {type(block).__name__}")
        refused = {**HOST_DECIDES, **hints}
        for key in block:
            if key in refused:
                raise GrapeError(f"{where}: '{key}' cannot be set here: {refused[key]}")
            if key not in GrapeConfig.model_fields:
                allowed = ", ".join(sorted(k for k in GrapeConfig.model_fields if k not in refused))
                raise GrapeError(f"{where}: unknown key '{key}'; expected one of: {allowed}")
        cfg = GrapeConfig.from_mapping({"template": HOST_TEMPLATE, **defaults, **block}, where=where)
        try:
            Components.of(cfg, host_template=True)
        except GrapeError as exc:
            raise GrapeError(f"{where}: {exc}") from None
        name, most = limit or ("", None)
        if most is not None and cfg.max_length is not None and cfg.max_length > most:
            raise GrapeError(f"{where}: max_length {cfg.max_length} exceeds the run's {name} {most}; the run would cut "
                             f"longer winners (lower max_length, or raise {name})")  # fmt: skip
        return cfg

    @staticmethod
    def shared_options(options: Mapping[str, GrapeConfig], where: str) -> GrapeConfig:
        """The one set of options of datasets selected together (grouped by prompt across them): theirs, which may
        differ only in how each dataset reads (its ``Context``'s options: ``PER_INPUT``)."""
        (first, cfg), *rest = options.items()
        shared = [key for key in GrapeConfig.model_fields if key not in PER_INPUT]
        for name, other in rest:
            for key in (k for k in shared if getattr(other, k) != getattr(cfg, k)):
                raise GrapeError(f"{where}: datasets '{first}' and '{name}' are selected together (candidates are "
                                 f"grouped by prompt across them) but their GRAPE options differ in '{key}' "
                                 f"({getattr(cfg, key)!r} vs {getattr(other, key)!r}); make them equal")  # fmt: skip
        return cfg


@dataclass(frozen=True)
class Prepared:
    """A selection folder on disk, whether it was reused, and its manifest (key, summary, report and what the key
    covers)."""

    folder: Path
    reused: bool
    manifest: Mapping[str, Any]


def key_inputs(cfg: GrapeConfig, identity: str, parts: Mapping[str, Any]) -> dict[str, Any]:
    """Everything the selection depends on: options, model identity, the host's data and settings."""
    payload = {
        "layout": LAYOUT,
        "grape_plugin": __version__,
        "options": cfg.model_dump(mode="json", exclude=UNKEYED_OPTIONS),
        "model": identity,
        "host": parts,
    }
    return json.loads(json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str))


def selection_key(inputs: Mapping[str, Any]) -> str:
    """A short hash of ``key_inputs``: it changes whenever the selection could."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def read_manifest(folder: Path) -> dict[str, Any]:
    """The manifest of the selection in ``folder``, or {} when there is none (or it cannot be read)."""
    try:
        return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def select_from(host: Host, scorer: Optional[Scorer] = None, token_scores: bool = False) -> Selection:
    """On every rank: read, render, score and select the host's candidates (``pipeline.run_groups``), with the
    host's last word; the scorer is closed afterwards, before the host loads the model it trains."""
    scorer = scorer or host.scorer()
    try:
        selection = run_groups(host.read(), host.parts, scorer=scorer, renderer=host.renderer(scorer),
                               file=host.where, token_scores=token_scores)  # fmt: skip
        return host.finish(selection)
    finally:
        scorer.close()


def write_folder(host: Host, selection: Selection, folder: Path) -> dict[str, Path]:
    """The selection in the host's shape and the report files (``output.write_report``): the one place a selection
    folder is filled."""
    from .output import write_report

    folder.mkdir(parents=True, exist_ok=True)
    return {**host.write(selection, folder), **write_report(selection, folder)}


def prepare(host: Host) -> Prepared:
    """On every rank: make sure the host's selection exists, selecting it together if it does not."""
    from .distributed import on_all_ranks

    scorer = host.scorer()
    inputs = key_inputs(host.parts.cfg, scorer.identity, host.key_parts())
    key = selection_key(inputs)
    folder = host.folder(key)
    done = read_manifest(folder)
    if on_all_ranks(done.get("key") == key):
        prepared = Prepared(folder, True, done)
    else:
        prepared = Prepared(folder, False, select_into(host, scorer, folder, key, inputs))
    if host.is_writer():
        host.log.info("GRAPE selection %s %s\n%s", "reused from" if prepared.reused else "written to", folder,
                      prepared.manifest["summary"])  # fmt: skip
    return prepared


def select_into(host: Host, scorer: Scorer, folder: Path, key: str, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """On every rank: select, then publish ``folder`` (on the writers) with its manifest, which is returned: the
    ``key``, the summary and report, and the ``inputs`` the key covers."""
    from .distributed import barrier
    from .report import summary, summary_text

    host.log.info("GRAPE: selecting with %s (template %s) into %s", scorer.identity, host.parts.cfg.template, folder)
    selection = select_from(host, scorer)
    if not selection.kept:
        raise GrapeError(f"{host.where}: nothing was selected\n{summary_text(selection)}")
    info = {"key": key, "summary": summary_text(selection), "report": summary(selection), "inputs": inputs}

    def fill(staging: Path) -> None:
        write_folder(host, selection, staging)
        (staging / MANIFEST).write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    if host.is_writer():
        host.publish(folder, fill)
    barrier()
    return info


def output_folder(out: str | Path, sources: Iterable[Path]) -> Path:
    """``-o OUT``, refused when it holds any of the input files ``sources`` or is a file."""
    folder = Path(out).resolve()
    for source in (s.resolve() for s in sources):
        if source.is_relative_to(folder):
            raise GrapeError(f"-o {out}: the output folder holds the input {source}; choose another folder")
    if folder.exists() and not folder.is_dir():
        raise GrapeError(f"-o {out}: exists and is not a folder")
    return folder
