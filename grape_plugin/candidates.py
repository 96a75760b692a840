"""The data model: instructions (groups) with candidate responses, and the ledger of what was dropped."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}


@dataclass
class Candidate:
    """One response to an instruction, with where it came from."""

    response: str
    source: Optional[str]
    row: int  # 0-based row in the input file
    index: int = 0  # position within its group, in input order
    slot: Any = None  # format-specific: list position, "chosen"/"rejected", ...


@dataclass
class Group:
    """One instruction: its prompt as chat messages and its candidate responses."""

    key: str
    prompt: list[Message]
    candidates: list[Candidate] = field(default_factory=list)
    row: int = 0  # first input row of the group


def prompt_key(prompt: list[Message]) -> str:
    """A stable key for a prompt: the same text gives the same key in every run, rank and host."""
    text = json.dumps(prompt, ensure_ascii=False, sort_keys=True)
    return "p:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:20]


class Drops(Counter):
    """Counts of dropped candidates (``candidate:<reason>``) and instructions (``instruction:<reason>``)."""

    def candidate(self, reason: str, n: int = 1) -> None:
        self[f"candidate:{reason}"] += n

    def instruction(self, reason: str, n: int = 1) -> None:
        self[f"instruction:{reason}"] += n


def finish_groups(groups: list[Group], min_candidates: int, drops: Drops) -> list[Group]:
    """Deduplicate identical responses within each group, number candidates, enforce ``min_candidates``."""
    kept = []
    for group in groups:
        seen: set[str] = set()
        unique = []
        for cand in group.candidates:
            if cand.response in seen:
                drops.candidate("duplicate_response")
                continue
            seen.add(cand.response)
            cand.index = len(unique)
            unique.append(cand)
        group.candidates = unique
        if not unique:
            drops.instruction("no_valid_candidate")
        elif len(unique) < min_candidates:
            drops.instruction("too_few_candidates")
            drops.candidate("too_few_candidates", len(unique))
        else:
            kept.append(group)
    return kept
