"""The LLaMA-Factory internals this host relies on, in one place. Checked against llamafactory 0.9.5.

- ``read_args``: LLaMA-Factory's config reader reads ``sys.argv`` only, so the arguments are swapped in.
- ``parse_train_args``: the private ``_parse_train_args`` and the fields ``get_train_args`` sets afterwards that
  loading a model depends on (``get_train_args`` itself refuses several devices outside torchrun).
- ``sft_encoder``: the private ``SupervisedDatasetProcessor._encode_data_example``, LLaMA-Factory's SFT encoding.
- ``launch``: ``llamafactory.launcher`` itself, with this package's entry for every torchrun rank and the
  selection before an in-process ``run_exp``.
- the public loaders the host uses (tokenizer and template, model, converter, dataset list, ``run_exp``), as they are.

Only the host and the commands import this module, when a LLaMA-Factory command runs.
"""

import copy
import subprocess
import sys
from typing import Any, Callable

import torch
from llamafactory.data import get_template_and_fix_tokenizer as get_template_and_fix_tokenizer
from llamafactory.data.converter import get_dataset_converter as get_dataset_converter
from llamafactory.data.parser import get_dataset_list as get_dataset_list
from llamafactory.data.processor import SupervisedDatasetProcessor
from llamafactory.extras.env import VERSION as VERSION
from llamafactory.extras.misc import get_current_device
from llamafactory.extras.misc import has_tokenized_data as has_tokenized_data
from llamafactory.hparams.parser import _parse_train_args
from llamafactory.hparams.parser import read_args as lf_read_args
from llamafactory.model import load_model as load_model
from llamafactory.model import load_tokenizer as load_tokenizer

from grape_plugin.host import GrapeError

def read_args(argv: list[str]) -> Any:
    """``config.yaml|json [key=value ...]`` (or ``--key value ...``), read by LLaMA-Factory's own reader."""
    saved, sys.argv = sys.argv, [sys.argv[0], *argv]
    try:
        return lf_read_args()
    except FileNotFoundError as exc:
        raise GrapeError(f"{exc.filename}: config file not found") from None
    finally:
        sys.argv = saved


def parse_train_args(args: Any) -> tuple[Any, Any, Any, Any]:
    """Model, data, training and finetuning arguments, as ``llamafactory-cli train`` parses them."""
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
    proc = SupervisedDatasetProcessor(template=template, tokenizer=tokenizer, processor=processor, data_args=data_args)

    def encode(a: Any, response: str) -> tuple[list, list]:
        return proc._encode_data_example(
            list(a["_prompt"]), [{"role": "assistant", "content": response}], a["_system"], a["_tools"],
            a["_images"] or [], a["_videos"] or [], a["_audios"] or [],
        )  # fmt: skip

    return encode


def run_exp(args: Any) -> None:
    """Train as ``llamafactory-cli train`` does (imported when training starts: it loads the trainer stack)."""
    from llamafactory.train.tuner import run_exp as lf_run_exp

    lf_run_exp(args)


def launch(argv: list[str], rank_script: str, prepare: Callable[[Any], Any]) -> int:
    """``llamafactory-cli train argv`` as LLaMA-Factory's launcher runs it: under torchrun where it would (devices,
    ``FORCE_TORCHRUN``, ``NNODES``, ``RDZV_ID``, ...), with its command and environment, but every rank runs
    ``rank_script``; in one process, ``run_exp`` trains with ``prepare(args)``. As with ``llamafactory-cli``, the
    arguments reach torchrun split on spaces. The exit code: a failed rank has said why."""
    from llamafactory import launcher
    from llamafactory.train import tuner

    saved = sys.argv, launcher.__file__, tuner.run_exp
    sys.argv, launcher.__file__ = ["llamafactory-cli", "train", *argv], rank_script
    tuner.run_exp = lambda args=None, callbacks=None: saved[2](prepare(args or lf_read_args()), callbacks)
    try:
        launcher.launch()
    except subprocess.CalledProcessError as exc:
        return exc.returncode
    finally:
        sys.argv, launcher.__file__, tuner.run_exp = saved
    return 0
