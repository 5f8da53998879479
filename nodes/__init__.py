"""Thin ComfyUI node classes (V3 API); the work happens in lora_core."""
from .load_lora import LoadLoRA

NODE_LIST = [LoadLoRA]
