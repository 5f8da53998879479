"""Files and what is in them: safetensors reading and writing, the adapter classes, the key layouts that
name them, diffusers/PEFT alphas, the names a file may give a layer, model families, metadata, the
parsed-file cache, and writing kohya files."""
from . import adapters, export, families, files, keymap, layouts, metadata, peft_config, safetensors_io, variants
from .adapters import ADAPTER_CLASSES, Adapter, LoHaAdapter, LoKrAdapter, LowRankAdapter, claim_adapter
from .export import build_metadata, file_alpha, kohya_prefix, lora_state_dict, save_lora
from .files import load_lora
from .layouts import LoRA, file_sha256, parse_lora, split_key
from .metadata import LoRAInfo, read_info
from .safetensors_io import data_sha256, read_header, read_lora_file, tensors_data_sha256, write_lora_file
from .variants import PLAIN, DoRAVariant, Variant, all_additive, variant_of

__all__ = [
    "adapters", "export", "families", "files", "keymap", "layouts", "metadata", "peft_config", "safetensors_io",
    "variants",
    "ADAPTER_CLASSES", "Adapter", "LoHaAdapter", "LoKrAdapter", "LowRankAdapter", "claim_adapter",
    "build_metadata", "file_alpha", "kohya_prefix", "lora_state_dict", "save_lora",
    "load_lora",
    "LoRA", "file_sha256", "parse_lora", "split_key",
    "LoRAInfo", "read_info",
    "data_sha256", "read_header", "read_lora_file", "tensors_data_sha256", "write_lora_file",
    "PLAIN", "DoRAVariant", "Variant", "all_additive", "variant_of",
]
