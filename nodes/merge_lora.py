"""LW_MergeLoRA: combine LoRAs into one, exactly (concat) or compressed (svd, ties, dare)."""
from __future__ import annotations

import os

from comfy_api.latest import io

from ..lora_core import LoRA, LoRAError, file_sha256, merge_loras
from ..lora_core.formats.export import build_metadata, file_alpha, kohya_prefix, lora_state_dict, save_lora
from ..lora_core.formats.families import UNKNOWN, guess_family
from ..lora_core.formats.safetensors_io import data_sha256, tensors_data_sha256
from ..lora_core.merging import METHODS, RANK_MODES, MergeInput
from .file_names import standard_names
from .input_checks import check_inputs, strengths_problem
from .lora_files import load_named_lora, output_path
from .lora_rows import all_row_inputs, collect_rows, rows_fingerprint
from .lw_types import LORA_STACK, LW_LORA

ROWS = 4


class MergeLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="LW_MergeLoRA",
            display_name="Merge LoRA (Workbench)",
            category="LoRA Workbench/merge",
            description="Merges weighted LoRAs into one: concat is exact, svd/ties/dare compress to a rank and "
                        "report the per-layer error.",
            is_output_node=True,
            inputs=[
                LORA_STACK.Input("lora_stack", optional=True, tooltip="LoRAs and weights from Stack LoRA or "
                                 "another pack; merged first."),
                io.Combo.Input("method", options=list(METHODS), default="concat",
                               tooltip="concat: exact, rank = sum of ranks. svd: best rank-k approximation per "
                                       "layer. ties: trim, elect sign, disjoint mean. dare: random drop + rescale."),
                io.Int.Input("target_rank", default=64, min=1, max=1024,
                             tooltip="Rank of the result for svd/ties/dare (reduced where a layer allows less)."),
                io.Combo.Input("rank_mode", options=list(RANK_MODES), default="fixed",
                               tooltip="energy: per layer the smallest rank keeping `energy` of the change."),
                io.Float.Input("energy", default=0.95, min=0.5, max=1.0, step=0.005,
                               tooltip="Share of the squared singular values to keep in energy mode."),
                io.Float.Input("density", default=0.5, min=0.01, max=1.0, step=0.01,
                               tooltip="ties: fraction of entries kept per LoRA. dare: 1 - drop probability."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="dare's random drops; same seed, "
                             "same file."),
                io.String.Input("output_name", default="", tooltip="File name under models/loras; empty keeps the "
                                "result in memory only."),
                io.String.Input("scope", multiline=True, default="",
                                tooltip="What the merged adapter owns; stored in the file."),
                *all_row_inputs(ROWS),
            ],
            outputs=[
                LW_LORA.Output(display_name="LORA", tooltip="The merged LoRA (for Stack LoRA / Load-style use)."),
                io.String.Output(display_name="file", tooltip="The saved file's name, or empty."),
                io.String.Output(display_name="report", tooltip="Per-layer relative error, retained energy."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return rows_fingerprint(kwargs, ROWS)

    @classmethod
    def execute(cls, method, target_rank, rank_mode, energy, density, seed, output_name, scope, lora_stack=None,
                **rows):
        check_inputs(cls, {**locals(), **rows})  # NaN / inf / out of range: an error before any work
        name = output_name.strip().removesuffix(".safetensors")
        path = output_path(name) if name else None  # refuse escaping names before any work
        requested, problems = collect_rows(lora_stack, rows, ROWS)
        inputs, parents = [], []
        for row in requested:
            if not row.enabled:
                continue
            problem = strengths_problem(row.strength_model, row.strength_clip)  # LORA_STACK items (rows: above)
            if problem:
                raise LoRAError(f"Merge LoRA: {row.label}: {problem}.")
            lora = load_named_lora(row.source) if isinstance(row.source, str) else row.source
            inputs.append(MergeInput(lora, row.strength_model, row.strength_clip))
        if not inputs:
            raise LoRAError("Merge LoRA: no LoRAs to merge; pick files in the rows, connect LoRAs, or a LORA_STACK.")
        # Only a family the parents agree on, or the keys name alone, is written; else "unknown".
        families = {guess_family(list(i.lora.adapters), i.lora.metadata, strict=True) for i in inputs} - {UNKNOWN}
        family = families.pop() if len(families) == 1 else guess_family(
            [p for i in inputs for p in i.lora.adapters], {}, strict=True)
        # The family's standard module names (SD1.x/SDXL: kohya sd-scripts' diffusers paths): parents naming a
        # layer either way merge into one, and the file is written that way.
        names, naming_note = _standard_names_for(family, inputs)
        merged, report = merge_loras(inputs, method=method, target_rank=target_rank, rank_mode=rank_mode,
                                     energy=energy, density=density, seed=seed, name=name or "merged", names=names)
        text = "\n".join(problems + [report.to_text()] + ([f"note: {naming_note}"] if naming_note else []))
        file_name = ""
        if path:
            parents = [_parent(i, names) for i in inputs]
            provenance = {"parents": parents, "method": method, "settings": {
                "target_rank": target_rank, "rank_mode": rank_mode, "energy": energy, "density": density,
                "seed": seed}, "report": report.to_dict()}
            meta = build_metadata(title=name, base_family=family, rank=report.max_rank, alpha=file_alpha(merged),
                                  scope=scope, provenance=provenance)
            save_lora(path, merged, meta, names)
            merged.metadata = meta
            file_name = os.path.relpath(path, os.path.dirname(output_path("x")))
            text += f"\nsaved: {file_name}"
        return io.NodeOutput(merged, file_name, text, ui={"lw_report": [text], "lw_merge": [report.summary()]})


LDM_UNET = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")


def _standard_names_for(family: str, inputs: list[MergeInput]) -> tuple[dict[str, str], str]:
    """The family's standard names from its standard UNet layout (a merge has no model to read one from),
    used only when every module a parent names by ComfyUI's UNet paths exists in that layout: a UNet of
    another layout (fewer blocks) would be renamed wrongly, so its parents keep their names."""
    names = standard_names(family)
    if not names:
        return {}, ""
    outside = sorted({kohya for i in inputs for kohya in map(kohya_prefix, i.lora.adapters)
                      if kohya.startswith(LDM_UNET) and kohya not in names})
    if outside:
        return {}, (f"layers are named as the parents name them: '{outside[0]}' ({len(outside)} in all) is not in "
                    f"the standard {family} UNet, so ComfyUI's layer names cannot be turned into kohya's here.")
    return names, ""


def _parent(item: MergeInput, names: dict[str, str]) -> dict:
    """A parent in the provenance: its name and weights, the sha256 of its file and of its tensor data (the
    bytes after the safetensors header, as model sites identify files: renaming or re-tagging keeps it).
    A parent that is no file (a LORA made in memory) has the data hash of the file it would be saved as."""
    lora: LoRA = item.lora
    sha, data = lora.sha256, None
    if lora.source_path:
        sha = sha or file_sha256(lora.source_path)
        data = data_sha256(lora.source_path)
    else:
        try:
            data = tensors_data_sha256(lora_state_dict(lora, names=names))
        except LoRAError:  # LoHa/LoKr made in memory: no kohya file form; no file hash either
            data = None
    return {"name": lora.name, "sha256": sha, "data_sha256": data, "weight": item.weight,
            "clip_weight": item.clip_weight}
