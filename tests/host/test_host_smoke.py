"""Smoke tests of the in-process ComfyUI host and the tiny models (tests/host_fixture)."""
import os

import pytest
import torch

SD15 = "lw_tiny_sd15.safetensors"
SDXL = "lw_tiny_sdxl.safetensors"
FLUX = "lw_tiny_flux.safetensors"


def load_unet(host, name):
    prompt = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}}
    return host.run(prompt, outputs=["1"])["1"].output(0)


def latent_of(host, prompt):
    return host.run(prompt)["5"].output(0)["samples"]


def write_random_lora(path, model, rank=4, scale=0.05, seed=0):
    """A kohya-style LoRA on every transformer linear of the loaded tiny SD1.5 UNet."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, weight in sorted(model.model.state_dict().items()):
        if "transformer_blocks" not in key or not key.endswith(".weight") or weight.ndim != 2:
            continue
        name = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
        out_dim, in_dim = weight.shape
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, in_dim, generator=gen) * scale
        tensors[f"{name}.lora_up.weight"] = torch.randn(out_dim, rank, generator=gen) * scale
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path))
    return len(tensors) // 3


def test_custom_nodes_loaded_through_comfyui(comfy_host):
    assert "lw_test_fixture" in comfy_host.nodes.LOADED_MODULE_DIRS
    assert "KSampler" in comfy_host.nodes.NODE_CLASS_MAPPINGS
    import comfy.supported_models
    names = [cls.__name__ for cls in comfy.supported_models.models[:3]]
    assert names == ["LWTinySD15", "LWTinySDXL", "LWTinyFlux"]


def test_tiny_sd15_checkpoint_loads(comfy_host):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}}}
    model, clip, vae = comfy_host.run(prompt, outputs=["1"])["1"].outputs[:3]
    model, clip, vae = model[0], clip[0], vae[0]
    assert type(model.model.model_config).__name__ == "LWTinySD15"
    n_params = sum(p.numel() for p in model.model.diffusion_model.parameters())
    assert 0.9e6 < n_params < 1.2e6
    assert model.model.diffusion_model.dtype == torch.float32
    tokens = clip.tokenize("a tiny red fox")
    cond = clip.encode_from_tokens(tokens)
    assert tuple(cond.shape) == (1, 77, 32) and torch.isfinite(cond).all()
    assert vae.latent_channels == 4 and type(vae.first_stage_model).__name__ == "TAESD"


def test_txt2img_runs_and_depends_on_seed(comfy_host, tiny_txt2img):
    out = comfy_host.run(tiny_txt2img(seed=1))
    images = out["7"].ui["images"]
    assert len(images) == 1
    png = comfy_host.output_dir / images[0]["subfolder"] / images[0]["filename"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = out["6"].output(0)
    assert tuple(pixels.shape) == (1, 64, 64, 3)
    assert 0.2 < pixels.mean().item() < 0.8 and pixels.std().item() > 0.05  # not blank, not saturated

    latent = out["5"].output(0)["samples"]
    assert tuple(latent.shape) == (1, 4, 8, 8)
    assert torch.isfinite(latent).all() and latent.std().item() > 1.0
    same = latent_of(comfy_host, tiny_txt2img(seed=1))
    other = latent_of(comfy_host, tiny_txt2img(seed=2))
    assert torch.equal(latent, same)  # deterministic on CPU
    assert (latent - other).abs().mean().item() > 0.1 * latent.abs().mean().item()


def test_lora_through_core_loader_moves_latent(comfy_host, tiny_txt2img):
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}}}
    model = comfy_host.run(prompt, outputs=["1"])["1"].output(0)
    lora = comfy_host.loras_dir / "lw_smoke_random.safetensors"
    assert write_random_lora(lora, model) > 10

    def with_lora(strength):
        prompt = tiny_txt2img(seed=3)
        prompt["8"] = {"class_type": "LoraLoader", "inputs": {
            "lora_name": lora.name, "strength_model": strength, "strength_clip": strength,
            "model": ["1", 0], "clip": ["1", 1]}}
        prompt["5"]["inputs"]["model"] = ["8", 0]
        return latent_of(comfy_host, prompt)

    try:
        base = latent_of(comfy_host, tiny_txt2img(seed=3))
        moved = with_lora(1.0)
        assert torch.isfinite(moved).all()
        assert (moved - base).abs().max().item() > 1e-3
        assert torch.equal(with_lora(0.0), base)
    finally:
        os.remove(lora)


def test_sd15_lora_key_map(comfy_host):
    import comfy.lora
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}}}
    model, clip = (o[0] for o in comfy_host.run(prompt, outputs=["1"])["1"].outputs[:2])
    unet_keys = comfy.lora.model_lora_keys_unet(model.model, {})
    target = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    assert unet_keys["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"] == target
    assert unet_keys["lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"] == target
    assert unet_keys["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q"] == target
    clip_keys = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, {})
    assert clip_keys["lora_te_text_model_encoder_layers_1_self_attn_q_proj"] == \
        "clip_l.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"


def test_tiny_sdxl_unet(comfy_host):
    import comfy.lora
    model = load_unet(comfy_host, SDXL)
    assert type(model.model.model_config).__name__ == "LWTinySDXL"
    assert type(model.model).__name__ == "SDXL"
    keys = comfy.lora.model_lora_keys_unet(model.model, {})
    target = "diffusion_model.input_blocks.3.1.transformer_blocks.0.attn2.to_k.weight"
    assert keys["lora_unet_input_blocks_3_1_transformer_blocks_0_attn2_to_k"] == target
    assert keys["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"] == target
    unet = model.model.diffusion_model
    with torch.inference_mode():
        eps = unet(torch.randn(1, 4, 8, 8), torch.tensor([500.0]),
                   context=torch.randn(1, 77, 64), y=torch.randn(1, 32 + 6 * 256))
    assert tuple(eps.shape) == (1, 4, 8, 8) and torch.isfinite(eps).all()


def test_tiny_flux_dit(comfy_host):
    import comfy.lora
    model = load_unet(comfy_host, FLUX)
    assert type(model.model.model_config).__name__ == "LWTinyFlux"
    assert type(model.model).__name__ == "Flux"
    keys = comfy.lora.model_lora_keys_unet(model.model, {})
    linear1 = "diffusion_model.single_blocks.0.linear1.weight"
    assert keys["diffusion_model.single_blocks.0.linear1_qkv"] == (linear1, (0, 0, 3 * 64))
    assert keys["transformer.single_transformer_blocks.0.attn.to_k"] == (linear1, (0, 64, 64))
    assert keys["transformer.single_transformer_blocks.0.proj_mlp"] == (linear1, (0, 192, 256))
    assert keys["transformer.transformer_blocks.0.attn.to_q"] == \
        ("diffusion_model.double_blocks.0.img_attn.qkv.weight", (0, 0, 64))
    assert keys["lora_unet_double_blocks_0_img_attn_qkv"] == "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    dit = model.model.diffusion_model
    with torch.inference_mode():
        out = dit(torch.randn(1, 16, 8, 8), torch.tensor([0.5]), context=torch.randn(1, 8, 32),
                  y=torch.randn(1, 32), guidance=torch.tensor([3.5]))
    assert tuple(out.shape) == (1, 16, 8, 8) and torch.isfinite(out).all()


def test_run_reports_validation_and_execution_errors(comfy_host, tiny_txt2img):
    prompt = tiny_txt2img()
    prompt["1"]["inputs"]["ckpt_name"] = "missing.safetensors"
    with pytest.raises(RuntimeError, match="missing.safetensors") as invalid:
        comfy_host.run(prompt)
    assert invalid.typename == "PromptError"

    broken = comfy_host.loras_dir / "lw_smoke_broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "2": {"class_type": "LoraLoaderModelOnly", "inputs": {
            "lora_name": broken.name, "strength_model": 1.0, "model": ["1", 0]}},
    }
    try:
        with pytest.raises(RuntimeError, match=r"LoraLoaderModelOnly \(node 2\) failed") as failed:
            comfy_host.run(prompt, outputs=["2"])
        assert failed.typename == "PromptError"
    finally:
        os.remove(broken)
