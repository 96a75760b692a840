"""``grape-plugin llamafactory train|select``: LLaMA-Factory SFT on the GRAPE selection of its datasets.

``train`` takes ``llamafactory-cli train``'s arguments. Every rank reads the run's arguments and
``dataset_info.json``; the entries with a ``grape`` key make a ``LlamaFactoryHost``, and the core's ``prepare``
selects from them (scoring sharded over the ranks) into ``<cache_dir>/llamafactory/<key>/``, or reuses that folder.
Then LLaMA-Factory's own ``run_exp`` trains with ``dataset_dir`` pointing there. With several devices (or
``FORCE_TORCHRUN=1``) the command re-launches itself under torchrun, as ``llamafactory-cli`` does.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from itertools import chain
from pathlib import Path
from typing import Any, Optional

from grape_plugin.datafiles import safe_filename
from grape_plugin.errors import GrapeError
from grape_plugin.host import Prepared
from grape_plugin.host import prepare as prepare_selection

from .compat import dataset_list, has_tokenized_data, parse_train_args, read_args, run_exp, torchrun_command, torchrun_needed
from .host import DATA_CONFIG, Entry, LlamaFactoryHost, entry_config, shared_config

LOG = logging.getLogger("grape_plugin.llamafactory")


def entry_files(name: str, attr: Any, dataset_dir: str, where: str) -> list[str]:
    """The data files of a local entry, listed as LLaMA-Factory lists them (a file, or a folder's files)."""
    if attr.load_from != "file":
        raise GrapeError(f"{where}: dataset '{name}' loads from {attr.load_from}; GRAPE selection reads local files "
                         "only (download it and point file_name at it)")  # fmt: skip
    path = os.path.abspath(os.path.join(dataset_dir, attr.dataset_name))
    if os.path.isdir(path):
        return [os.path.join(path, f) for f in os.listdir(path)]
    if not os.path.isfile(path):
        raise GrapeError(f"{where}: dataset '{name}': file_name {attr.dataset_name}: no such file in {dataset_dir}")
    return [path]


def make_plan(args: Any) -> Optional[LlamaFactoryHost]:
    """The run's grape entries as a host, validated; None when there are none (the run trains as it would anyway)."""
    m, d, t, f = parse_train_args(args)
    info_path = os.path.join(d.dataset_dir, DATA_CONFIG)
    if d.dataset_dir == "ONLINE" or d.dataset_dir.startswith("REMOTE:") or not os.path.isfile(info_path):
        return None
    try:
        info = json.loads(Path(info_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise GrapeError(f"{info_path}: cannot read it: {exc}") from None
    options = {}
    for name in d.dataset or []:
        if isinstance(info.get(name), dict):
            cfg = entry_config(info[name].get("grape"), f"{info_path}: dataset '{name}': grape", d.cutoff_len)
            options.update({name: cfg} if cfg else {})
    for name in d.eval_dataset or []:
        if isinstance(info.get(name), dict) and info[name].get("grape"):
            LOG.warning("eval dataset '%s' has a grape option: GRAPE selects training data; it is used as it is", name)
    if not options:
        return None
    if f.stage != "sft":
        raise GrapeError(f"{info_path}: GRAPE selects SFT data, but this run's stage is '{f.stage}'; "
                         f"use stage: sft or drop the grape option of {', '.join(options)}")  # fmt: skip
    if d.tokenized_path and has_tokenized_data(d.tokenized_path):
        LOG.warning("tokenized_path %s exists, so LLaMA-Factory trains on it and reads no dataset: GRAPE selection "
                    "skipped. Delete it (or choose a new tokenized_path) to train on the selection.", d.tokenized_path)
        return None
    cfg = shared_config(options, info_path)
    attrs = dataset_list(list(options), info)
    entries = [Entry(name, info[name], attr, options[name], entry_files(name, attr, d.dataset_dir, info_path))
               for name, attr in zip(options, attrs)]  # fmt: skip
    return LlamaFactoryHost(args, (m, d, t, f), info_path, info, entries, cfg)


def redirect(host: LlamaFactoryHost, folder: Path) -> Any:
    """The run's arguments with ``dataset_dir`` at the selection (``media_dir`` stays the original one)."""
    empty = {e.name for e in host.entries if (folder / safe_filename(e.name, ".jsonl")).stat().st_size == 0}
    for name in sorted(empty):
        LOG.warning("dataset '%s': no candidate of it was selected; it is left out of the run", name)
    updates = {
        "dataset_dir": str(folder),
        "media_dir": os.path.abspath(host.data_args.media_dir),
        "dataset": ",".join(n for n in host.data_args.dataset if n not in empty),
    }
    if isinstance(host.args, dict):
        return {**host.args, **updates}
    return [*host.args, *chain.from_iterable((f"--{k}", v) for k, v in updates.items())]  # argparse: last one wins


def log_selection(prepared: Prepared) -> None:
    LOG.info("GRAPE selection %s %s\n%s", "reused from" if prepared.reused else "written to", prepared.folder,
             prepared.manifest["summary"])  # fmt: skip


def prepare(args: Any) -> Any:
    """On every rank: make sure the selection exists (scoring it together if not), then return redirected args."""
    host = make_plan(args)
    if host is None:
        return args
    _ = host.training_args.device  # under torchrun this starts the process group LLaMA-Factory's trainer then uses
    prepared = prepare_selection(host)
    if host.training_args.process_index == 0:
        log_selection(prepared)
    return redirect(host, prepared.folder)


def train(argv: list[str]) -> int:
    """``grape-plugin llamafactory train``: select, then train; under torchrun when LLaMA-Factory would use it."""
    LOG.setLevel(logging.INFO)
    args = read_args(argv)
    if torchrun_needed():
        make_plan(args)  # a bad option fails here, once, before the ranks start
        command, env = torchrun_command(argv)
        return subprocess.run(command, env=env).returncode
    return train_rank(args)


def train_rank(args: Any) -> int:
    """One process of the run (the torchrun entry, or the only process)."""
    LOG.setLevel(logging.INFO)
    run_exp(prepare(args))
    return 0


def select_offline(argv: list[str], out: str) -> str:
    """``grape-plugin llamafactory select``: the selection (from the cache, or selected now) copied to ``out``
    for a plain ``llamafactory-cli train``. Returns the command that trains on it."""
    import shutil

    import yaml

    LOG.setLevel(logging.INFO)
    host = make_plan(read_args(argv))
    if host is None:
        raise GrapeError("nothing to select: no dataset of this run has a 'grape' key in its dataset_info.json entry")
    target = Path(out).resolve()
    inputs = [Path(f).resolve() for e in host.entries for f in e.files]
    if target == Path(host.data_args.dataset_dir).resolve() or any(p.is_relative_to(target) for p in inputs):
        raise GrapeError(f"-o {out}: holds the run's own data; choose another folder")
    prepared = prepare_selection(host)
    shutil.copytree(prepared.folder, target, dirs_exist_ok=True)
    log_selection(prepared)
    args = redirect(host, target)
    if isinstance(args, list):
        return "llamafactory-cli train " + " ".join(args)
    (target / "train.yaml").write_text(yaml.safe_dump(args, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return f"llamafactory-cli train {target / 'train.yaml'}"
