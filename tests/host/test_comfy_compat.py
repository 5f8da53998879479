"""Every ComfyUI internal nodes/comfy_compat.py relies on, checked against the real host: when
ComfyUI changes underneath the pack, these fail and name the one function to fix."""
import pytest
import tiny_families as tiny
import torch


@pytest.fixture(scope="module")
def compat(comfy_host):
    return comfy_host.pack.nodes.comfy_compat


@pytest.fixture
def flux(comfy_host):
    return tiny.build("flux").clone()


def test_written_against_the_pinned_host(compat):
    import comfyui_version
    assert comfyui_version.__version__ == compat.WRITTEN_AGAINST  # a new host: review this module first


def test_weight_patch_entries_read_and_write(compat, flux):
    key = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
    diff = torch.ones(tuple(flux.model.state_dict()[key].shape))
    flux.add_patches({key: ("diff", (diff,))}, 0.5, 0.25)
    (entry,) = compat.weight_patches(flux, key)
    assert (entry.strength_patch, entry.strength_model, entry.offset, entry.function) == (0.5, 0.25, None, None)
    assert entry.patch[0] == "diff"
    assert compat.has_weight_patches(flux)
    compat.set_weight_patches(flux, key, [])
    assert compat.weight_patches(flux, key) == [] and not compat.has_weight_patches(flux)


def test_original_weight_and_module_state_while_patched(compat, flux):
    import comfy.model_management as mm
    key = "diffusion_model.double_blocks.0.img_attn.proj.weight"
    base = flux.model.state_dict()[key].clone()
    flux.add_patches({key: ("diff", (torch.ones_like(base),))}, 1.0)
    assert compat.original_weight(flux, key) is None and not compat.weights_written_into_module(flux)
    mm.load_models_gpu([flux], force_full_load=True)
    try:
        assert torch.equal(compat.original_weight(flux, key), base)
        assert torch.equal(flux.model.state_dict()[key], base + 1)
        assert compat.weights_written_into_module(flux)
    finally:
        assert compat.unload_model(flux)
    assert all(loaded.model is not flux for loaded in mm.current_loaded_models)
    assert torch.equal(flux.model.state_dict()[key], base) and compat.original_weight(flux, key) is None
    assert not compat.unload_model(flux)  # not loaded: nothing to do


def test_object_patches_and_weight_copies(compat, flux):
    name = "diffusion_model.double_blocks.0.img_attn.qkv.forward"
    assert compat.current_object_patch(flux, name) is None
    marker = object()
    flux.add_object_patch(name, marker)
    assert compat.current_object_patch(flux, name) is marker
    assert hasattr(flux, "weight_inplace_update")
    compat.copy_weights_before_patching(flux)
    assert flux.weight_inplace_update is False


def test_every_registry_family_names_real_config_classes(compat, comfy_host):
    import comfy.supported_models as sm
    families = comfy_host.pack.lora_core.formats.families
    for family in families.FAMILIES:
        for name in family.host_configs:
            assert isinstance(getattr(sm, name, None), type), f"{family.name}: comfy.supported_models.{name} is gone"
    assert compat.config_class_names(tiny.build("wan22"))[:2] == ["WAN22_T2V", "WAN21_T2V"]


def test_core_conversions_before_mapping(compat):
    bfl = {"img_in.lora_A.weight": torch.zeros(2, 8), "img_in.lora_B.weight": torch.zeros(4, 2),
           "img_in.lora_B.bias": torch.zeros(4), "single_blocks.0.norm.key_norm.scale": torch.ones(4)}
    out = compat.convert_lora(bfl)
    assert {"diffusion_model.img_in.diff_b", "diffusion_model.img_in.reshape_weight",
            "diffusion_model.single_blocks.0.norm.key_norm.scale.set_weight"} <= set(out)
    fun = compat.convert_lora({"lora_unet__blocks_0_cross_attn_k.lora_down.weight": torch.zeros(1)})
    assert list(fun) == ["lora_unet_blocks_0_cross_attn_k.lora_down.weight"]


def test_training_swaps_give_rope_and_rms_norm_a_backward_and_are_undone(compat):
    import comfy.ldm.common_dit
    import comfy.ldm.flux.math as flux_math
    import comfy.ldm.wan.model as wan
    rope_before, rope1_wan, norm_before = flux_math.apply_rope, wan.apply_rope1, comfy.ldm.common_dit.rms_norm
    # v0.8.0 with comfy_kitchen (the host's requirements) binds the fused op in flux.math and the models
    swapped = compat.kitchen_rope_bindings()
    assert (flux_math, "apply_rope", rope_before) in swapped and (wan, "apply_rope1", rope1_wan) in swapped
    q = torch.randn(1, 2, 4, 8, requires_grad=True)
    freqs = torch.randn(1, 1, 4, 4, 2, 2)
    x = torch.randn(2, 3, 8, requires_grad=True)
    with compat.training_swaps():
        assert flux_math.apply_rope is not rope_before and wan.apply_rope1 is not rope1_wan
        qr, _ = flux_math.apply_rope(q, q, freqs)
        stream = x * 1.0
        y = comfy.ldm.common_dit.rms_norm(stream)
        stream.add_(1.0)  # a block updating its residual in place after the norm (LTX-Video)
        (qr.sum() + y.square().sum()).backward()
    assert q.grad is not None and x.grad is not None
    assert flux_math.apply_rope is rope_before and wan.apply_rope1 is rope1_wan
    assert comfy.ldm.common_dit.rms_norm is norm_before
