"""Tiny, seeded, random-weight instances of ComfyUI's model families, built by ComfyUI itself.

Each family is built the way `comfy.sd.load_diffusion_model_state_dict` builds a detected model:
ComfyUI's own config class (`comfy.supported_models.<Class>(unet_config)`), `set_inference_dtype`,
`get_model(...)`, wrapped in a real `comfy.model_patcher.ModelPatcher`. Only the sizes shrink
(mostly hidden 64, 2 heads, one block of each kind, text width 32); the architecture and so every
module name stay the real model's, so LoRA keys written against these models are realistic.
Where a model fixes a size the floor is higher: SD3 hidden 128 (64 per head), Z-Image dim 256,
SDXL 1 head per 64 channels. The sizes are too small for ComfyUI's detection to pick the same
config class from the weights (it matches real sizes), so the config class is chosen here.

    FAMILIES                         the family keys
    build(family, seed=0)            -> ModelPatcher (cached per (family, seed): do not mutate it;
                                        clone() it to patch)
    sample_inputs(family, seed=0)    -> {"latent": tensor, "cond": text-encoder output dict}
    denoise(patcher, family, seed=0) -> one real forward (apply_model) at a mid sigma
    attention_linear_keys(family)    -> "diffusion_model.<...>.weight" keys of attention linears

ComfyUI must be imported first (the `comfy_host` fixture does it); comfy is imported lazily here.
"""
from __future__ import annotations

import atexit
import functools
import re
from dataclasses import dataclass, field

import torch

STD = 0.02        # init of biases, embeddings and tokens; matrix weights get 1/sqrt(fan_in)
TOKENS = 16       # text tokens of the T5/LLM-style encoders (CLIP always gives 77)
CTX = 32          # text-encoder hidden size (cross_attn width) of every tiny family
POOLED = 32       # pooled_output width where the family's text encoder gives one

# Attention linears of the UNet families (SpatialTransformer blocks) and of LTXV's blocks.
_ATTN12 = r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)"
# Flux-style double/single stream blocks; single blocks fuse qkv (+ MLP in) in linear1 and the
# attention out (+ MLP out) in linear2, which is where Flux LoRAs put their attention ranks.
_FLUX_ATTN = (r"^double_blocks\.\d+\.(img|txt)_attn\.(qkv|proj)", r"^single_blocks\.\d+\.linear[12]")


@dataclass(frozen=True)
class Spec:
    config: str          # comfy.supported_models class name
    unet_config: dict    # keys as model_detection.detect_unet_config writes them (plus size
                         # arguments it leaves at the constructor's defaults), tiny values
    latent: tuple        # latent shape of a tiny image/video, [B, C, (T,) H, W]
    tokens: int          # cross_attn length
    pooled: bool         # the text encoder gives a pooled_output (else pooled_output is None)
    attention: tuple     # regexes over weight paths (without "diffusion_model." and ".weight")
    mask: int | None = None          # attention_mask of `tokens` with this many ones (rest padding)
    extra: dict = field(default_factory=dict)   # extra cond tensors: name -> shape


# Key order follows the brief. Every unet_config below uses the keys ComfyUI's detection writes
# for that family (comfy/model_detection.py); only the sizes are ours.
SPECS: dict[str, Spec] = {
    # SD1.5 UNet: 4 levels, attention on the first three (input_blocks 1,2,4,5,7,8, middle,
    # output_blocks 3-11) as in the real model. SD15.unet_extra_config forces num_heads 8.
    "sd15": Spec("SD15", {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 1, 2, 2],
        "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_linear_in_transformer": False, "context_dim": CTX,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }, (1, 4, 8, 8), 77, True, (_ATTN12,)),
    # SDXL UNet: 3 levels, no attention on the first (input_blocks 4,5,7,8, middle, output 0-5),
    # linear proj_in. adm = pooled + 6 size embeddings of 256 (model_base.SDXL.encode_adm).
    # Head width is 64 (BASE.unet_extra_config), so the 128-channel level has 2 heads.
    "sdxl": Spec("SDXL", {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "num_classes": "sequential", "adm_in_channels": POOLED + 6 * 256,
        "in_channels": 4, "out_channels": 4, "model_channels": 32,
        "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 2],
        "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
        "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
        "use_linear_in_transformer": True, "context_dim": CTX,
        "use_temporal_resblock": False, "use_temporal_attention": False,
    }, (1, 4, 8, 8), 77, True, (_ATTN12,)),
    "flux": Spec("Flux", {
        "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
        "hidden_size": 64, "num_heads": 2, "axes_dim": [8, 12, 12], "mlp_ratio": 4.0, "theta": 10000,
        "depth": 1, "depth_single_blocks": 1, "context_in_dim": CTX, "vec_in_dim": POOLED,
        "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": [], "yak_mlp": False, "txt_norm": False,
    }, (1, 16, 8, 8), TOKENS, True, _FLUX_ATTN),
    # Chroma: in_dim 64 is fixed by its forward (2 x 16-dim timestep embeddings + 32-dim index
    # embedding); out_dim must equal hidden_size (the approximator gives the modulations).
    "chroma": Spec("Chroma", {
        "image_model": "chroma", "in_channels": 64, "out_channels": 64, "patch_size": 2,
        "hidden_size": 64, "num_heads": 2, "axes_dim": [8, 12, 12], "mlp_ratio": 4.0, "theta": 10000,
        "depth": 1, "depth_single_blocks": 1, "context_in_dim": CTX, "vec_in_dim": None,
        "qkv_bias": True, "txt_ids_dims": [],
        "in_dim": 64, "out_dim": 64, "hidden_dim": 32, "n_layers": 1,
    }, (1, 16, 8, 8), TOKENS, False, _FLUX_ATTN),
    # Qwen-Image latents are Wan 2.1 latents: 5-D with one frame.
    "qwen_image": Spec("QwenImage", {
        "image_model": "qwen_image", "in_channels": 64, "out_channels": 16, "num_layers": 1,
        "attention_head_dim": 32, "num_attention_heads": 2, "joint_attention_dim": CTX,
        "axes_dims_rope": [8, 12, 12],
    }, (1, 16, 1, 8, 8), TOKENS, False,
        (r"^transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)",)),
    "wan21": Spec("WAN21_T2V", {
        "image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "num_heads": 2,
        "num_layers": 1, "in_dim": 16, "out_dim": 16, "text_dim": CTX, "patch_size": (1, 2, 2),
        "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
    }, (1, 16, 2, 8, 8), TOKENS, False, (r"^blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]",)),
    # WAN22_T2V is Wan 2.2 TI2V-5B: 48-channel latents (Wan 2.2 14B loads as WAN21_T2V).
    "wan22": Spec("WAN22_T2V", {
        "image_model": "wan2.1", "model_type": "t2v", "dim": 64, "ffn_dim": 128, "num_heads": 2,
        "num_layers": 1, "in_dim": 48, "out_dim": 48, "text_dim": CTX, "patch_size": (1, 2, 2),
        "freq_dim": 256, "window_size": (-1, -1), "qk_norm": True, "cross_attn_norm": True, "eps": 1e-6,
    }, (1, 48, 2, 8, 8), TOKENS, False, (r"^blocks\.\d+\.(self_attn|cross_attn)\.[qkvo]",)),
    # HunyuanVideo: Flux-like blocks plus the text token refiner (2 blocks, fixed by the model).
    "hunyuan_video": Spec("HunyuanVideo", {
        "image_model": "hunyuan_video", "in_channels": 16, "out_channels": 16, "patch_size": [1, 2, 2],
        "hidden_size": 64, "num_heads": 2, "axes_dim": [8, 12, 12], "mlp_ratio": 4.0, "theta": 256,
        "depth": 1, "depth_single_blocks": 1, "context_in_dim": CTX, "vec_in_dim": POOLED,
        "qkv_bias": True, "guidance_embed": True, "byt5": False, "meanflow": False,
        "use_cond_type_embedding": False, "vision_in_dim": None, "meanflow_sum": False,
    }, (1, 16, 2, 8, 8), TOKENS, True,
        _FLUX_ATTN + (r"^txt_in\.individual_token_refiner\.blocks\.\d+\.self_attn\.(qkv|proj)",)),
    # Lumina 2: grouped-query attention kept (2 query heads, 1 kv head), fused qkv.
    "lumina2": Spec("Lumina2", {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": CTX,
        "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 1,
        "axes_dims": [8, 12, 12], "axes_lens": [300, 512, 512], "rope_theta": 10000.0,
        "ffn_dim_multiplier": 4.0,
    }, (1, 16, 8, 8), TOKENS, False,
        (r"^(layers|noise_refiner|context_refiner)\.\d+\.attention\.(qkv|out)",), mask=TOKENS),
    # Z-Image: dim cannot go below 256. z_image_modulation fixes the timestep embedding at 256
    # wide while the blocks' adaLN takes min(dim, 256) inputs. Head width 128 as in the real model.
    # (ZImage.matches() wants dim 3840; we instantiate the class directly.)
    "z_image": Spec("ZImage", {
        "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 256, "cap_feat_dim": CTX,
        "n_layers": 1, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2, "n_kv_heads": 2,
        "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
        "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
        "pad_tokens_multiple": 32,
    }, (1, 16, 8, 8), TOKENS, False,
        (r"^(layers|noise_refiner|context_refiner)\.\d+\.attention\.(qkv|out)",), mask=TOKENS),
    # HiDream: caption_channels = [T5 width, Llama width]; one Llama layer per block
    # (llama_layers indexes conditioning_llama3's layer axis).
    "hidream": Spec("HiDream", {
        "image_model": "hidream", "patch_size": 2, "in_channels": 16, "out_channels": 16,
        "attention_head_dim": 32, "num_attention_heads": 2, "axes_dims_rope": [16, 8, 8],
        "caption_channels": [CTX, CTX], "text_emb_dim": POOLED, "max_resolution": [128, 128],
        "num_layers": 1, "num_single_layers": 1, "llama_layers": [0, 1],
        "num_routed_experts": 4, "num_activated_experts": 2,
    }, (1, 16, 8, 8), TOKENS, True,
        (r"^(double_stream_blocks|single_stream_blocks)\.\d+\.block\.attn1\.(to_q|to_k|to_v|to_out)(_t)?",),
        extra={"conditioning_llama3": (1, 2, 8, CTX)}),
    # LTXV: 128 latent channels fixed by its VAE; cross_attention_dim must equal the inner dim.
    # Its T5 is padded (min_length 256), so the mask has zeros: 12 real tokens, 4 padding.
    "ltxv": Spec("LTXV", {
        "image_model": "ltxv", "num_layers": 1, "attention_head_dim": 32, "num_attention_heads": 2,
        "cross_attention_dim": 64, "caption_channels": CTX, "in_channels": 128,
    }, (1, 128, 2, 4, 4), TOKENS, False, (r"^transformer_blocks\.\d+" + _ATTN12,), mask=12),
    # SD3 MMDiT: hidden = 64 * depth and heads = depth are hard-coded, so depth 2 gives hidden 128,
    # 2 heads. The last block is pre_only: its context_block has qkv but no proj.
    "sd3": Spec("SD3", {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
        "adm_in_channels": POOLED,
        "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": CTX, "out_features": 128}},
        "num_patches": 256, "pos_embed_max_size": 16, "pos_embed_scaling_factor": None,
        "x_block_self_attn_layers": [],
    }, (1, 16, 8, 8), TOKENS, True, (r"^joint_blocks\.\d+\.(x_block|context_block)\.attn\.(qkv|proj)",)),
    "aura_flow": Spec("AuraFlow", {
        "max_seq": 256, "cond_seq_dim": CTX, "n_double_layers": 1, "n_layers": 2,
        "dim": 64, "n_heads": 2, "global_conddim": 64,
    }, (1, 4, 8, 8), TOKENS, False, (r"^(double|single)_layers\.\d+\.attn\.w[12][qkvo]",)),
}

FAMILIES: list[str] = list(SPECS)


def _spec(family: str) -> Spec:
    try:
        return SPECS[family]
    except KeyError:
        raise KeyError(f"unknown family {family!r}; known: {FAMILIES}") from None


def _fill_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """ComfyUI's ops skip weight init (a real load overwrites every weight): fill every parameter
    and the persistent float buffers a checkpoint would carry (SD3's pos_embed) from `generator`.
    Linear/conv weights get normal(0, 1/sqrt(fan_in)), so activations keep unit scale through the
    tiny layers; a flat 0.02 starves gated blocks (AuraFlow's gates come out ~1e-4 and its output
    then ignores attention, so no LoRA could move it). Norms get weight/scale 1 and bias 0; other
    tensors (biases, embeddings, tokens, tables) normal(0, 0.02)."""
    with torch.no_grad():
        for mod in module.modules():
            is_norm = "norm" in type(mod).__name__.lower()
            for name, p in mod.named_parameters(recurse=False):
                if is_norm and name in ("weight", "scale"):
                    p.fill_(1.0)
                elif is_norm and name == "bias":
                    p.zero_()
                else:
                    std = p[0].numel() ** -0.5 if name == "weight" and p.ndim >= 2 else STD
                    p.copy_(torch.randn(p.shape, generator=generator) * std)
            for name, b in mod.named_buffers(recurse=False):
                if b.is_floating_point() and name not in mod._non_persistent_buffers_set:
                    b.copy_(torch.randn(b.shape, generator=generator) * STD)


@functools.cache
def build(family: str, seed: int = 0):
    """A ModelPatcher around a tiny random-weight model of `family`, as load_diffusion_model_state_dict
    builds one (fp32, no manual cast, load and offload device the CPU). Cached: clone() to patch."""
    import comfy.model_patcher
    import comfy.supported_models

    spec = _spec(family)
    config = getattr(comfy.supported_models, spec.config)(spec.unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})  # an empty state dict: model_type() sees no v-pred/EDM markers
    _fill_(model.diffusion_model, torch.Generator().manual_seed(seed))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


# Drop the cached patchers while comfy is still importable: ModelPatcher.__del__ needs it.
atexit.register(build.cache_clear)


def sample_inputs(family: str, seed: int = 0) -> dict:
    """{"latent": noise of the family's latent shape, "cond": the text encoder's output dict as
    CLIPTextEncode hands it to the sampler: cross_attn, pooled_output (None where the encoder has
    no pooled output) and the family's extras (attention_mask, conditioning_llama3)}. Fresh tensors."""
    spec = _spec(family)
    g = torch.Generator().manual_seed(10_000 + seed)
    cond = {
        "cross_attn": torch.randn((1, spec.tokens, CTX), generator=g),
        "pooled_output": torch.randn((1, POOLED), generator=g) if spec.pooled else None,
    }
    if spec.mask is not None:  # sd1_clip returns masks as long tensors
        mask = torch.zeros((1, spec.tokens), dtype=torch.long)
        mask[:, :spec.mask] = 1
        cond["attention_mask"] = mask
    for name, shape in spec.extra.items():
        cond[name] = torch.randn(shape, generator=g)
    return {"latent": torch.randn(spec.latent, generator=g), "cond": cond}


def denoise(patcher, family: str, seed: int = 0) -> torch.Tensor:
    """One real denoiser call on `patcher`'s model (patches applied), the way comfy/samplers.py
    makes it: extra_conds (encode_model_conds), process_cond + cond_cat, transformer_options from
    the patcher's model_options, apply_model at the middle sigma of the model's schedule."""
    import comfy.model_management
    import comfy.patcher_extension
    import comfy.samplers

    inputs = sample_inputs(family, seed)
    noise, cond = inputs["latent"], inputs["cond"]
    comfy.model_management.load_models_gpu([patcher])
    model = patcher.model
    device = patcher.load_device
    latent_image = torch.zeros_like(noise)  # txt2img: an empty latent
    with torch.no_grad():
        # Same params as samplers.encode_model_conds (its width/height formula, 5-D latents included).
        model_conds = model.extra_conds(
            **cond, device=device, noise=noise, width=noise.shape[3] * 8, height=noise.shape[2] * 8,
            prompt_type="positive", latent_image=latent_image, denoise_mask=None, seed=seed)
        c = comfy.samplers.cond_cat([{k: v.process_cond(batch_size=noise.shape[0], area=None)
                                      for k, v in model_conds.items()}])
        sigma = torch.tensor([float(model.model_sampling.percent_to_sigma(0.5))])
        x = model.model_sampling.noise_scaling(sigma, noise, latent_image)
        options = comfy.patcher_extension.merge_nested_dicts(
            {}, patcher.model_options.get("transformer_options", {}), copy_dict1=False)
        options.update(cond_or_uncond=[0], uuids=[None], sigmas=sigma)
        c["transformer_options"] = options
        wrapper = patcher.model_options.get("model_function_wrapper")
        if wrapper is not None:
            return wrapper(model.apply_model, {"input": x, "timestep": sigma, "c": c, "cond_or_uncond": [0]})
        return model.apply_model(x, sigma, **c)


def attention_linear_keys(family: str) -> list[str]:
    """State-dict keys ("diffusion_model.<path>.weight") of the family's attention projection
    linears (2-D weights), in model order."""
    patterns = [re.compile(p) for p in _spec(family).attention]
    sd = build(family).model.diffusion_model.state_dict()
    keys = []
    for key, tensor in sd.items():
        if key.endswith(".weight") and tensor.ndim == 2 and any(p.search(key[:-len(".weight")]) for p in patterns):
            keys.append("diffusion_model." + key)
    return keys
