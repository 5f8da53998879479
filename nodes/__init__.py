"""Thin ComfyUI node classes (V3 API); the work happens in lora_core."""
from .load_lora import LoadLoRA
from .merge_lora import MergeLoRA
from .stack_lora import StackLoRA
from .train_lora import TrainLoRA

NODE_LIST = [LoadLoRA, StackLoRA, TrainLoRA, MergeLoRA]

__all__ = ["LoadLoRA", "MergeLoRA", "StackLoRA", "TrainLoRA", "NODE_LIST"]
