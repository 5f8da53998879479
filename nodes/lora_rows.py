"""LoRA rows shared by Stack LoRA and Merge LoRA: a fixed number of widget rows (so saved
workflows work without the web extension) plus an optional LORA_STACK from other packs."""
from __future__ import annotations

from dataclasses import dataclass

from comfy_api.latest import io

from ..lora_core import LoRA
from .lora_files import file_fingerprint, lora_names
from .lw_types import LW_LORA, NONE, STRENGTH


@dataclass(frozen=True)
class LoRARow:
    """One LoRA a Stack/Merge LoRA node is asked for: a widget row or an item of the incoming LORA_STACK."""
    label: str                 # "row 2", "stack 1": how reports and problems name it
    source: str | LoRA         # a file name under models/loras, or the LoRA connected to the row
    strength_model: float
    strength_clip: float
    enabled: bool
    file_name: str | None      # the file a LORA_STACK output names; None for a connected LoRA
    row: int | None = None     # the widget row's number (its blocks_N input); None for a LORA_STACK item


def row_inputs(i: int) -> list:
    """Row i's widgets. The schema declares how they look (an on/off toggle, strength sliders), so a workflow
    shows its rows that way in an editor without the web extension too."""
    return [
        io.Combo.Input(f"lora_{i}", options=[NONE] + lora_names(), default=NONE, optional=True,
                       tooltip=f"Row {i}: a LoRA file from models/loras (ignored when LORA {i} is connected)."),
        LW_LORA.Input(f"lora_{i}_in", optional=True,
                      tooltip=f"Row {i}: a LoRA from Load/Train/Merge LoRA; used instead of the file."),
        io.Boolean.Input(f"on_{i}", default=True, optional=True, label_on="on", label_off="off",
                         tooltip=f"Row {i} on or off."),
        io.Float.Input(f"strength_model_{i}", **STRENGTH, optional=True, display_mode=io.NumberDisplay.slider,
                       tooltip=f"Row {i}: weight on MODEL layers."),
        io.Float.Input(f"strength_clip_{i}", **STRENGTH, optional=True, display_mode=io.NumberDisplay.slider,
                       tooltip=f"Row {i}: weight on CLIP layers."),
    ]


def all_row_inputs(count: int) -> list:
    return [inp for i in range(1, count + 1) for inp in row_inputs(i)]


def rows_fingerprint(rows: dict, count: int) -> list[str]:
    return [file_fingerprint(rows[f"lora_{i}"]) for i in range(1, count + 1) if rows.get(f"lora_{i}", NONE) != NONE]


def collect_rows(lora_stack, rows: dict, count: int) -> tuple[list[LoRARow], list[str]]:
    """The LoRAs asked for, incoming LORA_STACK items first, then the rows in use; malformed stack items
    are reported (the problems), not fatal."""
    requested, problems = [], []
    for n, item in enumerate(lora_stack or [], start=1):
        try:
            name, s_model, s_clip = item[0], float(item[1]), float(item[2])
        except (TypeError, ValueError, IndexError):
            problems.append(f"SKIPPED stack item {n}: expected (lora_name, strength_model, strength_clip), "
                            f"got {item!r}")
            continue
        if name and name != NONE:
            requested.append(LoRARow(f"stack {n}", name, s_model, s_clip, True, name))
    for i in range(1, count + 1):
        connected = rows.get(f"lora_{i}_in")
        file_name = rows.get(f"lora_{i}", NONE)
        if connected is None and file_name in (None, NONE):
            continue
        source = connected if connected is not None else file_name
        requested.append(LoRARow(f"row {i}", source, float(rows.get(f"strength_model_{i}", 1.0)),
                                 float(rows.get(f"strength_clip_{i}", 1.0)), bool(rows.get(f"on_{i}", True)),
                                 None if connected is not None else file_name, row=i))
    return requested, problems


BLOCK_WEIGHTS_TOOLTIP = ("Per-block weights in the LoRA Block Weight convention (as the Inspire pack's 'Lora Loader "
                         "(Block Weight)'): comma-separated values, BASE (text encoder and non-block layers) first, "
                         "then one per block the LoRA touches (SD1.x: IN01..OUT11, 17 values; SDXL 12; Flux: double "
                         "then single blocks), or a preset (SD-MIDD, SDXL-OUTALL, FLUX-DBL-FRONT, ALL, OUTD, ...), or "
                         "a %spec (%default=0,base=1,out=1). Empty: every block at 1.")


def block_weight_inputs(count: int) -> list:
    """Stack LoRA's per-row block weights, declared after every other input so that workflows saved
    before they existed (widget values are saved by position) load unchanged."""
    return [io.String.Input(f"blocks_{i}", default="", optional=True,
                            tooltip=f"Row {i}: " + BLOCK_WEIGHTS_TOOLTIP) for i in range(1, count + 1)]
