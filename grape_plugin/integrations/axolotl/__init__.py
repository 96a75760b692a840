"""GRAPE for Axolotl: with a ``grape:`` block, the run trains on the GRAPE-selected rows of its ``datasets:``.

    plugins:
      - grape_plugin.integrations.axolotl.GrapePlugin
    grape:
      top_k: 1

See README.md in this folder. Without a ``grape:`` block the plugin does nothing.
"""

from typing import Any

from axolotl.integrations.base import BasePlugin


class GrapePlugin(BasePlugin):
    """Selects in ``load_datasets`` (``axolotl preprocess`` and ``axolotl train``), then lets Axolotl load as usual."""

    def get_input_args(self) -> str:
        return "grape_plugin.integrations.axolotl.args.GrapeArgs"

    def load_datasets(self, cfg: Any, preprocess: bool = False) -> None:
        """Point ``cfg.datasets`` at the selection and return None, so Axolotl's own loader tokenises it."""
        if cfg.get("grape") is not None:
            # torch and Axolotl's loaders: only for a run with a block
            from .host import select_datasets

            select_datasets(cfg)
