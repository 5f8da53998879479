"""Numeric inputs checked before any work: every io.Int / io.Float input a node declares in its schema
must be a finite number inside the min..max it declares there.

ComfyUI's own validation does not cover this: it compares widget values with min/max only (NaN passes
every comparison, and a prompt's JSON may carry NaN / Infinity), and values arriving over a link are not
validated at all. The checks read the node's own schema, so a new input can never be forgotten.
"""
from __future__ import annotations

import math

from comfy_api.latest import io

from ..lora_core import LoRAError


class InputValueError(LoRAError):
    """A numeric input is not a finite number, or lies outside the range its node declares."""


_FACTS: dict = {}  # define_schema function -> (node name, is_input_list, {input id: (min, max)})


def _facts(node_cls) -> tuple[str, bool, dict]:
    # Keyed by the define_schema function: ComfyUI runs each execute on a shallow clone of the class.
    key = getattr(node_cls.define_schema, "__func__", node_cls.define_schema)
    if key not in _FACTS:
        schema = node_cls.define_schema()
        bounds = {inp.id: (inp.min, inp.max) for inp in schema.inputs
                  if isinstance(inp, (io.Int.Input, io.Float.Input))}
        _FACTS[key] = (schema.display_name or schema.node_id, bool(schema.is_input_list), bounds)
    return _FACTS[key]


def numeric_bounds(node_cls) -> dict[str, tuple[float | None, float | None]]:
    """{input id: (min, max)} of the node's io.Int / io.Float inputs, as its schema declares them."""
    return dict(_facts(node_cls)[2])


def _finite_in(value, low, high) -> bool:
    if isinstance(value, bool):
        return False
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        return False
    return math.isfinite(number) and (low is None or number >= low) and (high is None or number <= high)


def _range_text(low, high) -> str:
    if low is not None and high is not None:
        return f"a finite number from {low:g} to {high:g}"
    if low is not None:
        return f"a finite number of at least {low:g}"
    if high is not None:
        return f"a finite number of at most {high:g}"
    return "a finite number"


def input_problem(node_cls, name: str, value, item: str = "") -> str | None:
    """Why `value` cannot be the node's input `name` (naming node, input and value), or None when it can.
    None values (an optional input left unconnected) and non-numeric inputs are not judged."""
    node, _, bounds = _facts(node_cls)
    if value is None or name not in bounds:
        return None
    low, high = bounds[name]
    if _finite_in(value, low, high):
        return None
    return f"{node}: input '{name}'{item} is {value!r}; it must be {_range_text(low, high)}."


def check_inputs(node_cls, values: dict, skip=()) -> None:
    """Raise InputValueError for the first numeric input in `values` (input id -> value, e.g. execute's
    locals()) that is not finite or is outside its declared range. Nodes with is_input_list get a list per
    input; every item is checked. Inputs in `skip` are left to the node (Stack LoRA reports a bad row)."""
    _, is_list, bounds = _facts(node_cls)
    for name in bounds:
        if name in skip or name not in values:
            continue
        value = values[name]
        items = list(value) if is_list and isinstance(value, (list, tuple)) else [value]
        for n, item in enumerate(items, start=1):
            problem = input_problem(node_cls, name, item, f" (item {n} of {len(items)})" if len(items) > 1 else "")
            if problem:
                raise InputValueError(problem)


def strengths_problem(strength_model, strength_clip) -> str | None:
    """Why a LoRA row's pair of strengths cannot apply, or None. For rows whose strengths are not node
    inputs (items of an incoming LORA_STACK): Stack LoRA skips such a row, Merge LoRA refuses it."""
    if _finite_in(strength_model, None, None) and _finite_in(strength_clip, None, None):
        return None
    return f"strengths must be finite numbers, got {strength_model} / {strength_clip}"
