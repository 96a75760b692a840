"""The Axolotl internals GRAPE relies on, in one place. Checked against axolotl 0.19.0 (and, by reading its
source, 0.21): the module paths below moved between releases before, so a new release is checked here first."""

from typing import Any

import torch
from axolotl.common.const import DEFAULT_DATASET_PREPARED_PATH as DEFAULT_DATASET_PREPARED_PATH
from axolotl.loaders import ModelLoader
from axolotl.loaders import load_tokenizer as load_tokenizer
from axolotl.utils.data.shared import load_dataset_with_config as load_dataset_with_config
from axolotl.utils.data.wrappers import get_dataset_wrapper as get_dataset_wrapper
from axolotl.utils.dict import DictDefault as DictDefault
from axolotl.utils.distributed import init_distributed_state as init_distributed_state


def load_model(cfg: Any, tokenizer: Any) -> Any:
    """The run's model for scoring (eval mode, no gradients), less what only training needs or can survive.

    Axolotl turns on its LoRA Triton kernels for trainable PEFT models; an inference load (adapter from
    ``lora_model_dir``) is refused by them, and they only speed up the backward pass. Without an accelerator,
    the per-rank ``device_map`` Axolotl sets under torchrun names a device that does not exist: load on the CPU.
    """
    cpu = {} if torch.cuda.is_available() else {"device_map": "cpu"}
    cfg = DictDefault({**cfg, "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False, **cpu})
    model, _ = ModelLoader(cfg, tokenizer, inference=True).load()
    return model.eval().requires_grad_(False)
