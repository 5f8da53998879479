"""Write an in-memory LoRA as a kohya-layout safetensors file that every tool loads.

kohya keys (`lora_unet_..`, `.lora_up.weight`, `.lora_down.weight`, `.alpha`) are read by
ComfyUI, A1111/Forge, kohya sd-scripts and diffusers alike; the metadata carries kohya's
`ss_*` keys, Stability's `modelspec.*` keys and our own `lw.*` keys.
"""
from __future__ import annotations

import json
from datetime import datetime, timezone

import torch

from . import families
from .adapters import LowRankAdapter
from .errors import LoRAError
from .formats import LoRA
from .keymap import candidate_names
from .safetensors_io import PICKLE_SUFFIXES, write_lora_file
from .version import __version__ as PACK_VERSION

KOHYA_IMPLEMENTATION = "https://github.com/kohya-ss/sd-scripts"

def kohya_prefix(prefix: str) -> str:
    """The kohya name of a module; a name with no known kohya form is kept as written."""
    return next((n for n in candidate_names(prefix) if n.startswith("lora_")), prefix)


def lora_state_dict(lora: LoRA, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """kohya-keyed tensors of a LoRA whose adapters are all low-rank (dtype: cast, else kept)."""
    others = sorted(p for p, a in lora.adapters.items() if not isinstance(a, LowRankAdapter)) + sorted(lora.foreign)
    if others:
        raise LoRAError(f"{lora.name}: cannot write module '{others[0]}' ({len(others)} in all) as kohya LoRA: it "
                        "is not a low-rank (up/down) adapter. Merge it with method 'svd' first to get one.")
    out: dict[str, torch.Tensor] = {}
    written_by: dict[str, str] = {}
    for prefix in sorted(lora.adapters):
        adapter = lora.adapters[prefix]
        name = kohya_prefix(prefix)
        if name in written_by:
            raise LoRAError(f"{lora.name}: modules '{written_by[name]}' and '{prefix}' both become '{name}' "
                            "in kohya naming; the LoRA names one layer twice.")
        written_by[name] = prefix
        out[f"{name}.lora_up.weight"] = _cast(adapter.roles["up"], dtype)
        out[f"{name}.lora_down.weight"] = _cast(adapter.roles["down"], dtype)
        # No alpha means scale 1 to every loader; alpha == rank keeps that explicit.
        alpha = adapter.alpha if adapter.alpha is not None else float(adapter.rank)
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        if adapter.roles.get("mid") is not None:
            out[f"{name}.lora_mid.weight"] = _cast(adapter.roles["mid"], dtype)
        if adapter.dora_scale is not None:
            out[f"{name}.dora_scale"] = _cast(adapter.dora_scale, dtype)
    return out


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    keep = t.dtype if t.is_floating_point() else torch.float32
    return t.detach().to("cpu", dtype or keep).contiguous()


def _as_str(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def build_metadata(*, title: str, base_family: str, rank: int, alpha: float, scope: str, provenance: dict,
                   trigger_words=(), training: dict | None = None, extra: dict | None = None) -> dict[str, str]:
    """kohya ss_*, modelspec.* and lw.* metadata; every value a string, `extra` applied last."""
    words = [w.strip() for w in trigger_words if w and w.strip()]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": KOHYA_IMPLEMENTATION,
        "modelspec.title": title,
        "modelspec.date": datetime.now(timezone.utc).replace(microsecond=0).isoformat(),
        "lw.scope": scope,
        "lw.provenance": json.dumps(provenance, sort_keys=True),
        "lw.version": PACK_VERSION,
    }
    # A family the registry does not know is written as "unknown", never as another family's name.
    entry = families.family(base_family)
    meta.update({"modelspec.architecture": f"{entry.architecture}/lora", "ss_v2": str(entry.name == families.SD2)})
    if entry.base_model_version:
        meta["ss_base_model_version"] = entry.base_model_version
    if entry.name != families.UNKNOWN:
        meta["modelspec.resolution"] = entry.resolution
    if words:
        meta["modelspec.trigger_phrase"] = ", ".join(words)
        # Counts fall with position so tools that rank tags by frequency keep the given order.
        meta["ss_tag_frequency"] = json.dumps({title: {w: len(words) - i for i, w in enumerate(words)}})
    for key, value in (training or {}).items():
        meta[key if key.startswith("ss_") else f"ss_{key}"] = _as_str(value)
    for key, value in (extra or {}).items():
        meta[str(key)] = _as_str(value)
    return meta


def save_lora(path: str, lora: LoRA, metadata: dict[str, str]) -> None:
    """Write the LoRA atomically: on any failure the previous file at `path` stays as it was."""
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        raise LoRAError(f"{path}: LoRAs are written as safetensors only; use a .safetensors name.")
    write_lora_file(str(path), lora_state_dict(lora), metadata)
