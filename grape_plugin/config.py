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
    model: Optional[str] = Field(None, description="folder, hub id or .gguf file; default: the embedded SmolLM2")
    revision: Optional[str] = None
    trust_remote_code: bool = False
    template: str = Field("paper", description="paper, chat, or a host's own rendering (train)")
    scorer: str = "transformers"
    device: str = "auto"
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    batch_tokens: int = Field(4096, gt=0, description="padded tokens per forward pass")
    max_length: Optional[int] = Field(None, gt=1, description="longest prompt+response in tokens")
    over_length: Literal["drop", "truncate"] = "drop"
    # selection
    strategy: str = "best"
    top_k: int = Field(1, ge=1)
    seed: int = 0
    budget: Optional[int] = Field(None, ge=1, description="keep the N best-fitting instructions")
    budget_fraction: Optional[float] = Field(None, gt=0, le=1)
    min_candidates: int = Field(1, ge=1)
    # reading
    format: str = "auto"
    id_column: Optional[str] = None
    source_column: Optional[str] = None
    response_column: Optional[str] = None
    candidates_column: Optional[str] = None
    # cache
    cache_dir: Optional[Path] = Field(default_factory=default_cache_dir)

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
