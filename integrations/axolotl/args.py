"""The ``grape:`` block of an Axolotl config.

Axolotl mixes ``GrapeArgs`` into its own config model, so the field name is the top-level YAML key. The block
is checked against ``GrapeConfig`` (a typo lists the expected keys) but kept as the user wrote it: the host's
defaults (``template: train``, ``max_length: sequence_len``, the run's model, dtype and device) are filled in
when the selection runs, see ``prepare.grape_config``.
"""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel, field_validator

from grape_plugin.config import GrapeConfig
from grape_plugin.errors import GrapeError
from grape_plugin.plugins import registry

HOST_TEMPLATE = "train"


class GrapeArgs(BaseModel):
    """Adds ``grape:`` to Axolotl's config; absent (None) means the plugin does nothing."""

    grape: Optional[dict[str, Any]] = None

    @field_validator("grape", mode="before")
    @classmethod
    def _check_block(cls, value: Any) -> Optional[dict[str, Any]]:
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError(f"grape: must be a mapping of options, got {type(value).__name__}")
        try:
            GrapeConfig.from_mapping(dict(value), where="grape")
        except GrapeError as exc:  # pydantic reports ValueErrors as validation errors
            raise ValueError(str(exc)) from None
        templates = [HOST_TEMPLATE, *registry("renderers")]
        if value.get("template", HOST_TEMPLATE) not in templates:
            raise ValueError(f"grape: template {value['template']!r} is not one of {', '.join(templates)}")
        return dict(value)
