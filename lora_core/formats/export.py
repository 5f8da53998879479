"""Write an in-memory LoRA as a kohya-layout safetensors file that every tool loads.

kohya keys (`lora_unet_..`, `.lora_up.weight`, `.lora_down.weight`, `.alpha`) are read by
ComfyUI, A1111/Forge, kohya sd-scripts and diffusers alike; the metadata carries kohya's
`ss_*` keys, Stability's `modelspec.*` keys and our own `lw.*` keys.

Module names: `names` maps the kohya name of a module to the one the family's own trainers write
(kohya sd-scripts names SD1.x/SDXL modules by their diffusers paths, `lora_unet_down_blocks_0_...`;
the host layer builds that map, lora_core knows no model layouts). Without a map the kohya form of
the name as given is written (`lora_unet_` + the ComfyUI path for DiTs, as kohya and musubi do).

Alphas: every module is written with the same alpha (`file_alpha`), and a module that means another
alpha / rank has that ratio folded into its up factor. ComfyUI, kohya and A1111 read per-module alphas
anyway; diffusers keeps only the most common alpha of a kohya SD file (its alpha_pattern keys come out
in names that match no module), so one alpha for all is the form every reader applies the same way.

Identical inputs give identical bytes (safetensors_io.serialize); `build_metadata` writes no clock
value unless it is given a `date`.
"""
from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping

import torch

from ..errors import LoRAError
from ..version import __version__ as PACK_VERSION
from . import families
from .adapters import LowRankAdapter
from .keymap import candidate_names
from .layouts import LoRA
from .metadata import SCOPE_KEY, TRIGGER_PHRASE_KEY
from .safetensors_io import PICKLE_SUFFIXES, write_lora_file

KOHYA_IMPLEMENTATION = "https://github.com/kohya-ss/sd-scripts"

def kohya_prefix(prefix: str) -> str:
    """The kohya name of a module; a name with no known kohya form is kept as written."""
    return next((n for n in candidate_names(prefix, guess=False) if n.startswith("lora_")), prefix)


def file_alpha(lora: LoRA) -> float:
    """The one alpha a file of this LoRA carries for every module: the most common of its modules'
    alphas (alpha = rank where a module has none), the largest of equally common ones."""
    alphas = [float(a.alpha if a.alpha is not None else a.rank) for a in lora.adapters.values()
              if isinstance(a, LowRankAdapter)]
    if not alphas:
        return 1.0
    counts = Counter(alphas)
    return max(counts, key=lambda a: (counts[a], a))


def lora_state_dict(lora: LoRA, dtype: torch.dtype | None = None,
                    names: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """kohya-keyed tensors of a LoRA whose adapters are all low-rank (dtype: cast, else kept).

    names: kohya name -> the name written (the family's standard naming); names not in it are kept.
    Every module gets alpha = file_alpha(lora); a module meaning another alpha has up scaled by
    its_alpha / file_alpha, so (alpha / rank) * up @ down is unchanged."""
    others = sorted(p for p, a in lora.adapters.items() if not isinstance(a, LowRankAdapter)) + sorted(lora.foreign)
    if others:
        raise LoRAError(f"{lora.name}: cannot write module '{others[0]}' ({len(others)} in all) as kohya LoRA: it "
                        "is not a low-rank (up/down) adapter. Merge it with method 'svd' first to get one.")
    out: dict[str, torch.Tensor] = {}
    written_by: dict[str, str] = {}
    alpha = file_alpha(lora)
    for prefix in sorted(lora.adapters):
        adapter = lora.adapters[prefix]
        name = kohya_prefix(prefix)
        name = names.get(name, name) if names else name
        if name in written_by:
            raise LoRAError(f"{lora.name}: modules '{written_by[name]}' and '{prefix}' both become '{name}' "
                            "in kohya naming; the LoRA names one layer twice.")
        written_by[name] = prefix
        # No alpha means scale 1 to every loader (alpha = rank); a module's own alpha other than the
        # file's is folded into its up factor.
        own = adapter.alpha if adapter.alpha is not None else float(adapter.rank)
        up = adapter.roles["up"]
        if own != alpha:
            up = up.to(torch.float64 if up.dtype == torch.float64 else torch.float32) * (own / alpha)
            up = up.to(adapter.roles["up"].dtype)
        out[f"{name}.lora_up.weight"] = _cast(up, dtype)
        out[f"{name}.lora_down.weight"] = _cast(adapter.roles["down"], dtype)
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
                   trigger_words=(), training: dict | None = None, extra: dict | None = None,
                   date: str | None = None) -> dict[str, str]:
    """kohya ss_*, modelspec.* and lw.* metadata; every value a string, `extra` applied last.
    `date` (ISO 8601) is written as modelspec.date only when given: no clock value otherwise, so the
    same inputs give the same file."""
    words = [w.strip() for w in trigger_words if w and w.strip()]
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(rank)),
        "ss_network_alpha": str(float(alpha)),
        "ss_output_name": title,
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.implementation": KOHYA_IMPLEMENTATION,
        "modelspec.title": title,
        SCOPE_KEY: scope,
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
    if date:
        meta["modelspec.date"] = str(date)
    if words:
        meta[TRIGGER_PHRASE_KEY] = ", ".join(words)
        # Counts fall with position so tools that rank tags by frequency keep the given order.
        meta["ss_tag_frequency"] = json.dumps({title: {w: len(words) - i for i, w in enumerate(words)}})
    for key, value in (training or {}).items():
        meta[key if key.startswith("ss_") else f"ss_{key}"] = _as_str(value)
    for key, value in (extra or {}).items():
        meta[str(key)] = _as_str(value)
    return meta


def save_lora(path: str, lora: LoRA, metadata: dict[str, str], names: Mapping[str, str] | None = None) -> None:
    """Write the LoRA atomically: on any failure the previous file at `path` stays as it was.
    names: the family's standard module names (see lora_state_dict)."""
    if str(path).lower().endswith(PICKLE_SUFFIXES):
        raise LoRAError(f"{path}: LoRAs are written as safetensors only; use a .safetensors name.")
    write_lora_file(str(path), lora_state_dict(lora, names=names), metadata)
