"""LW_LoadLoRA inside a real ComfyUI: parity with core LoraLoader, errors, restore, bypass."""
import pytest
import torch

from lora_factory import LAYOUTS, lora_state_dict, low_rank_factors
from lora_fixtures import (
    SD15,
    attention_targets,
    clip_targets,
    kohya_factors,
    kohya_name,
    lycoris_state_dict,
    max_relative_error,
    patched_weights,
    sampler_prompt,
    save_lora,
)


@pytest.fixture(scope="module")
def sd15(comfy_host):
    model, clip, _vae = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SD15)[:3]
    return model, clip


@pytest.fixture(scope="module")
def load_node(comfy_host):
    return comfy_host.pack.nodes.load_lora.LoadLoRA


def ours(load_node, name, model, clip, s_model=0.8, s_clip=0.6, mode="merge"):
    """(MODEL, CLIP, LORA, report); the trigger_words output is tested in test_block_weights.py."""
    out = load_node.execute(name, s_model, s_clip, mode, model=model, clip=clip)
    return out.args[:4]


def core(comfy_host, name, model, clip, s_model=0.8, s_clip=0.6):
    return comfy_host.nodes.LoraLoader().load_lora(model, clip, name, s_model, s_clip)


def assert_parity(ours_patcher, core_patcher, keys, tol=1e-5):
    mine, theirs = patched_weights(ours_patcher), patched_weights(core_patcher)
    assert max_relative_error(mine, theirs, keys) < tol


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_each_low_rank_layout_matches_core_on_unet_and_clip(comfy_host, sd15, load_node, layout):
    model, clip = sd15
    name = save_lora(comfy_host.loras_dir, f"parity_{layout}.safetensors",
                     lora_state_dict(kohya_factors(model, clip, rank=4, seed=1), alpha=2.0, layout=layout))
    m, c, lora, report = ours(load_node, name, model, clip)
    cm, cc = core(comfy_host, name, model, clip)
    unet_keys, clip_keys = list(attention_targets(model)), list(clip_targets(clip))
    assert len(unet_keys) == 56 and len(clip_keys) == 8  # 7 transformer blocks x 8; 2 CLIP layers x 4
    assert_parity(m, cm, unet_keys)
    assert_parity(c.patcher, cc.patcher, clip_keys)
    assert f"model: {len(unet_keys)} matched, 0 unmatched" in report
    assert f"clip: {len(clip_keys)} matched, 0 unmatched" in report


@pytest.mark.parametrize("kind", ["loha", "lokr", "dora"])
def test_lycoris_and_dora_match_core(comfy_host, sd15, load_node, kind):
    model, clip = sd15
    name = save_lora(comfy_host.loras_dir, f"parity_{kind}.safetensors", lycoris_state_dict(model, kind, seed=3))
    m, _, lora, report = ours(load_node, name, model, None, s_model=0.7)
    cm, _ = core(comfy_host, name, model, None, s_model=0.7)
    assert_parity(m, cm, list(attention_targets(model)))
    assert kind in report


def test_modern_peft_keys_core_misses_equal_their_kohya_twin(comfy_host, sd15, load_node):
    import comfy.utils
    model, _ = sd15
    factors = kohya_factors(model, rank=4, seed=5)
    to_diffusers = {ldm: d for d, ldm in comfy.utils.unet_to_diffusers(model.model.model_config.unet_config).items()}
    peft = {}
    for key in attention_targets(model):
        up, down = factors[kohya_name(key)]
        dname = "unet." + to_diffusers[key[len("diffusion_model."):]][:-len(".weight")]
        peft[f"{dname}.lora_A.weight"], peft[f"{dname}.lora_B.weight"] = down, up
    peft_name = save_lora(comfy_host.loras_dir, "modern_peft.safetensors", peft)
    twin = save_lora(comfy_host.loras_dir, "kohya_twin.safetensors", lora_state_dict(factors, alpha=None))
    keys = list(attention_targets(model))
    base = patched_weights(model)
    core_peft = patched_weights(core(comfy_host, peft_name, model, None)[0])
    assert max_relative_error(core_peft, base, keys) == 0.0  # core maps none of these keys
    m_peft, _, _, report = ours(load_node, peft_name, model, None)
    m_twin, _, _, _ = ours(load_node, twin, model, None)
    assert_parity(m_peft, m_twin, keys, tol=1e-7)
    assert max_relative_error(patched_weights(m_peft), base, keys) > 1e-3  # and it really changed them
    assert f"model: {len(keys)} matched, 0 unmatched" in report


def test_sdxl_layout_matches_core(comfy_host, load_node):
    model = comfy_host.nodes.UNETLoader().load_unet("lw_tiny_sdxl.safetensors", "default")[0]
    name = save_lora(comfy_host.loras_dir, "sdxl.safetensors",
                     lora_state_dict(kohya_factors(model, rank=4, seed=7), alpha=4.0),
                     {"ss_base_model_version": "sdxl_base_v1-0"})
    m = ours(load_node, name, model, None)[0]
    cm = core(comfy_host, name, model, None)[0]
    assert_parity(m, cm, list(attention_targets(model)))


def test_flux_fused_qkv_slices_match_core(comfy_host, load_node):
    import comfy.utils
    model = comfy_host.nodes.UNETLoader().load_unet("lw_tiny_flux.safetensors", "default")[0]
    mapping = comfy.utils.flux_to_diffusers(model.model.model_config.unet_config, output_prefix="diffusion_model.")
    sd_shapes = {k: v.shape for k, v in model.model.state_dict().items()}
    shapes, targets = {}, set()
    for dkey, target in mapping.items():
        if not dkey.endswith(".weight") or not any(s in dkey for s in (".to_q.", ".to_k.", ".to_v.", "proj_out")):
            continue
        key, offset = (target, None) if isinstance(target, str) else target[:2]
        if offset is not None and offset[0] != 0:
            continue
        rows = offset[2] if offset else sd_shapes[key][0]
        shapes["transformer." + dkey[:-len(".weight")]] = (rows, sd_shapes[key][1])
        targets.add(key)
    assert any(".to_q" in k for k in shapes) and any("single_transformer_blocks" in k for k in shapes)
    name = save_lora(comfy_host.loras_dir, "flux.safetensors",
                     lora_state_dict(low_rank_factors(shapes, 4, seed=9), alpha=None, layout="peft"))
    m, _, _, report = ours(load_node, name, model, None)
    cm = core(comfy_host, name, model, None)[0]
    assert_parity(m, cm, sorted(targets))
    assert f"model: {len(shapes)} matched, 0 unmatched" in report


def test_lora_for_another_base_is_a_clear_error(comfy_host, sd15, load_node):
    from lora_core import WrongBaseModelError  # noqa: F401  (the pack's copy raises an equal-named class)
    model, clip = sd15
    sdxl = comfy_host.nodes.UNETLoader().load_unet("lw_tiny_sdxl.safetensors", "default")[0]
    name = save_lora(comfy_host.loras_dir, "made_for_sd15.safetensors",
                     lora_state_dict(kohya_factors(model, rank=4, seed=11), alpha=4.0),
                     {"ss_base_model_version": "sd_v1"})
    with pytest.raises(Exception) as err:
        ours(load_node, name, sdxl, None)
    msg = str(err.value)
    assert type(err.value).__name__ == "WrongBaseModelError"
    assert "made_for_sd15.safetensors" in msg and "SD1.x" in msg and "SDXL" in msg and "of 56 model layers" in msg


def test_bad_files_and_names(comfy_host, sd15, load_node):
    model, clip = sd15
    (comfy_host.loras_dir / "old.pt").write_bytes(b"\x80\x04\x95" + b"\0" * 32)
    with pytest.raises(Exception, match=r"old\.pt: pickle-based checkpoints are refused"):
        ours(load_node, "old.pt", model, clip)
    with pytest.raises(Exception, match=r"'\.\./escape\.safetensors': names may not contain '\.\.'"):
        ours(load_node, "../escape.safetensors", model, clip)
    with pytest.raises(Exception, match=r"LoRA 'missing\.safetensors' not found in the loras folders"):
        ours(load_node, "missing.safetensors", model, clip)
    with pytest.raises(Exception, match="connect a MODEL, a CLIP, or both"):
        load_node.execute("x", 1.0, 1.0, "merge")


def test_shared_model_untouched_and_100_cycles_restore_bit_exactly(comfy_host, sd15, load_node):
    model, clip = sd15
    name = save_lora(comfy_host.loras_dir, "cycles.safetensors",
                     lora_state_dict(kohya_factors(model, clip, rank=4, seed=13), alpha=4.0))
    import comfy.model_management
    comfy.model_management.unload_all_models()
    original = {k: v.clone() for k, v in model.model.state_dict().items()}
    m, c, _, _ = ours(load_node, name, model, clip)
    assert not model.patches and not model.object_patches  # the shared base patcher is not mutated
    keys = list(attention_targets(model))
    changed = 0
    for _ in range(100):
        m.patch_model()
        changed += sum(not torch.equal(m.model.state_dict()[k], original[k]) for k in keys)
        m.unpatch_model()
    assert changed == 100 * len(keys)
    after = model.model.state_dict()
    assert all(torch.equal(after[k], original[k]) for k in original)


def test_chained_loaders_fuse_into_one_patch_per_weight_and_match_core(comfy_host, sd15, load_node):
    """Three Load LoRA nodes in a row write each weight once (one fused product), not three times;
    each node's own MODEL keeps its own patches, and the result equals core's chain."""
    model, clip = sd15
    names = [save_lora(comfy_host.loras_dir, f"chain_{i}.safetensors",
                       lora_state_dict(kohya_factors(model, None, rank=2 + i, seed=40 + i), alpha=2.0))
             for i in range(3)]
    strengths = (0.7, -0.4, 0.5)
    ours_chain, core_chain = [model], model
    for name, s in zip(names, strengths):
        ours_chain.append(ours(load_node, name, ours_chain[-1], None, s_model=s)[0])
        core_chain = comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(core_chain, name, s)[0]
    keys = list(attention_targets(model))
    for depth, patcher in enumerate(ours_chain[1:], start=1):
        for key in keys:
            (entry,) = patcher.patches[key]
            assert [t.strength for t in entry[1].terms] == list(strengths[:depth])
    assert not model.patches
    assert_parity(ours_chain[-1], core_chain, keys)


def _sample_prompt(lora_name, strength, mode, seed=3, strength_clip=None):
    load = {"class_type": "LW_LoadLoRA", "inputs": {
        "model": ["1", 0], "clip": ["1", 1], "lora_name": lora_name, "strength_model": strength,
        "strength_clip": strength if strength_clip is None else strength_clip, "mode": mode}}
    return sampler_prompt({"2": load}, seed=seed, cfg=3.0)


def test_bypass_latents_equal_merge_latents(comfy_host, sd15):
    # The tiny CLIP runs in fp16 on the CPU, where merged weights are stochastically rounded:
    # the UNet (fp32) is where merge and bypass must agree to 1e-4.
    model, clip = sd15
    name = save_lora(comfy_host.loras_dir, "bypass_vs_merge.safetensors",
                     lora_state_dict(kohya_factors(model, clip, rank=4, seed=17), alpha=4.0))
    latent = {}
    for mode, strength in (("merge", 1.0), ("bypass", 1.0), ("merge", 0.0)):
        out = comfy_host.run(_sample_prompt(name, strength, mode, strength_clip=0.0), outputs=["6"])
        latent[mode, strength] = out["6"].output(0)["samples"]
    merge, bypass, base = latent["merge", 1.0], latent["bypass", 1.0], latent["merge", 0.0]
    assert torch.isfinite(merge).all()
    assert (merge - base).abs().max() > 1e-3  # the LoRA moves the latent
    # The random tiny UNet's latents reach |x| ~ 350, so compare relative to their scale
    # (seen: 1.2e-3 absolute, 3.4e-6 relative, fp32 summation order).
    assert (bypass - merge).abs().max() / merge.abs().max() < 1e-5


@pytest.mark.parametrize("mode", ["merge", "bypass"])
def test_offloaded_lowvram_model_gives_the_same_output(comfy_host, sd15, load_node, mode):
    """With weights left offloaded, ComfyUI patches them on the fly through our adapter (or bypass)."""
    import comfy.model_management as mm
    model, clip = sd15
    name = save_lora(comfy_host.loras_dir, "lowvram.safetensors",
                     lora_state_dict(kohya_factors(model, rank=4, seed=23), alpha=4.0))
    patched = ours(load_node, name, model, None, s_model=0.9, mode=mode)[0]
    g = torch.Generator().manual_seed(0)
    x, sigma, context = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([2.0]), torch.randn(1, 77, 32, generator=g)
    mm.unload_all_models()
    mm.load_models_gpu([patched], force_full_load=True)
    with torch.no_grad():
        full = patched.model.apply_model(x, sigma, c_crossattn=context)
    mm.unload_all_models()
    patched.patch_model(lowvram_model_memory=1)  # nothing fits: every layer is cast and patched per use
    try:
        assert patched.model.model_lowvram
        with torch.no_grad():
            offloaded = patched.model.apply_model(x, sigma, c_crossattn=context)
    finally:
        patched.unpatch_model()
    with torch.no_grad():
        mm.load_models_gpu([model], force_full_load=True)
        base = model.model.apply_model(x, sigma, c_crossattn=context)
        mm.unload_all_models()
    assert (full - base).abs().max() > 1e-4
    assert ((offloaded - full).abs().max() / full.abs().max()) < 1e-5
