"""lora_core: LoRA formats, key mapping, patching, stacking, training and merging in plain torch.

Nothing here imports ComfyUI; the node layer bridges it to ComfyUI's model management.
Sub-packages, each importing only the ones above it in this list:

    formats/   safetensors I/O, adapters, key layouts and names, families, metadata, kohya export
    patching/  matching a LoRA to a model, strengths per layer, weight patch and bypass
    stacking/  norms from the factors, clamps and caps, overlaps, the stack analysis
    merging/   several LoRAs into one
    training/  new LoRAs

and beside them the shared modules: values (Target, Term, LayerPatch), errors, caches, paths, plots,
version.
"""
from . import caches, errors, formats, merging, patching, values
from .errors import (
    LoRAError,
    LoRAFileError,
    LoRAFileNotFoundError,
    LoRASettingsError,
    LoRAShapeError,
    UnsafePathError,
    WrongBaseModelError,
)
from .formats import (
    ADAPTER_CLASSES,
    Adapter,
    LoHaAdapter,
    LoKrAdapter,
    LoRA,
    LoRAInfo,
    LowRankAdapter,
    build_metadata,
    claim_adapter,
    file_sha256,
    kohya_prefix,
    load_lora,
    lora_state_dict,
    parse_lora,
    read_info,
    read_lora_file,
    save_lora,
    write_lora_file,
)
from .merging import LayerReport, MergeInput, MergeReport, merge_loras
from .patching import (
    BypassForward,
    MatchResult,
    apply_terms,
    dense_delta,
    format_report,
    match_lora,
    plan_layers,
    supports_bypass,
)
from .paths import safe_join
from .values import CLIP, MODEL, LayerPatch, Target, Term
from .version import __version__

__all__ = [
    # sub-packages and shared modules
    "caches", "errors", "formats", "merging", "patching", "values",
    # errors a user can act on
    "LoRAError", "LoRAFileError", "LoRAFileNotFoundError", "LoRASettingsError", "LoRAShapeError", "UnsafePathError",
    "WrongBaseModelError",
    # files
    "ADAPTER_CLASSES", "Adapter", "LoHaAdapter", "LoKrAdapter", "LowRankAdapter", "claim_adapter",
    "LoRA", "LoRAInfo", "file_sha256", "load_lora", "parse_lora", "read_info",
    "read_lora_file", "write_lora_file", "safe_join",
    "build_metadata", "kohya_prefix", "lora_state_dict", "save_lora",
    # values
    "CLIP", "MODEL", "LayerPatch", "Target", "Term",
    # patching
    "BypassForward", "MatchResult", "apply_terms", "dense_delta", "format_report", "match_lora", "plan_layers",
    "supports_bypass",
    # merging
    "LayerReport", "MergeInput", "MergeReport", "merge_loras",
    "__version__",
]
