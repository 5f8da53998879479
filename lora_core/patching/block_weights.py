"""Per-block LoRA weights in the LoRA Block Weight convention people share.

The convention (sd-webui-lora-block-weight, and ComfyUI Inspire pack's "Lora Loader (Block
Weight)", whose reading of it this module follows) is a comma-separated vector of strengths:

  * value 1 is BASE: every layer outside the numbered blocks, that is the whole text encoder and
    the diffusion model's own non-block layers (time embedding, conv_in/out, Flux's img_in,
    txt_in, final_layer, ...);
  * the next values go, one each, to the numbered blocks THE LoRA TOUCHES, in this order: UNet
    input_blocks by number, middle_block by its part number, output_blocks by number, then Flux's
    double_blocks and single_blocks by number. A block the LoRA has no layer in takes no value.

So a usual SD1.x attention LoRA has 17 values: BASE, IN01, IN02, IN04, IN05, IN07, IN08, MID,
OUT03-OUT11 (the input and output blocks with attention); an SDXL attention LoRA 12: BASE, IN04,
IN05, IN07, IN08, MID, OUT00-OUT05; a LyCORIS/LoCon file that also patches the res-blocks more
(SD1.x 27, SDXL 21, as the Inspire pack's LyC presets). A Flux LoRA: BASE, then its double blocks,
then its single blocks. Other families (SD3, Wan, Qwen-Image, ...) have no numbered blocks in the
convention: all their layers are BASE.

A layer's strength is the node's strength times its block's value: a value of 0 leaves the block
out, negative values invert it. Blocks past the end of a short vector repeat its last value (the
Inspire pack does the same; it needs at least 12 values, we take any number). Named presets
(`SD-MIDD`, `SDXL-OUTALL`, `FLUX-DBL-FRONT`, ... as the Inspire pack ships them, and the
sd-webui names `ALL`, `MIDD`, `OUTD`, ... for its SD ones), `NAME:1,0,...` (the name is a label)
and the Inspire pack's `%` spec (`%default=0,base=1,out=1,in3-4=0.5`: positions among the LoRA's
blocks of that kind, 1-based) read as there. Random (`R`, `U`) and placeholder (`A`, `B`) values
and space-separated sub-values are refused with a message.

One difference from the Inspire pack's code, where it would matter: it starts a new value when a
block's *number* differs from the previous one, so two blocks of different kinds with the same
number in a row (a LoRA whose last double block is 0 and first single block is 0) share one value
there; here every block takes its own.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache

from .. import caches
from ..errors import LoRAError

BASE = "BASE"

# (kind index, label prefix) of each numbered container, in the convention's order.
_KINDS = {"input_blocks": (0, "IN"), "middle_block": (1, "MID"), "output_blocks": (2, "OUT"),
          "double_blocks": (3, "DBL"), "single_blocks": (4, "SGL")}
_SPEC_KINDS = {"in": 0, "mid": 1, "out": 2, "double": 3, "single": 4}
_KEY = re.compile(r"^diffusion_model\.(input_blocks|middle_block|output_blocks|double_blocks|single_blocks)\.(\d+)\.")


class BlockWeightError(LoRAError):
    """A block weight text that cannot be read."""


@lru_cache(maxsize=1 << 14)  # a few thousand host keys, looked up per layer on every run
def block_of_key(key: str) -> tuple[int, int] | None:
    """(kind, number) of the numbered block a host weight key lies in, None for BASE.

    'diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight' -> (0, 4)
    'diffusion_model.double_blocks.7.img_attn.qkv.weight' -> (3, 7)
    'clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight' -> None (BASE)
    """
    m = _KEY.match(key)
    return None if m is None else (_KINDS[m.group(1)][0], int(m.group(2)))


def _label(block: tuple[int, int] | None) -> str:
    if block is None:
        return BASE
    kind, number = block
    prefix = ("IN", "MID", "OUT", "DBL", "SGL")[kind]
    if kind == 1:  # middle_block.1 is the attention block people call MID; .0 and .2 its res-blocks
        return "MID" if number == 1 else f"MID{number}"
    return f"{prefix}{number:02d}"


@lru_cache(maxsize=1 << 14)
def block_label(key: str) -> str:
    """The block a host weight key belongs to: BASE, IN00-IN11, MID (MID0, MID2), OUT00-OUT11,
    DBL00-DBL18, SGL00-SGL37. A pure function of the key: the convention names blocks by the
    host's own layout (ldm UNet names for SD1.x/SD2/SDXL, double/single blocks for Flux-layout DiTs)."""
    return _label(block_of_key(key))


def blocks_of(keys: Iterable[str]) -> list[str]:
    """Labels of the numbered blocks these keys touch, in the convention's order (BASE not included)."""
    found = {block_of_key(k) for k in keys}
    found.discard(None)
    return [_label(b) for b in sorted(found)]


# ---------------------------------------------------------------- presets

_SD = {
    "NONE": "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "ALL": "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1",
    "INS": "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0",
    "IND": "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "INALL": "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0",
    "MIDD": "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0",
    "MIDD0.2": "1,0,0,0,0,0,0.2,0.4,0.4,0.2,0,0,0,0,0,0,0",
    "MIDD0.8": "1,0,0,0,0,0.5,0.8,0.8,0.4,0,0,0,0,0,0,0,0",
    "MOUT": "1,0,0,0,0,0,1,1,1,1,1,1,1,1,0.5,0,0",
    "OUTD": "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0",
    "OUTS": "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1",
    "OUTALL": "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1",
    "ALL0.5": "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5",
}
# The Inspire pack's lbw-preset.txt, except SD-ROUT, SD-AOUT and SD-AB (random / A-B placeholders).
PRESETS: dict[str, str] = {f"SD-{name}": vector for name, vector in _SD.items()} | {
    "SD-LyC-NONE": ",".join(["0"] * 27),
    "SD-LyC-ALL": ",".join(["1"] * 27),
    "SD-LyC-INALL": ",".join(["1"] * 12 + ["0"] * 15),
    "SD-LyC-MIDALL": ",".join(["1"] + ["0"] * 11 + ["1"] * 3 + ["0"] * 12),
    "SD-LyC-OUTALL": ",".join(["1"] + ["0"] * 14 + ["1"] * 12),
    "SDXL-NONE": ",".join(["0"] * 12),
    "SDXL-ALL": ",".join(["1"] * 12),
    "SDXL-INALL": "1,1,1,1,1,0,0,0,0,0,0,0",
    "SDXL-MIDALL": "1,0,0,0,0,1,0,0,0,0,0,0",
    "SDXL-OUTALL": "1,0,0,0,0,0,1,1,1,1,1,1",
    "SDXL-LyC-NONE": ",".join(["0"] * 21),
    "SDXL-LyC-ALL": ",".join(["1"] * 21),
    "SDXL-LyC-INALL": ",".join(["1"] * 9 + ["0"] * 12),
    "SDXL-LyC-MIDALL": ",".join(["1"] + ["0"] * 8 + ["1"] * 3 + ["0"] * 9),
    "SDXL-LyC-OUTALL": ",".join(["1"] + ["0"] * 11 + ["1"] * 9),
    "FLUX-DBL-FRONT": ",".join(["1"] * 6 + ["0"] * 12),
    "FLUX-DBL-MID": ",".join(["0"] * 6 + ["1"] * 6 + ["0"] * 6),
    "FLUX-DBL-TAIL": ",".join(["0"] * 12 + ["1"] * 6),
}
# sd-webui-lora-block-weight's own names for the SD presets.
ALIASES: dict[str, str] = {name: f"SD-{name}" for name in _SD}
_BY_UPPER = {name.upper(): name for name in PRESETS} | {alias.upper(): name for alias, name in ALIASES.items()}


def preset_names() -> list[str]:
    return list(PRESETS) + list(ALIASES)


# ---------------------------------------------------------------- reading the text

_NUMBER = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_SPEC_BASE = re.compile(r"^(default|base)=(\S+)$")
_SPEC_RANGE = re.compile(r"^(in|out|mid|double|single)(\d+)-(\d+)=(\S+)$")
_SPEC_ONE = re.compile(r"^(in|out|mid|double|single)(\d+)=(\S+)$")
_SPEC_ALL = re.compile(r"^(in|out|mid|double|single)=(\S+)$")


@dataclass(frozen=True)
class BlockVector:
    """A parsed block weight text: `values` (BASE first) or, for a `%` spec, its items."""

    text: str
    values: tuple[float, ...] = ()
    spec: tuple[str, ...] = ()
    preset: str | None = None


def _number(item: str, text: str) -> float:
    if not _NUMBER.match(item):
        if item in ("R", "r", "U", "u", "A", "a", "B", "b"):
            why = "random (R, U) and placeholder (A, B) values are not supported; write numbers"
        elif " " in item:
            why = "space-separated sub-values are not supported; give one number per block"
        else:
            why = f"it is not a number or a preset ({', '.join(list(ALIASES)[:6])}, SD-MIDD, SDXL-OUTALL, ...)"
        raise BlockWeightError(f"block weights '{text}': '{item}': {why}.")
    value = float(item)
    if not math.isfinite(value) or abs(value) > 10.0:
        raise BlockWeightError(f"block weights '{text}': {item} must be a finite number from -10 to 10.")
    return value


@lru_cache(maxsize=256)
def parse_block_weights(text: str | None) -> BlockVector | None:
    """Read a block weight text; None for an empty one (every block at 1). Raises BlockWeightError."""
    text = (text or "").strip()
    if not text:
        return None
    if text.startswith("%"):
        items = tuple(i.strip().lower() for i in text[1:].split(",") if i.strip())
        for item in items:
            m = (_SPEC_BASE.match(item) or _SPEC_RANGE.match(item) or _SPEC_ONE.match(item)
                 or _SPEC_ALL.match(item))
            if m is None:
                raise BlockWeightError(f"block weights '{text}': '{item}' is not a spec item (default=, base=, "
                                       "in=, mid=, out=, double=, single=, in3=, out1-4=)")
            _number(m.group(m.lastindex), text)
        return BlockVector(text, spec=items)
    body = text.split(":")[1] if ":" in text else text  # "NAME:1,0,..." names its vector
    items = [i.strip() for i in body.split(",")]
    preset = _BY_UPPER.get(items[0].upper()) if len(items) == 1 else None
    if preset is not None:
        return BlockVector(text, tuple(float(v) for v in PRESETS[preset].split(",")), preset=preset)
    if any(not i for i in items):
        raise BlockWeightError(f"block weights '{text}': an empty value between commas.")
    return BlockVector(text, tuple(_number(i, text) for i in items))


def _spec_values(vector: BlockVector, blocks: list[tuple[int, int]]) -> list[float]:
    """The Inspire pack's `%` spec, written out as a plain vector for these blocks."""
    default, base = 1.0, None
    for item in vector.spec:
        m = _SPEC_BASE.match(item)
        if m:
            if m.group(1) == "base":
                base = float(m.group(2))
            else:
                default = float(m.group(2))
    per_kind: list[list[float]] = [[default] * sum(1 for k, _ in blocks if k == kind) for kind in range(5)]
    for item in vector.spec:
        m = _SPEC_RANGE.match(item)
        if m:
            kind, first, last, value = _SPEC_KINDS[m.group(1)], int(m.group(2)), int(m.group(3)), float(m.group(4))
            for x in range(max(first, 1) - 1, min(last, len(per_kind[kind]))):
                per_kind[kind][x] = value
            continue
        m = _SPEC_ONE.match(item)
        if m:
            kind, x = _SPEC_KINDS[m.group(1)], int(m.group(2)) - 1
            if 0 <= x < len(per_kind[kind]):
                per_kind[kind][x] = float(m.group(3))
            continue
        m = _SPEC_ALL.match(item)
        if m:
            kind = _SPEC_KINDS[m.group(1)]
            per_kind[kind] = [float(m.group(2))] * len(per_kind[kind])
    return [default if base is None else base] + [v for values in per_kind for v in values]


@dataclass
class BlockWeights:
    """A block weight text resolved against one LoRA's layers: label -> multiplier, BASE first."""

    ratios: dict[str, float]
    vector: BlockVector
    notes: list[str] = field(default_factory=list)

    def ratio(self, key: str) -> float:
        return self.ratios.get(block_label(key), 1.0)

    def describe(self) -> str:
        """'BASE 1, IN01 0, ..., OUT11 1', as the Inspire pack's populated vector but labelled."""
        return ", ".join(f"{label} {value:g}" for label, value in self.ratios.items())


def resolve_block_weights(text: str | None, keys: Iterable[str]) -> BlockWeights | None:
    """The multiplier of each block of a LoRA whose layers have these host keys; None when the text is
    empty. Raises BlockWeightError for text that cannot be read."""
    vector = parse_block_weights(text)
    if vector is None:
        return None
    blocks = sorted({b for b in (block_of_key(k) for k in keys) if b is not None})
    values = list(_spec_values(vector, blocks) if vector.spec else vector.values)
    ratios = {BASE: values[0]}
    for i, block in enumerate(blocks, start=1):
        ratios[_label(block)] = values[min(i, len(values) - 1)]
    notes = []
    wanted = len(blocks) + 1
    if not vector.spec and len(values) != wanted:
        layout = ", ".join([BASE] + [_label(b) for b in blocks])
        if len(values) < wanted:
            notes.append(f"{len(values)} block values for {wanted} blocks ({layout}): the last value repeats")
        else:
            notes.append(f"{len(values)} block values for {wanted} blocks ({layout}): values {wanted + 1}-"
                         f"{len(values)} unused")
    return BlockWeights(ratios, vector, notes)


def model_block_strengths(weights: BlockWeights | None, strength: float) -> dict[str, float] | None:
    """Per-block model strengths (strength x multiplier), or None without block weights."""
    if weights is None:
        return None
    return {label: strength * ratio for label, ratio in weights.ratios.items()}


def strength_at(strength: tuple, target) -> float:
    """The strength a LoRA applies to one layer: (model, clip[, model per block]) -> float.
    Text encoder layers take the clip strength (BASE already folded in by the caller); model layers
    their block's strength where given, else the model strength."""
    if target.component != "model":
        return float(strength[1])
    blocks: Mapping[str, float] | None = strength[2] if len(strength) > 2 else None
    if blocks:
        value = blocks.get(block_label(target.key))
        if value is not None:
            return float(value)
    return float(strength[0])


# The lru_caches above memoise pure functions of host keys and texts; lora_core/caches.py lists them.
caches.register("block_keys", lambda: (block_of_key.cache_clear(), block_label.cache_clear(),
                                    parse_block_weights.cache_clear()))
