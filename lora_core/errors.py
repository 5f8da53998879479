"""Errors with messages a ComfyUI user can act on: each names the file, key or value."""


class LoRAError(ValueError):
    """Base class for every error lora_core raises on bad input."""


class LoRAFileError(LoRAError):
    """The file cannot be read as a LoRA (not safetensors, truncated, corrupt, NaN/inf)."""


class LoRAFileNotFoundError(LoRAFileError):
    """The file named is not there (not in the loras folders, or gone from disk)."""


class LoRAShapeError(LoRAError):
    """A LoRA's tensors disagree with each other or with the layer they target."""


class LoRASettingsError(LoRAError):
    """A setting is out of range or unknown: strengths, clamps and caps, an optimizer, a schedule, training
    targets, a stack's rows and names, or what a node must be given."""


class WrongBaseModelError(LoRAError):
    """Nothing (or almost nothing) in the LoRA matches the model it was applied to."""


class UnsafePathError(LoRAError):
    """A file name would leave the folder it must stay in."""
