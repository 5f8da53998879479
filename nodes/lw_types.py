"""The node layer's custom types and the values several nodes share. Saved workflows hold the type names,
NONE and the modes: they never change."""
from comfy_api.latest import io

LW_LORA = io.Custom("LW_LORA")     # an in-memory lora_core.LoRA
LORA_STACK = io.Custom("LORA_STACK")  # [(lora_name, strength_model, strength_clip)], as other packs build it

NONE = "None"  # the "no file" choice of a LoRA picker (and of resume_from), as ComfyUI's own pickers spell it
MERGE, BYPASS = "merge", "bypass"  # how a LoRA reaches the model (nodes/comfy_bridge.py)
MODES = [MERGE, BYPASS]
STRENGTH = dict(default=1.0, min=-10.0, max=10.0, step=0.01)  # a LoRA strength widget (Load LoRA and the rows)
