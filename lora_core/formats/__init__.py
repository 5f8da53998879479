"""Files and what is in them: the adapter classes, the key layouts that name them, diffusers/PEFT
alphas, the names a file may give a layer, model families, metadata, and the parsed-file cache."""
from . import adapters, families, files, keymap, layouts, metadata, peft_config
from .adapters import ADAPTER_CLASSES, Adapter, LoHaAdapter, LoKrAdapter, LowRankAdapter, claim_adapter
from .files import load_lora
from .layouts import LoRA, file_sha256, parse_lora, split_key
from .metadata import LoRAInfo, read_info

__all__ = [
    "adapters", "families", "files", "keymap", "layouts", "metadata", "peft_config",
    "ADAPTER_CLASSES", "Adapter", "LoHaAdapter", "LoKrAdapter", "LowRankAdapter", "claim_adapter",
    "load_lora",
    "LoRA", "file_sha256", "parse_lora", "split_key",
    "LoRAInfo", "read_info",
]
