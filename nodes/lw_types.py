"""Custom types of the pack. Their names are permanent once workflows use them."""
from comfy_api.latest import io

LW_LORA = io.Custom("LW_LORA")     # an in-memory lora_core.LoRA
LORA_STACK = io.Custom("LORA_STACK")  # [(lora_name, strength_model, strength_clip)], as other packs build it
