"""The ``grape`` key of a ``dataset_info.json`` entry: validated into a ``GrapeConfig``, with clear errors.

Every entry with the key is read separately (its own id, source and candidates columns), but the entries of
one run are grouped together by prompt, so everything about scoring and selecting must agree between them.
"""

from __future__ import annotations

from typing import Any, Optional

from grape_plugin.config import GrapeConfig
from grape_plugin.errors import GrapeError
from grape_plugin.plugins import registry

HOST_TEMPLATE = "train"
# options that say how one entry's rows are read: they may differ between entries
READING_KEYS = ("id_column", "source_column", "candidates_column")
# options the run itself decides, and where to set them instead
FROM_THE_RUN = {
    "model": "the scoring model is the run's model_name_or_path (with adapter_name_or_path)",
    "revision": "set model_revision in the training config",
    "trust_remote_code": "set trust_remote_code in the training config",
    "dtype": "the run's bf16/fp16/infer_dtype decide the dtype",
    "device": "scoring runs on the run's devices",
    "scorer": "the run's model scores",
    "format": "the entry's formatting and columns say how rows read",
    "response_column": "name the response column under the entry's columns",
}
ALLOWED = tuple(k for k in GrapeConfig.model_fields if k not in FROM_THE_RUN)


def parse_option(raw: Any, where: str, cutoff_len: int) -> Optional[GrapeConfig]:
    """The entry's options (``true`` or ``{}`` for the defaults), or None when the key is absent or false.

    Defaults differ from the CLI's: ``template: train`` (LLaMA-Factory's own tokens and labels) and
    ``max_length: cutoff_len``, so a winner the run would cut is never picked silently.
    """
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise GrapeError(f"{where}: must be an object of GRAPE options (or true), got {type(raw).__name__}")
    for key in raw:
        if key in FROM_THE_RUN:
            raise GrapeError(f"{where}: '{key}' cannot be set here: {FROM_THE_RUN[key]}")
        if key not in ALLOWED:
            raise GrapeError(f"{where}: unknown key '{key}'; expected one of: {', '.join(sorted(ALLOWED))}")
    cfg = GrapeConfig.from_mapping({"template": HOST_TEMPLATE, "max_length": cutoff_len, **raw}, where=where)
    templates = (HOST_TEMPLATE, *registry("renderers"))
    if cfg.template not in templates:
        raise GrapeError(f"{where}: template '{cfg.template}' is not known; expected one of: {', '.join(templates)}")
    if cfg.max_length is not None and cfg.max_length > cutoff_len:
        raise GrapeError(
            f"{where}: max_length {cfg.max_length} exceeds the run's cutoff_len {cutoff_len}; "
            "LLaMA-Factory would truncate longer winners"
        )
    return cfg


def shared_config(options: dict[str, GrapeConfig], where: str) -> GrapeConfig:
    """The options of entries selected together; they may differ only in the reading keys."""
    (first, cfg), *rest = options.items()
    for name, other in rest:
        for key in GrapeConfig.model_fields:
            if key not in READING_KEYS and getattr(other, key) != getattr(cfg, key):
                raise GrapeError(
                    f"{where}: datasets '{first}' and '{name}' are selected together (candidates are grouped by "
                    f"prompt across them) but their grape options differ in '{key}' "
                    f"({getattr(cfg, key)!r} vs {getattr(other, key)!r}); make them equal"
                )
    return cfg
