"""LW_LoadLoRA: load one LoRA file onto MODEL and CLIP and say exactly what matched."""
from __future__ import annotations

from comfy_api.latest import io

from ..lora_core import format_report, plan_layers
from ..lora_core.errors import LoRASettingsError
from ..lora_core.formats.metadata import join_trigger_words
from ..lora_core.patching.block_weights import BASE, model_block_strengths, resolve_block_weights
from .comfy_bridge import apply_layers, foreign_patches, match_on_host
from .input_checks import check_inputs
from .lora_files import file_fingerprint, load_named_lora, lora_names
from .lora_rows import BLOCK_WEIGHTS_TOOLTIP
from .lw_types import LW_LORA, MERGE, MODES, STRENGTH


class LoadLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_LoadLoRA",
            display_name="Load LoRA (Workbench)",
            category="LoRA Workbench/load",
            description="Loads a LoRA in any common format (kohya, diffusers/PEFT, LyCORIS LoHa/LoKr, DoRA) "
                        "and reports exactly which layers matched. A LoRA made for another base model is an error.",
            inputs=[
                io.Model.Input("model", optional=True, tooltip="The diffusion model to apply the LoRA to."),
                io.Clip.Input("clip", optional=True, tooltip="The text encoder to apply the LoRA to."),
                io.Combo.Input("lora_name", options=lora_names(),
                               tooltip="A .safetensors LoRA from ComfyUI's models/loras folder."),
                io.Float.Input("strength_model", **STRENGTH,
                               tooltip="How strongly the LoRA changes the diffusion model; may be negative."),
                io.Float.Input("strength_clip", **STRENGTH,
                               tooltip="How strongly the LoRA changes the text encoder; may be negative."),
                io.Combo.Input("mode", options=MODES, default=MERGE,
                               tooltip="merge: adds the LoRA into the weights (fastest sampling). bypass: runs it "
                                       "beside the frozen weights, so changing a strength needs no re-patch."),
                # New inputs go last: saved workflows keep their widget values by position.
                io.String.Input("block_weights", default="", optional=True, tooltip=BLOCK_WEIGHTS_TOOLTIP),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the LoRA applied."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder with the LoRA applied."),
                LW_LORA.Output(display_name="LORA", tooltip="The loaded LoRA, for Stack LoRA or Merge LoRA."),
                io.String.Output(display_name="report", tooltip="What matched, what did not, trigger words."),
                # New outputs go last: saved workflows' links keep their output indices.
                io.String.Output(display_name="trigger_words",
                                 tooltip="The LoRA's trigger words ('a, b'), to wire into the prompt."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        return file_fingerprint(lora_name)

    @classmethod
    def execute(cls, lora_name, strength_model, strength_clip, mode, model=None, clip=None, block_weights=""):
        check_inputs(cls, locals())  # NaN / inf / out of range: an error before any work
        if model is None and clip is None:
            raise LoRASettingsError("Load LoRA: connect a MODEL, a CLIP, or both.")
        lora = load_named_lora(lora_name)
        result = match_on_host(lora, model, clip)
        # BlockWeightError (a LoRAError) names the text that cannot be read
        weights = resolve_block_weights(block_weights, [t.key for t in (*(p.target for p in result.patches),
                                                                          *result.foreign)])
        strengths = (strength_model, strength_clip)
        if weights is not None:
            strengths = (strength_model, strength_clip * weights.ratios[BASE],
                         model_block_strengths(weights, strength_model))
        layers = plan_layers([(result, *strengths)])
        new_model, new_clip, counts = apply_layers(model, clip, layers, foreign_patches(result, strengths), mode)
        report = format_report(result, {"model": strength_model, "clip": strength_clip}, mode)
        if weights is not None:
            report += f"\n  block weights ({weights.vector.preset or 'vector'}): {weights.describe()}"
            report += "".join(f"\n    {note}" for note in weights.notes)
        for component, c in counts.items():
            report += (f"\n  {component} patches: {c.merged} merged, {c.bypassed} bypass"
                       + (f" ({c.merged_in_bypass} merged because DoRA/sliced layers cannot run in bypass)"
                          if c.merged_in_bypass else ""))
        return io.NodeOutput(new_model, new_clip, lora, report, join_trigger_words([result.info.trigger_words]),
                             ui={"lw_report": [report], "lw_info": [result.to_dict()]})
