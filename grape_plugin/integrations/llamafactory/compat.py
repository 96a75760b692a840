"""The LLaMA-Factory internals this host relies on, in one place. Checked against llamafactory 0.9.5.

- ``read_args``: LLaMA-Factory's config reader reads ``sys.argv`` only, so the arguments are swapped in.
- ``parse_train_args``: the private ``_parse_train_args`` and the fields ``get_train_args`` sets afterwards that
  loading a model depends on (``get_train_args`` itself refuses several devices outside torchrun).
- ``sft_encoder``: the private ``SupervisedDatasetProcessor._encode_data_example``, LLaMA-Factory's SFT encoding.
- ``torchrun_needed`` / ``torchrun_command``: ``llamafactory.launcher``'s decision and command, with this package
  as the entry of every rank.
- the public loaders the host uses (tokenizer and template, model, converter, dataset list, ``run_exp``), imported
  here when first called, so that the package imports without LLaMA-Factory.
"""

from __future__ import annotations

import copy
import os
import sys
from typing import Any, Callable

from grape_plugin.errors import GrapeError


def read_args(argv: list[str]) -> Any:
    """``config.yaml|json [key=value ...]`` (or ``--key value ...``), read by LLaMA-Factory's own reader."""
    from llamafactory.hparams.parser import read_args as lf_read_args

    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        return lf_read_args()
    except FileNotFoundError as exc:
        raise GrapeError(f"{exc.filename}: config file not found") from None
    finally:
        sys.argv = saved


def parse_train_args(args: Any) -> tuple[Any, Any, Any, Any]:
    """Model, data, training and finetuning arguments, as ``llamafactory-cli train`` parses them."""
    import torch
    from llamafactory.extras.misc import get_current_device
    from llamafactory.hparams.parser import _parse_train_args

    try:
        m, d, t, f, _ = _parse_train_args(copy.deepcopy(args))
    except ValueError as exc:
        raise GrapeError(f"training arguments: {exc}") from None
    if t.bf16 or f.pure_bf16:
        m.compute_dtype = torch.bfloat16
    elif t.fp16:
        m.compute_dtype = torch.float16
    m.device_map = {"": get_current_device()}
    m.model_max_length = d.cutoff_len
    m.block_diag_attn = d.neat_packing
    d.packing = d.packing if d.packing is not None else f.stage == "pt"
    return m, d, t, f


def sft_encoder(template: Any, tokenizer: Any, processor: Any, data_args: Any) -> Callable[..., tuple[list, list]]:
    """``encode(aligned, response)``: (input ids, labels) of one aligned example, as the SFT stage encodes it."""
    from llamafactory.data.processor import SupervisedDatasetProcessor

    proc = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=processor, data_args=data_args)

    def encode(a: Any, response: str) -> tuple[list, list]:
        return proc._encode_data_example(
            list(a["_prompt"]), [{"role": "assistant", "content": response}], a["_system"], a["_tools"],
            a["_images"] or [], a["_videos"] or [], a["_audios"] or [],
        )  # fmt: skip

    return encode


def torchrun_needed() -> bool:
    """Whether ``llamafactory-cli train`` would re-launch itself under torchrun here."""
    from llamafactory.extras.misc import get_device_count, is_env_enabled, use_kt, use_ray

    if "LOCAL_RANK" in os.environ:  # already a torchrun rank
        return False
    forced = is_env_enabled("FORCE_TORCHRUN") or is_env_enabled("USE_MCA")
    return forced or (get_device_count() > 1 and not use_ray() and not use_kt())


def torchrun_command(argv: list[str]) -> tuple[list[str], dict[str, str]]:
    """torchrun with the variables ``llamafactory-cli`` reads (NNODES, NPROC_PER_NODE, MASTER_ADDR, RDZV_ID, ...),
    running this package on every rank, and its environment; arguments stay a list, so values may hold spaces."""
    from llamafactory.extras.misc import find_available_port, get_device_count, is_env_enabled

    env = dict(os.environ)
    nnodes, nproc = env.get("NNODES", "1"), env.get("NPROC_PER_NODE", str(get_device_count()))
    addr, port = env.get("MASTER_ADDR", "127.0.0.1"), env.get("MASTER_PORT") or str(find_available_port())
    cmd = [sys.executable, "-m", "torch.distributed.run"]
    if env.get("RDZV_ID"):
        elastic = env.get("MIN_NNODES") and env.get("MAX_NNODES")
        nodes = f"{env['MIN_NNODES']}:{env['MAX_NNODES']}" if elastic else nnodes
        cmd += ["--nnodes", nodes, "--nproc-per-node", nproc, "--rdzv-id", env["RDZV_ID"], "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"{addr}:{port}", "--max-restarts", env.get("MAX_RESTARTS", "0")]  # fmt: skip
    else:
        cmd += ["--nnodes", nnodes, "--node_rank", env.get("NODE_RANK", "0"), "--nproc_per_node", nproc,
                "--master_addr", addr, "--master_port", port]  # fmt: skip
    if is_env_enabled("OPTIM_TORCH", "1"):
        env.update(PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", TORCH_NCCL_AVOID_RECORD_STREAMS="1")
    return cmd + ["-m", __package__, *argv], env


def load_tokenizer_and_template(model_args: Any, data_args: Any) -> tuple[Any, Any, Any]:
    """The run's tokenizer, processor and chat template (which may add tokens to the tokenizer)."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.model import load_tokenizer

    loaded = load_tokenizer(model_args)
    template = get_template_and_fix_tokenizer(loaded["tokenizer"], data_args)
    return loaded["tokenizer"], loaded["processor"], template


def load_model(tokenizer: Any, model_args: Any, finetuning_args: Any) -> Any:
    """The run's model with its adapters, in eval mode without gradients."""
    from llamafactory.model import load_model as lf_load_model

    return lf_load_model(tokenizer, copy.deepcopy(model_args), finetuning_args, is_trainable=False)


def version() -> str:
    from llamafactory.extras.env import VERSION

    return VERSION


def dataset_converter(attr: Any, data_args: Any) -> Callable[[dict], dict]:
    """LLaMA-Factory's converter of one entry's rows to its aligned form (``_prompt``, ``_response``, ...)."""
    from llamafactory.data.converter import get_dataset_converter

    return get_dataset_converter(attr.formatting, attr, data_args)


def dataset_list(names: list[str], info: dict) -> list[Any]:
    """The ``DatasetAttr`` of each named entry of ``dataset_info.json``."""
    from llamafactory.data.parser import get_dataset_list

    return get_dataset_list(names, info)


def has_tokenized_data(path: str) -> bool:
    from llamafactory.extras.misc import has_tokenized_data as lf_has_tokenized_data

    return lf_has_tokenized_data(path)


def run_exp(args: Any) -> None:
    """Train as ``llamafactory-cli train`` does."""
    from llamafactory.train.tuner import run_exp as lf_run_exp

    lf_run_exp(args)
