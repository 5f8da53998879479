"""Turn a LoRA file's flat key list into per-module adapters, whatever layout wrote it.

Layouts read: kohya (`lora_up/lora_down/alpha`, LoCon `lora_mid`), diffusers/PEFT
(`lora_A/lora_B`, `.lora.up/.down`, `_lora.up/.down`, `lora_linear_layer`, `.default`),
DoRA `dora_scale`, LoHa (`hada_*`) and LoKr (`lokr_*`). Modules using other algorithms
(GLoRA, OFT, BOFT, full diffs) are kept as `foreign` so the host can hand them to ComfyUI.
diffusers/PEFT files keep their alphas in the `lora_adapter_metadata` header entry (peft_config.py):
a module without an `.alpha` tensor gets the alpha diffusers would use, and every module records
where its alpha came from (`LoRA.alpha_sources`).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from ..errors import LoRAShapeError
from . import peft_config
from .adapters import Adapter, claim_adapter

# (key suffix, role), longest first so that ".lora_A.default.weight" wins over ".weight" forms.
ROLE_SUFFIXES: list[tuple[str, str]] = sorted([
    (".lora_up.weight", "up"), (".lora_down.weight", "down"), (".lora_mid.weight", "mid"),
    ("_lora.up.weight", "up"), ("_lora.down.weight", "down"),
    (".lora_B.weight", "up"), (".lora_A.weight", "down"),
    (".lora_B.default.weight", "up"), (".lora_A.default.weight", "down"),
    (".lora.up.weight", "up"), (".lora.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
    (".lora_B", "up"), (".lora_A", "down"),
    (".alpha", "alpha"), (".dora_scale", "dora_scale"),
    (".hada_w1_a", "hada_w1_a"), (".hada_w1_b", "hada_w1_b"), (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"), (".hada_t1", "hada_t1"), (".hada_t2", "hada_t2"),
    (".lokr_w1", "lokr_w1"), (".lokr_w2", "lokr_w2"), (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"), (".lokr_w2_a", "lokr_w2_a"), (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_t2", "lokr_t2"),
], key=lambda s: -len(s[0]))

# Suffixes of algorithms ComfyUI core implements and we pass through to it.
FOREIGN_SUFFIXES = (".diff", ".diff_b", ".w_norm", ".b_norm", ".set_weight", ".reshape_weight",
                    ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".oft_blocks", ".oft_diag",
                    ".rescale")


def split_key(key: str) -> tuple[str, str] | None:
    """'lora_unet_x.lora_up.weight' -> ('lora_unet_x', 'up'); None when no known suffix."""
    for suffix, role in ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


@dataclass
class LoRA:
    """A parsed LoRA: adapters per module prefix as written in the file, plus what it says of itself."""

    name: str
    adapters: dict[str, Adapter]
    metadata: dict[str, str] = field(default_factory=dict)
    foreign: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    unrecognised: list[str] = field(default_factory=list)
    source_path: str | None = None
    sha256: str | None = None
    alpha_sources: dict[str, str] = field(default_factory=dict)  # module -> where its alpha came from
    # Memos of results that hold this LoRA (its matches on live models): kept here, they go with the LoRA;
    # kept anywhere else, they would keep it alive. lora_core/caches.py lists them.
    memos: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def ranks(self) -> list[int]:
        return sorted({a.rank for a in self.adapters.values() if a.rank is not None})

    @property
    def alphas(self) -> list[float]:
        return sorted({a.alpha for a in self.adapters.values() if a.alpha is not None})

    def alpha_summary(self) -> list[str]:
        """'8 from lora_adapter_metadata lora_alpha (40 modules)', one line per (alpha, source)."""
        counts: dict[tuple, int] = {}
        for prefix, source in self.alpha_sources.items():
            alpha = self.adapters[prefix].alpha if prefix in self.adapters else None
            counts[(alpha, source)] = counts.get((alpha, source), 0) + 1
        lines = []
        for (alpha, source), n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0][1], kv[0][0] or 0.0)):
            value = "-" if alpha is None or source.startswith(peft_config.NO_ALPHA) else f"{alpha:g}"
            lines.append(f"{value} from {source} ({n} module{'s' if n != 1 else ''})")
        return lines

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for a in self.adapters.values():
            kind = a.name + a.variant.suffix
            counts[kind] = counts.get(kind, 0) + 1
        return counts


def _foreign_prefix(key: str) -> str | None:
    for suffix in FOREIGN_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return None


def parse_lora(tensors: dict[str, torch.Tensor], name: str, metadata: dict[str, str] | None = None,
               adapter_config: tuple[str, str] | None = None) -> LoRA:
    """Group a file's tensors by module and let the adapter registry claim each module.

    Alphas: a module's own `.alpha` tensor, else the PEFT config of the file's `lora_adapter_metadata`
    header entry, else `adapter_config` = (source name, JSON text) (PEFT's adapter_config.json), else
    none (scale 1, alpha = rank), as diffusers and ComfyUI read them."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    original_keys: dict[str, dict[str, str]] = {}
    foreign: dict[str, dict[str, torch.Tensor]] = {}
    unrecognised: list[str] = []
    for key, tensor in tensors.items():
        split = split_key(key)
        if split is not None:
            prefix, role = split
            modules.setdefault(prefix, {})[role] = tensor
            original_keys.setdefault(prefix, {})[role] = key
            continue
        prefix = _foreign_prefix(key)
        if prefix is not None:
            foreign.setdefault(prefix, {})[key] = tensor
        else:
            unrecognised.append(key)

    metadata = dict(metadata or {})
    alpha_sources = _peft_alphas(modules, metadata, adapter_config)
    adapters: dict[str, Adapter] = {}
    for prefix, roles in modules.items():
        as_written = {original_keys[prefix][r]: t for r, t in roles.items() if r in original_keys[prefix]}
        if prefix in foreign:  # e.g. a LoRA with a bias diff: let core apply the whole module
            foreign[prefix].update(as_written)
            continue
        try:
            adapter = claim_adapter(roles)
        except LoRAShapeError as e:
            raise LoRAShapeError(f"{name}: module '{prefix}': {e}") from e
        if adapter is None:
            if set(roles) <= {"alpha", "dora_scale"}:
                unrecognised.extend(as_written)
            else:
                foreign.setdefault(prefix, {}).update(as_written)
        else:
            adapters[prefix] = adapter
    return LoRA(name=name, adapters=adapters, metadata=metadata, foreign=foreign, unrecognised=sorted(unrecognised),
                alpha_sources={p: s for p, s in alpha_sources.items() if p in adapters})


def _peft_alphas(modules: dict[str, dict[str, torch.Tensor]], metadata: dict[str, str],
                 adapter_config: tuple[str, str] | None) -> dict[str, str]:
    """Give each low-rank module without an `.alpha` tensor the alpha diffusers/PEFT would use (added to its
    roles as a float32 scalar); returns where each module's alpha came from."""
    configs, source = peft_config.read_configs(metadata.get(peft_config.METADATA_KEY)), peft_config.METADATA_KEY
    if not configs and adapter_config is not None:
        source, configs = adapter_config[0], peft_config.read_configs(adapter_config[1])
    sources: dict[str, str] = {}
    for prefix, roles in modules.items():
        if "alpha" in roles:
            sources[prefix] = peft_config.FROM_FILE
            continue
        down = roles.get("down")
        found = None
        if down is not None and "up" in roles and configs:
            found = peft_config.module_alpha(prefix, int(down.shape[0]), configs, source)
        if found is None:
            sources[prefix] = peft_config.NO_ALPHA + " (scale 1)"
        else:
            roles["alpha"] = torch.tensor(found[0], dtype=torch.float32)
            sources[prefix] = found[1]
    return sources


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
