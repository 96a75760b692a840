"""The ``grape:`` block of an Axolotl config.

Axolotl mixes ``GrapeArgs`` into its own config model, so the field name is the top-level YAML key. The block
is checked like a ``GrapeConfig`` (a typo lists the expected keys) but kept as the user wrote it: the run's
defaults (``template: train``, ``max_length: sequence_len``, the run's model and dtype) are filled in when the
selection runs, see ``host.AxolotlHost``.
"""

from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator

from grape_plugin.host import BaseHost, GrapeError

# Axolotl's words for the options the run decides (grape_plugin.host.HOST_DECIDES), and more
HINTS = {"model": "the scoring model is the run's base_model (with its adapter, quantization and attention settings)",
         "revision": "set revision_of_model", "trust_remote_code": "set trust_remote_code at the top level",
         "dtype": "the run's bf16/fp16/torch_dtype decide it", "split": "set split: on the datasets: entry",
}  # fmt: skip


def check_block(value: Any) -> dict[str, Any] | None:
    """The block as written (``true``: all defaults), once it reads as GRAPE options; None or false: no block."""
    try:
        cfg = BaseHost.options(value, {}, "grape", HINTS)
    except GrapeError as exc:  # pydantic reports ValueErrors as validation errors
        raise ValueError(str(exc)) from None
    return None if cfg is None else {} if value is True else dict(value)


class GrapeArgs(BaseModel):
    """Adds ``grape:`` to Axolotl's config; absent (None) means the plugin does nothing."""

    grape: Annotated[dict[str, Any] | None, BeforeValidator(check_block)] = None
