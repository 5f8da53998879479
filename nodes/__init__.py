"""Thin ComfyUI node classes (V3 API); the work happens in lora_core."""
from .load_lora import LoadLoRA
from .train_lora import TrainLoRA

NODE_LIST = [LoadLoRA, TrainLoRA]
