"""Files and what is in them: the adapter classes, the key layouts that name them, diffusers/PEFT
alphas, the names a file may give a layer, model families, metadata, and the parsed-file cache."""
from . import adapters, families, files, keymap, layouts, metadata, peft_config, variants
from .adapters import ADAPTER_CLASSES, Adapter, LoHaAdapter, LoKrAdapter, LowRankAdapter, claim_adapter
from .files import load_lora
from .layouts import LoRA, file_sha256, parse_lora, split_key
from .metadata import LoRAInfo, read_info
from .variants import PLAIN, DoRAVariant, Variant, all_additive, variant_of

__all__ = [
    "adapters", "families", "files", "keymap", "layouts", "metadata", "peft_config", "variants",
    "ADAPTER_CLASSES", "Adapter", "LoHaAdapter", "LoKrAdapter", "LowRankAdapter", "claim_adapter",
    "load_lora",
    "LoRA", "file_sha256", "parse_lora", "split_key",
    "LoRAInfo", "read_info",
    "PLAIN", "DoRAVariant", "Variant", "all_additive", "variant_of",
]
