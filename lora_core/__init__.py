"""lora_core: LoRA formats, key mapping, patching, stacking, training and merging in plain torch.

Nothing here imports ComfyUI; the node layer bridges it to ComfyUI's model management.
"""
from . import caches
from .adapters import ADAPTER_CLASSES, Adapter, LoHaAdapter, LoKrAdapter, LowRankAdapter, claim_adapter
from .bypass import BypassForward, supports_bypass
from .errors import (
    LoRAError,
    LoRAFileError,
    LoRAFileNotFoundError,
    LoRAShapeError,
    UnsafePathError,
    WrongBaseModelError,
)
from .export import build_metadata, kohya_prefix, lora_state_dict, save_lora
from .files import load_lora
from .formats import LoRA, file_sha256, parse_lora
from .matching import CLIP, MODEL, LayerPatch, MatchResult, Target, format_report, match_lora
from .merging import LayerReport, MergeInput, MergeReport, merge_loras
from .metadata import LoRAInfo, read_info
from .paths import safe_join
from .plan import plan_layers
from .safetensors_io import read_lora_file, write_lora_file
from .version import __version__
from .weight_patch import Term, apply_terms, dense_delta

__all__ = [name for name in dir() if not name.startswith("_")]
