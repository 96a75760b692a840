"""The Axolotl internals GRAPE relies on, in one place. Checked against axolotl 0.19.0 (and, by reading its
source, 0.21): the module paths below moved between releases before, so a new release is checked here first."""

from typing import Any

import torch
from axolotl.datasets import TokenizedPromptDataset
from axolotl.loaders import ModelLoader, load_tokenizer
from axolotl.utils.data.shared import load_dataset_with_config
from axolotl.utils.data.wrappers import get_dataset_wrapper
from axolotl.utils.dict import DictDefault
from axolotl.utils.distributed import init_distributed_state

__all__ = [
    "DictDefault",
    "scoring_cfg",
    "ModelLoader",
    "TokenizedPromptDataset",
    "get_dataset_wrapper",
    "init_distributed_state",
    "load_dataset_with_config",
    "load_tokenizer",
]


def scoring_cfg(cfg: Any) -> Any:
    """The run's config for loading the model to score with, less what only training needs or can survive.

    Axolotl turns on its LoRA Triton kernels for trainable PEFT models; an inference load (adapter from
    ``lora_model_dir``) is refused by them, and they only speed up the backward pass. Without an accelerator,
    the per-rank ``device_map`` Axolotl sets under torchrun names a device that does not exist: load on the CPU.
    """
    overrides: dict[str, Any] = {"lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False}
    if not torch.cuda.is_available():
        overrides["device_map"] = "cpu"
    return DictDefault({**cfg, **overrides})
