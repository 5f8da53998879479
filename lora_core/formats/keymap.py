"""Names a LoRA file may give a layer, resolved against the host's key map.

The host (ComfyUI) supplies a map from LoRA module names to its weight keys. Core v0.8.0
misses modern PEFT/diffusers names such as `unet.<path>.to_q` (no `.processor.`) and
`base_model.model.<path>`; rewriting them into kohya's underscore form reaches a name the
host already knows, so one rule covers UNet, text encoders and transformers alike.

Bare diffusers module names, as a model's own `save_lora_adapter()` writes them
(`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k`, `transformer_blocks.0.attn.to_q`),
are tried under the component they belong to: UNet paths under `unet.`, text-model paths under
`text_encoder.`, anything else under `transformer.` (the host's own names are tried first).
"""
from __future__ import annotations

PEFT_ROOT = "base_model.model."
# Dotted diffusers roots and the kohya prefixes that name the same component.
KOHYA_ROOTS: list[tuple[str, tuple[str, ...]]] = [
    ("unet.", ("lora_unet_",)),
    ("text_encoder_2.", ("lora_te2_",)),
    ("text_encoder.", ("lora_te_", "lora_te1_")),
    ("transformer.", ("lora_transformer_",)),
]


# First words of a diffusers UNet2DConditionModel's module paths.
UNET_ROOTS = ("down_blocks.", "up_blocks.", "mid_block.", "conv_in", "conv_out", "conv_norm_out", "time_embedding.",
              "add_embedding.", "class_embedding.")


def _component_names(bare: str, guess: bool) -> list[str]:
    """The rooted names a bare diffusers module name may stand for; `guess`: also "transformer." for
    names no component claims (right for a transformer's own save_lora_adapter file)."""
    if bare.startswith(UNET_ROOTS):
        return ["unet." + bare]
    if bare.startswith("text_model."):
        return ["text_encoder." + bare]
    if bare.startswith("diffusion_model."):  # ComfyUI's own path: kohya writes it lora_unet_<path>
        return ["unet." + bare[len("diffusion_model."):]]
    return ["transformer." + bare] if guess else []


def _kohya_names(dotted: str) -> list[str]:
    for root, kohya_prefixes in KOHYA_ROOTS:
        if dotted.startswith(root):
            tail = dotted[len(root):].replace(".", "_")
            return [p + tail for p in kohya_prefixes]
    return []


def candidate_names(prefix: str, guess: bool = True) -> list[str]:
    """Every name under which the host map may know this file's module, most literal first.
    guess=False leaves out the guess that a bare name of no known component is a transformer's."""
    names = [prefix]
    roots = tuple(root for root, _ in KOHYA_ROOTS)
    if prefix.startswith(PEFT_ROOT):
        rest = prefix[len(PEFT_ROOT):]
        names.append(rest)
        if not rest.startswith(roots):
            names += ["unet." + rest, "transformer." + rest]
    elif not prefix.startswith(roots + ("lora_", "lycoris_")):
        names += _component_names(prefix, guess)
    for dotted in list(names):
        names += _kohya_names(dotted)
    seen: set[str] = set()
    return [n for n in names if not (n in seen or seen.add(n))]


def resolve(prefix: str, key_map: dict) -> tuple[str, object] | None:
    """(name that matched, host target) or None. Targets are a weight key or (key, offset)."""
    for name in candidate_names(prefix):
        if name in key_map:
            return name, key_map[name]
    return None


def is_text_encoder_name(prefix: str) -> bool:
    p = prefix.lower()
    return any(s in p for s in ("lora_te", "text_encoder", "text_model", "lora_prior_te"))
