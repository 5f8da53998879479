"""Which layers of a host model a new LoRA trains: named presets over weight keys."""
from __future__ import annotations

ATTENTION, ATTENTION_FF = "attention", "attention + feed-forward"
PRESETS = [ATTENTION, ATTENTION_FF]

# UNet attention linears (diffusers' default LoRA targets) and their feed-forward.
_UNET_ATTENTION = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")
_UNET_FF = (".ff.net.0.proj.weight", ".ff.net.2.weight")
# DiT (Flux layout) equivalents: fused qkv and output projections; linear1 also holds the MLP input.
_DIT_ATTENTION = (".img_attn.qkv.weight", ".img_attn.proj.weight", ".txt_attn.qkv.weight", ".txt_attn.proj.weight",
                  ".linear1.weight", ".linear2.weight")
_DIT_FF = (".img_mlp.0.weight", ".img_mlp.2.weight", ".txt_mlp.0.weight", ".txt_mlp.2.weight")


def select_targets(weight_shapes: dict[str, tuple], preset: str = ATTENTION) -> list[str]:
    """Weight keys of 2-D (linear) layers the preset trains, sorted for determinism."""
    if preset not in PRESETS:
        raise ValueError(f"targets '{preset}' unknown; choose one of {PRESETS}.")
    suffixes = _UNET_ATTENTION + _DIT_ATTENTION
    if preset == ATTENTION_FF:
        suffixes += _UNET_FF + _DIT_FF
    keys = [k for k, shape in weight_shapes.items() if k.endswith(suffixes) and len(shape) == 2]
    return sorted(keys)
