"""GrapeConfig: every knob of a selection run, shared by the CLI, the Python API and the hosts."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import GrapeError


def default_cache_dir() -> Path:
    """``$GRAPE_CACHE_DIR``, else ``$XDG_CACHE_HOME/grape-plugin``, else ``~/.cache/grape-plugin``."""
    if os.environ.get("GRAPE_CACHE_DIR"):
        return Path(os.environ["GRAPE_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "grape-plugin"


class GrapeConfig(BaseModel):
    """How candidates are read, rendered, scored and selected."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # scoring
    model: Optional[str] = Field(None, description="local folder, hub id or .gguf file (default: the embedded SmolLM2)")
    revision: Optional[str] = Field(None, description="hub revision of the model")
    trust_remote_code: bool = Field(False, description="run the model's own code from its folder or the hub")
    template: str = Field("paper", description="paper (Question:/Answer:), chat (the tokenizer's), or a registered one")
    scorer: str = Field("transformers", description="transformers, vllm (grape-plugin[vllm]), or a registered scorer")
    device: str = Field("auto", description="auto (this rank's CUDA device, else the CPU), cpu, cuda, cuda:1, ...")
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: fp32 on CPU, bf16 on CUDA")
    batch_tokens: int = Field(4096, gt=0, description="padded tokens per forward pass")
    max_length: Optional[int] = Field(None, gt=1, description="longest prompt+response in tokens")
    over_length: Literal["drop", "truncate"] = Field("drop", description="what happens to longer sequences")
    keep_token_scores: bool = Field(
        True, description="keep each response token's log-prob and rank in the cache (needed by metrics but mean/sum)"
    )
    # selection
    metric: str = Field(
        "mean", description="a candidate's fit: mean (GRAPE), sum, min_k, drop_first, rsr, or a registered metric"
    )
    min_k_fraction: float = Field(0.2, gt=0, le=1, description="min_k: the fraction of lowest token log-probs averaged")
    rsr_rank_clip: int = Field(100, ge=1, description="rsr: token ranks (1-based) are clipped at this value")
    strategy: str = Field("best", description="best (GRAPE), worst, random, or a registered selector")
    top_k: int = Field(1, ge=1, description="responses kept per instruction")
    seed: int = Field(0, description="seed of the random strategy")
    budget: Optional[int] = Field(None, ge=1, description="keep the N instructions whose kept responses fit best")
    budget_fraction: Optional[float] = Field(None, gt=0, le=1, description="keep this fraction of instructions")
    min_candidates: int = Field(1, ge=1, description="drop instructions with fewer distinct responses")
    # reading
    format: str = Field("auto", description="input shape: auto, long, list, messages, preference, wide, tree, or a "
                                            "registered one")
    split: Optional[str] = Field(None, description="split of a saved dataset folder or DatasetDict (default: train)")
    group_by: str = Field("auto", description="what makes an instruction: auto (an id column whose ids repeat, else "
                                              "the prompt), prompt, or a column name")
    on_bad_row: Literal["error", "skip"] = Field("error", description="a row that cannot be read stops the run, or "
                                                                      "is skipped and counted")
    source_column: Optional[str] = Field(None, description="column naming each response's source (or a list of "
                                                           "them, or a field of candidate objects)")
    response_column: Optional[str] = Field(None, description="column with the response in long rows (or the "
                                                             "field of candidate objects that holds it)")
    candidates_column: Optional[str] = Field(None, description="column with a list of candidate responses")
    prompt_column: Optional[str] = Field(None, description="column with the instruction (a string, a transcript or "
                                                           "a list of messages)")
    context_column: Optional[str] = Field(None, description="column whose text joins the instruction (default: "
                                                            "input or context)")
    system_column: Optional[str] = Field(None, description="column with the system prompt (default: system or "
                                                           "system_prompt)")
    # cache
    cache_dir: Optional[Path] = Field(default_factory=default_cache_dir, description="where scores persist")

    @model_validator(mode="after")
    def _one_budget(self) -> "GrapeConfig":
        if self.budget is not None and self.budget_fraction is not None:
            raise ValueError("set budget or budget_fraction, not both")
        return self

    @classmethod
    def from_mapping(cls, data: dict[str, Any], where: str = "config") -> "GrapeConfig":
        """Validate a mapping (a YAML file, a host's ``grape:`` block) into a config, with a readable error."""
        try:
            return cls(**data)
        except ValidationError as exc:
            raise GrapeError(config_error_message(exc, where)) from None


def config_error_message(exc: ValidationError, where: str) -> str:
    """One line per problem; unknown keys list the expected ones."""
    lines = [f"{where}: invalid GRAPE options"]
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(options)"
        if err["type"] == "extra_forbidden":
            expected = ", ".join(sorted(GrapeConfig.model_fields))
            lines.append(f"  unknown key '{key}'; expected one of: {expected}")
        else:
            lines.append(f"  {key}: {err['msg']}")
    return "\n".join(lines)


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML config file (safe loader) into a mapping; a ``grape:`` block is used when present."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh) or {}
    except FileNotFoundError:
        raise GrapeError(f"{path}: config file not found") from None
    except yaml.YAMLError as exc:
        raise GrapeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise GrapeError(f"{path}: expected a mapping of options, got {type(data).__name__}")
    block = data.get("grape", data)
    if not isinstance(block, dict):
        raise GrapeError(f"{path}: 'grape' must be a mapping of options")
    return block
