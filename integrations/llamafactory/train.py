"""``grape-plugin llamafactory train|select``: LLaMA-Factory SFT on the GRAPE selection of its datasets.

``train`` takes ``llamafactory-cli train``'s arguments. Every rank reads the run's ``dataset_info.json``; the
entries with a ``grape`` key are read, rendered with the run's template, scored with the run's model (sharded
over the ranks), selected, and written once to ``<cache_dir>/llamafactory/<key>/`` (canonical ShareGPT files,
a ``dataset_info.json`` that keeps every other entry, ``report.json``, ``scores.jsonl``). Then LLaMA-Factory's
own ``run_exp`` trains with ``dataset_dir`` pointing there. The key covers the data, the model, the template
settings and the options, so a rerun loads no scoring model. With several devices (or ``FORCE_TORCHRUN=1``)
the command re-launches itself under torchrun, as ``llamafactory-cli`` does, with this package as the entry.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Optional

import grape_plugin
from grape_plugin.candidates import Drops, finish_groups
from grape_plugin.config import GrapeConfig, default_cache_dir
from grape_plugin.datafiles import safe_filename
from grape_plugin.errors import GrapeError
from grape_plugin.pipeline import Selection, run_groups, write_report

from .data import Entry, entry_files, fit_max_samples, read_entries, write_selection
from .option import HOST_TEMPLATE, parse_option, shared_config

LOG = logging.getLogger("grape_plugin.llamafactory")
DATA_CONFIG = "dataset_info.json"
LAYOUT = 1  # bump when what a selection folder holds changes
UNKEYED_OPTIONS = {"cache_dir", "batch_tokens"}  # where and how fast, not what is selected
# DataArguments that shape a candidate's tokens, or which instructions are read
DATA_KEYS = (
    "template", "cutoff_len", "mask_history", "default_system", "tool_format", "enable_thinking", "max_samples",
)  # fmt: skip


@dataclass
class Plan:
    """A run's parsed arguments and its entries with a ``grape`` option."""

    args: Any  # as llamafactory-cli reads them: a dict (config file + overrides) or a list of --flags
    model_args: Any
    data_args: Any
    training_args: Any
    finetuning_args: Any
    info_path: str
    info: dict[str, Any]
    entries: list[Entry]
    cfg: GrapeConfig

    def key(self) -> str:
        from llamafactory.extras.env import VERSION

        from .render import model_identity

        m, d, t, f = self.model_args, self.data_args, self.training_args, self.finetuning_args
        dtype = f"bf16={t.bf16 or f.pure_bf16},fp16={t.fp16},infer={m.infer_dtype}"
        parts = {
            "layout": LAYOUT,
            "versions": [grape_plugin.__version__, VERSION],
            "model": model_identity(m, f, dtype),
            "entries": [e.identity() for e in self.entries],
            "info": self.info,
            "dirs": [os.path.abspath(d.dataset_dir), os.path.abspath(d.media_dir)],
            "options": self.cfg.model_dump(exclude=UNKEYED_OPTIONS),
            "data": {k: getattr(d, k, None) for k in DATA_KEYS},
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def folder(self) -> Path:
        return Path(self.cfg.cache_dir or default_cache_dir()) / "llamafactory" / self.key()


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


def parse(args: Any) -> tuple[Any, Any, Any, Any]:
    """Model, data, training and finetuning arguments, parsed like ``llamafactory-cli train`` parses them.

    ``get_train_args`` itself is not called: outside torchrun it refuses machines with several devices.
    The fields it sets afterwards that loading a model depends on are set here the same way.
    """
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


def make_plan(args: Any) -> Optional[Plan]:
    """The run's grape entries, validated; None when there are none (the run trains as it would anyway)."""
    from llamafactory.data.parser import get_dataset_list
    from llamafactory.extras.misc import has_tokenized_data

    m, d, t, f = parse(args)
    info_path = os.path.join(d.dataset_dir, DATA_CONFIG)
    if d.dataset_dir == "ONLINE" or d.dataset_dir.startswith("REMOTE:") or not os.path.isfile(info_path):
        return None
    try:
        info = json.loads(Path(info_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GrapeError(f"{info_path}: cannot read it: {exc}") from None
    options = {}
    for name in d.dataset or []:
        where = f"{info_path}: dataset '{name}': grape"
        cfg = parse_option(info[name].get("grape"), where, d.cutoff_len) if isinstance(info.get(name), dict) else None
        if cfg is not None:
            options[name] = cfg
    for name in d.eval_dataset or []:
        if isinstance(info.get(name), dict) and info[name].get("grape"):
            LOG.warning("eval dataset '%s' has a grape option: GRAPE selects training data; it is used as it is", name)
    if not options:
        return None
    if f.stage != "sft":
        raise GrapeError(
            f"{info_path}: GRAPE selects SFT data, but this run's stage is '{f.stage}'; "
            f"use stage: sft or drop the grape option of {', '.join(options)}"
        )
    if d.tokenized_path and has_tokenized_data(d.tokenized_path):
        LOG.warning(
            "tokenized_path %s exists, so LLaMA-Factory trains on it and reads no dataset: GRAPE selection skipped. "
            "Delete it (or choose a new tokenized_path) to train on the selection.",
            d.tokenized_path,
        )
        return None
    cfg = shared_config(options, info_path)
    attrs = get_dataset_list(list(options), info)
    entries = [
        Entry(name, info[name], attr, options[name], entry_files(name, attr, d.dataset_dir, info_path))
        for name, attr in zip(options, attrs)
    ]
    return Plan(args, m, d, t, f, info_path, info, entries, cfg)


def select(plan: Plan) -> Selection:
    """Read, render, score (sharded over the ranks when torch.distributed runs) and select; the scorer is freed."""
    from llamafactory.data import get_template_and_fix_tokenizer
    from llamafactory.model import load_tokenizer

    from .render import load_scorer, train_renderer

    m, d, cfg = plan.model_args, plan.data_args, plan.cfg
    drops = Drops()
    groups = finish_groups(read_entries(plan.entries, d, drops), cfg.min_candidates, drops)
    loaded = load_tokenizer(m)
    tokenizer = loaded["tokenizer"]
    template = get_template_and_fix_tokenizer(tokenizer, d)  # before the model loads: it may add tokens
    renderer = None
    if cfg.template == HOST_TEMPLATE:
        renderer = train_renderer(template, tokenizer, loaded["processor"], d, cfg.over_length, drops)
    scorer = load_scorer(tokenizer, m, plan.finetuning_args, cfg.batch_tokens)
    try:
        selection = run_groups(groups, cfg, drops, scorer=scorer, renderer=renderer, file=plan.info_path)
    finally:
        scorer.close()
    fit_max_samples(selection, d.max_samples)
    return selection


def publish(plan: Plan, selection: Selection, out: Path) -> None:
    """The selected files, their ``dataset_info.json``, the report files and ``summary.txt`` in ``out``."""
    from grape_plugin.report import summary_text

    write_selection(out, plan.info, plan.data_args.dataset_dir, plan.entries, selection)
    write_report(selection, out)
    (out / "summary.txt").write_text(summary_text(selection) + "\n", encoding="utf-8")


def redirect(plan: Plan, folder: Path) -> Any:
    """The run's arguments with ``dataset_dir`` at the selection (``media_dir`` stays the original one)."""
    empty = {e.name for e in plan.entries if (folder / safe_filename(e.name, ".jsonl")).stat().st_size == 0}
    for name in sorted(empty):
        LOG.warning("dataset '%s': no candidate of it was selected; it is left out of the run", name)
    names = [n for n in plan.data_args.dataset if n not in empty]
    if not names:
        raise GrapeError(f"the GRAPE selection kept no row; see {folder / 'report.json'}")
    updates = {
        "dataset_dir": str(folder),
        "media_dir": os.path.abspath(plan.data_args.media_dir),
        "dataset": ",".join(names),
    }
    if isinstance(plan.args, dict):
        return {**plan.args, **updates}
    return [*plan.args, *chain.from_iterable((f"--{k}", v) for k, v in updates.items())]  # argparse: last one wins


def prepare(args: Any) -> Any:
    """On every rank: make sure the selection exists (scoring it together if not), then return redirected args.

    No collective runs inside ``main_process_first``: all ranks score their share, one writer per node (or one
    in all, with ``data_shared_file_system``) publishes atomically, and everyone meets at a barrier.
    """
    from grape_plugin.datafiles import publish_folder
    from grape_plugin.distributed import barrier, on_all_ranks

    plan = make_plan(args)
    if plan is None:
        return args
    t = plan.training_args
    _ = t.device  # under torchrun this starts the process group that LLaMA-Factory's trainer then uses
    folder = plan.folder()
    reused = on_all_ranks((folder / DATA_CONFIG).is_file())
    if not reused:
        selection = select(plan)
        if (t.process_index if plan.data_args.data_shared_file_system else t.local_process_index) == 0:
            publish_folder(folder, lambda staging: publish(plan, selection, staging))
        barrier()
    if t.process_index == 0:
        summary = (folder / "summary.txt").read_text(encoding="utf-8").rstrip()
        LOG.info("GRAPE selection %s %s\n%s", "reused from" if reused else "written to", folder, summary)
    return redirect(plan, folder)


def torchrun_needed() -> bool:
    """Whether ``llamafactory-cli train`` would re-launch itself under torchrun here."""
    from llamafactory.extras.misc import get_device_count, is_env_enabled, use_kt, use_ray

    if "LOCAL_RANK" in os.environ:  # already a torchrun rank
        return False
    forced = is_env_enabled("FORCE_TORCHRUN") or is_env_enabled("USE_MCA")
    return forced or (get_device_count() > 1 and not use_ray() and not use_kt())


def torchrun_command(argv: list[str]) -> list[str]:
    """torchrun with the environment ``llamafactory-cli`` reads (NNODES, NPROC_PER_NODE, MASTER_ADDR, RDZV_ID, ...),
    running this package on every rank; arguments are passed as a list, so values may hold spaces."""
    from llamafactory.extras.misc import find_available_port, get_device_count

    env = os.environ
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
    return cmd + ["-m", __package__, *argv]


def train(argv: list[str]) -> int:
    """``grape-plugin llamafactory train``: select, then train; under torchrun when LLaMA-Factory would use it."""
    from llamafactory.extras.misc import is_env_enabled

    LOG.setLevel(logging.INFO)
    args = read_args(argv)
    if torchrun_needed():
        make_plan(args)  # a bad option fails here, once, before the ranks start
        env = dict(os.environ)
        if is_env_enabled("OPTIM_TORCH", "1"):
            env.update(PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True", TORCH_NCCL_AVOID_RECORD_STREAMS="1")
        return subprocess.run(torchrun_command(argv), env=env).returncode
    return train_rank(args)


def train_rank(args: Any) -> int:
    """One process of the run (the torchrun entry, or the only process)."""
    from llamafactory.train.tuner import run_exp

    LOG.setLevel(logging.INFO)
    run_exp(prepare(args))
    return 0


def select_offline(argv: list[str], out: str) -> str:
    """``grape-plugin llamafactory select``: write the selection to ``out`` for a plain ``llamafactory-cli train``.

    Returns the command that trains on it.
    """
    import yaml

    LOG.setLevel(logging.INFO)
    plan = make_plan(read_args(argv))
    if plan is None:
        raise GrapeError("nothing to select: no dataset of this run has a 'grape' key in its dataset_info.json entry")
    target = Path(out).resolve()
    inputs = [Path(f).resolve() for e in plan.entries for f in e.files]
    if target == Path(plan.data_args.dataset_dir).resolve() or any(p.is_relative_to(target) for p in inputs):
        raise GrapeError(f"-o {out}: holds the run's own data; choose another folder")
    publish(plan, select(plan), target)
    LOG.info("%s", (target / "summary.txt").read_text(encoding="utf-8").rstrip())
    args = redirect(plan, target)
    if isinstance(args, list):
        return "llamafactory-cli train " + " ".join(args)
    (target / "train.yaml").write_text(yaml.safe_dump(args, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return f"llamafactory-cli train {target / 'train.yaml'}"
