"""What a LoRA file says about itself: trigger words, base model, rank, scope, provenance."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

SCOPE_KEY = "lw.scope"  # what the adapter owns; written by export.build_metadata, shown by Load LoRA
TRIGGER_PHRASE_KEY = "modelspec.trigger_phrase"


@dataclass
class LoRAInfo:
    trigger_words: list[str] = field(default_factory=list)
    base_model: str | None = None
    architecture: str | None = None
    network_dim: str | None = None
    network_alpha: str | None = None
    title: str | None = None
    scope: str | None = None
    provenance: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _tag_frequency_triggers(raw: str, limit: int) -> list[str]:
    try:
        freq = json.loads(raw)
    except (TypeError, ValueError):
        return []
    counts: dict[str, int] = {}
    for tags in freq.values() if isinstance(freq, dict) else []:
        if isinstance(tags, dict):
            for tag, n in tags.items():
                counts[tag.strip()] = counts.get(tag.strip(), 0) + int(n)
    return [t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:limit]


def read_info(metadata: dict[str, str], trigger_limit: int = 8) -> LoRAInfo:
    info = LoRAInfo()
    phrase = metadata.get(TRIGGER_PHRASE_KEY)
    if phrase:
        info.trigger_words = [w.strip() for w in phrase.split(",") if w.strip()]
    for t in _tag_frequency_triggers(metadata.get("ss_tag_frequency", ""), trigger_limit):
        if t not in info.trigger_words:
            info.trigger_words.append(t)
    info.trigger_words = info.trigger_words[:trigger_limit]
    info.base_model = metadata.get("ss_base_model_version") or metadata.get("ss_sd_model_name")
    info.architecture = metadata.get("modelspec.architecture")
    info.network_dim = metadata.get("ss_network_dim")
    info.network_alpha = metadata.get("ss_network_alpha")
    info.title = metadata.get("modelspec.title") or metadata.get("ss_output_name")
    info.scope = metadata.get(SCOPE_KEY) or metadata.get("modelspec.description")
    raw = metadata.get("lw.provenance")
    if raw:
        try:
            info.provenance = json.loads(raw)
        except ValueError:
            info.provenance = {"raw": raw}
    return info


def join_trigger_words(word_lists) -> str:
    """The trigger words of several LoRAs (in order) as one prompt fragment: 'a, b, c', each word once
    (the first spelling kept; CLIP reads prompts case-insensitively, so 'Sks' and 'sks' are one word)."""
    seen: set[str] = set()
    out: list[str] = []
    for words in word_lists:
        for word in words:
            word = word.strip()
            if word and word.lower() not in seen:
                seen.add(word.lower())
                out.append(word)
    return ", ".join(out)
