"""LW_StackLoRA: apply several LoRAs at once, clamped so they do not fight."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from comfy_api.latest import io

from ..lora_core import LoRAError
from ..lora_core.formats.metadata import join_trigger_words
from ..lora_core.patching.block_weights import BlockWeights, resolve_block_weights
from ..lora_core.patching.matching import MatchResult
from ..lora_core.stacking.clamping import (
    DEFAULT_BUDGET,
    DEFAULT_LAYER_CAP,
    DEFAULT_USE_BUDGET,
    DEFAULT_USE_LAYER_CAP,
    DEFAULT_WEIGHT_MAX,
    DEFAULT_WEIGHT_MIN,
    ClampSettings,
    StackEntry,
    clamp_strengths,
)
from ..lora_core.stacking.heatmap import render_heatmap
from ..lora_core.stacking.spectral import DEFAULT_SPECTRAL_CAP
from ..lora_core.stacking.stack_analysis import StackAnalysis, analyse_stack
from .comfy_bridge import (
    apply_layers,
    base_weight,
    base_weight_norms,
    base_weight_spectra,
    foreign_patches,
    match_on_host,
)
from .input_checks import check_inputs, input_problem, strengths_problem
from .lora_files import load_named_lora
from .lora_rows import LoRARow, all_row_inputs, block_weight_inputs, collect_rows, rows_fingerprint
from .lw_types import LORA_STACK, MERGE, MODES

ROWS = 6  # fixed rows keep saved workflows working without the web extension
ROW_STRENGTHS = tuple(f"strength_{part}_{i}" for i in range(1, ROWS + 1) for part in ("model", "clip"))


@dataclass(frozen=True)
class LoadedRow:
    """A row kept for the stack: its match on the host (None when the row is off), the file a LORA_STACK
    output names (None for a connected LoRA), and its block weights (None: every block at 1)."""
    match: MatchResult | None
    file_name: str | None
    weights: BlockWeights | None


class StackLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_StackLoRA",
            display_name="Stack LoRA (Workbench)",
            category="LoRA Workbench/stack",
            description="Applies several LoRAs at once with weight clamping (per-LoRA range, stack budget, "
                        "per-layer change cap) and shows where they interfere.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to apply the stack to."),
                io.Clip.Input("clip", optional=True, tooltip="The text encoder to apply the stack to."),
                LORA_STACK.Input("lora_stack", optional=True,
                                 tooltip="A LORA_STACK from another pack (efficiency, Comfyroll); applied first."),
                io.Combo.Input("mode", options=MODES, default=MERGE,
                               tooltip="merge: into the weights. bypass: beside them; strength changes are instant."),
                io.Boolean.Input("clamp_weights", default=True,
                                 tooltip="Clamp each LoRA's strength to [weight_min, weight_max]."),
                io.Float.Input("weight_min", default=DEFAULT_WEIGHT_MIN, min=-10.0, max=10.0, step=0.05,
                               tooltip="Lowest strength a LoRA may have."),
                io.Float.Input("weight_max", default=DEFAULT_WEIGHT_MAX, min=-10.0, max=10.0, step=0.05,
                               tooltip="Highest strength a LoRA may have."),
                io.Boolean.Input("use_budget", default=DEFAULT_USE_BUDGET,
                                 tooltip="Scale all strengths down together when their absolute sum exceeds budget."),
                io.Float.Input("budget", default=DEFAULT_BUDGET, min=0.01, max=20.0, step=0.05,
                               tooltip="Largest sum of |strength| over the stack (per MODEL and CLIP)."),
                io.Boolean.Input("use_layer_cap", default=DEFAULT_USE_LAYER_CAP,
                                 tooltip="Limit how far the stack may move any one layer's weights."),
                io.Float.Input("layer_cap", default=DEFAULT_LAYER_CAP, min=0.001, max=10.0, step=0.01,
                               tooltip="Largest ||combined change|| / ||weight|| per layer (0.10 = 10%)."),
                io.Boolean.Input("decorrelate", default=False,
                                 tooltip="Scale down LoRAs layer by layer where they push the same direction: each "
                                         "LoRA's strength is divided by 1 + the sum of its positive cosines."),
                *all_row_inputs(ROWS),
                # New inputs go last, optional, with defaults that keep the old behaviour: saved workflows
                # keep their widget values by position, and API prompts without them still validate.
                io.Boolean.Input("use_spectral_cap", default=False, optional=True,
                                 tooltip="Limit the strongest direction of each layer's combined change (its top "
                                         "singular value), which a norm cap lets through when LoRAs pile up on "
                                         "one direction."),
                io.Float.Input("spectral_cap", default=DEFAULT_SPECTRAL_CAP, min=0.001, max=10.0, step=0.01,
                               optional=True, tooltip="Largest top singular value of a layer's combined change, "
                                                      "as a share of the weight's own (0.5 = half)."),
                *block_weight_inputs(ROWS),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the clamped stack applied."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder with the clamped stack applied."),
                LORA_STACK.Output(display_name="LORA_STACK",
                                  tooltip="File rows with their effective strengths, for other packs."),
                io.String.Output(display_name="report", tooltip="Requested vs effective strengths, capped "
                                                                "layers, most-overlapping LoRA pairs."),
                io.Image.Output(display_name="interference", tooltip="Heatmap: LoRA pairs x blocks, cosine of "
                                                                     "their weight changes."),
                # New outputs go last: saved workflows' links keep their output indices.
                io.String.Output(display_name="trigger_words",
                                 tooltip="Trigger words of the LoRAs that are on, in row order, each once ('a, b')."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return rows_fingerprint(kwargs, ROWS)

    @classmethod
    def execute(cls, model, mode, clamp_weights, weight_min, weight_max, use_budget, budget, use_layer_cap,
                layer_cap, decorrelate, clip=None, lora_stack=None, use_spectral_cap=False,
                spectral_cap=DEFAULT_SPECTRAL_CAP, **rows):
        # NaN / inf / out of range: an error before any work; a bad row strength skips its row (reported)
        check_inputs(cls, {**locals(), **rows}, skip=ROW_STRENGTHS)
        bad_rows = _bad_rows(cls, rows)
        settings = ClampSettings(weight_min, weight_max, budget, layer_cap, clamp_weights=clamp_weights,
                                 use_budget=use_budget, use_layer_cap=use_layer_cap)
        settings.validate()
        requested, problems = collect_rows(lora_stack, rows, ROWS)
        loaded, entries = _load_rows(requested, model, clip, problems, bad_rows, rows)
        effective = clamp_strengths(entries, settings)
        applied = [(e.name, row.match, *e.plan_strengths())
                   for row, e in zip(loaded, effective) if row.match is not None]
        analysis = _analyse(applied, model, clip, decorrelate, layer_cap if use_layer_cap else None,
                            spectral_cap if use_spectral_cap else None)
        foreign = [patch for _, match, *strengths in applied for patch in foreign_patches(match, tuple(strengths))]
        new_model, new_clip, counts = (model, clip, {})
        if analysis.layers or foreign:
            new_model, new_clip, counts = apply_layers(model, clip, analysis.layers, foreign, mode, analysis.plain)

        stack_out = [(row.file_name, e.effective_model, e.effective_clip)
                     for row, e in zip(loaded, effective) if row.file_name and e.enabled]
        report = _report(effective, problems, analysis.capped, analysis.top_overlaps(5), analysis.decorrelated,
                         counts, mode, analysis.spectral, [row.weights for row in loaded])
        heatmap = render_heatmap(*analysis.block_table())
        triggers = join_trigger_words(row.match.info.trigger_words for row in loaded if row.match is not None)
        return io.NodeOutput(new_model, new_clip, stack_out, report, heatmap, triggers,
                             ui={"lw_report": [report],
                                 "lw_effective": [[e.name, e.requested_model, e.effective_model,
                                                   e.requested_clip, e.effective_clip, e.effective_blocks]
                                                  for e in effective]})


def _analyse(applied, model, clip, decorrelate: bool, layer_cap: float | None, spectral_cap: float | None
             ) -> StackAnalysis:
    """lora_core.stacking.stack_analysis.analyse_stack on the host's weights (norms and spectra memoised per model)."""
    spectra = base_weight_spectra(model, clip) if spectral_cap is not None else None
    return analyse_stack(applied, lambda t: base_weight(model, clip, t), base_weight_norms(model, clip),
                         decorrelate, layer_cap, spectral_cap, spectra)


def _bad_rows(node_cls, rows: dict) -> dict[str, str]:
    """{"row i": why} for rows with a strength input outside its declared range (or not finite)."""
    bad: dict[str, str] = {}
    for name in ROW_STRENGTHS:
        problem = input_problem(node_cls, name, rows.get(name))
        if problem:
            bad.setdefault(f"row {name.rsplit('_', 1)[1]}", problem)
    return bad


def _load_rows(requested: list[LoRARow], model, clip, problems: list[str], bad_rows: dict, rows: dict
               ) -> tuple[list[LoadedRow], list[StackEntry]]:
    """Match each row on the host and read its block weights; a bad row is skipped and reported, the
    rest still apply."""
    loaded, entries = [], []
    for row in requested:
        try:
            problem = strengths_problem(row.strength_model, row.strength_clip) or bad_rows.get(row.label)
            if problem:
                raise LoRAError(problem)
            lora = load_named_lora(row.source) if isinstance(row.source, str) else row.source
            match = match_on_host(lora, model, clip) if row.enabled else None
            weights = None
            if match is not None and row.row is not None:
                keys = [p.target.key for p in match.patches] + [t.key for t in match.foreign]
                weights = resolve_block_weights(rows.get(f"blocks_{row.row}"), keys)
        except (LoRAError, OSError) as e:
            problems.append(f"SKIPPED {row.label}: {e}")
            logging.warning("Stack LoRA: skipped %s: %s", row.label, e)
            continue
        loaded.append(LoadedRow(match, row.file_name, weights))
        entries.append(StackEntry(f"{row.label}: {lora.name}", row.strength_model, row.strength_clip, row.enabled,
                                  None if weights is None else weights.ratios))
    return loaded, entries


def _report(effective, problems, capped, top, decorrelated, counts, mode, spectral=(), block_weights=()) -> str:
    """The report text; `top`: the most-overlapping layers (StackAnalysis.top_overlaps)."""
    lines = [f"Stack LoRA ({mode})"]
    for e, weights in zip(effective, list(block_weights) or [None] * len(effective)):
        state = " (off)" if not e.enabled else ""
        lines.append(f"  {e.name}: model {e.requested_model:g} -> {e.effective_model:.4g}, "
                     f"clip {e.requested_clip:g} -> {e.effective_clip:.4g}{state}"
                     + (f"; {'; '.join(e.notes)}" if e.notes else ""))
        if weights is not None and e.effective_blocks is not None:
            lines.append(f"    block weights ({weights.vector.preset or 'vector'}): {weights.describe()}")
            lines.append("    model strength per block: "
                         + ", ".join(f"{label} {v:.4g}" for label, v in e.effective_blocks.items()))
            lines += [f"    {note}" for note in weights.notes]
    if not any(e.enabled for e in effective):
        lines.append("  no LoRA is on: the model passes through unchanged")
    lines += [f"  {p}" for p in problems]
    if capped:
        lines.append(f"  layer cap touched {len(capped)} layers (change / weight, before -> after):")
        for c in sorted(capped, key=lambda c: -c.ratio_before)[:15]:
            lines.append(f"    {c.target.key}: {c.ratio_before:.4f} -> {c.ratio_after:.4f}")
    if spectral:
        lines.append(f"  spectral cap touched {len(spectral)} layers (top singular value of change / of weight, "
                     "before -> after):")
        for c in sorted(spectral, key=lambda c: -c.ratio_before)[:15]:
            lines.append(f"    {c.target.key}: {c.ratio_before:.4f} -> {c.ratio_after:.4f}")
    if top:
        lines.append("  most-overlapping layers (cosine of the two LoRAs' changes):")
        lines += [f"    {o.lora_a} x {o.lora_b} @ {o.target.key}: {o.cosine:+.3f}" for o in top]
    if decorrelated:
        lines.append(f"  decorrelate scaled {len(decorrelated)} LoRA-layer pairs down")
    for component, c in counts.items():
        lines.append(f"  {component} patches: {c.merged} merged, {c.bypassed} bypass")
    return "\n".join(lines)
