"""LoRA files across tools (issue 12), with the real libraries: diffusers 0.42, peft 0.21 and
lycoris-lora 4.1 (test-only requirements the host script installs; no weights are downloaded, the
diffusers models are tiny ones built from configs that match tests/host/tiny_families.py's).

  in:  files written by diffusers (model- and pipeline-level, alphas only in lora_adapter_metadata),
       peft (save_pretrained: adapter_config.json beside) and lycoris (LoRA, LoHa, LoKr), read by Load
       LoRA, give the weight changes those libraries' own fused weights have;
  out: files written by Train LoRA and Merge LoRA load in diffusers (load_lora_weights) with no key left
       over and give the weight changes ours have;
for SD1.x, SDXL and Flux. Deltas are compared layer by layer (ComfyUI's own unet_to_diffusers /
flux_to_diffusers maps pair the layers). Figures are printed (run with -s).
"""
from __future__ import annotations

import gc
import json
import logging
import shutil

import pytest
import tiny_families as tiny
import torch
from safetensors import safe_open

pytest.importorskip("diffusers")  # installed by scripts/comfy_host.py with the other test requirements
pytest.importorskip("peft")
pytest.importorskip("lycoris")

FAMILIES = ("sd15", "sdxl", "flux")
FAMILY_NAME = {"sd15": "SD1.x", "sdxl": "SDXL", "flux": "Flux", "flux_wide": "Flux"}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
FLUX_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
                "proj_mlp", "proj_out"]
TOL = 1e-5
FIGURES: dict[str, float] = {}


# ---------------------------------------------------------------- the diffusers side

def diffusers_model(family: str, seed: int = 0):
    """A tiny diffusers model with the attention layout (and so the LoRA shapes) of tiny.build(family)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    torch.manual_seed(seed)
    if family == "sd15":  # model_channels 32, channel_mult [1, 1, 2, 2], attention on the first three levels
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 32, 64, 64),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=tiny.CTX,
            attention_head_dim=8, norm_num_groups=32)
    if family == "sdxl":  # channel_mult [1, 2, 2], no attention on the first level, linear proj_in
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=1,
            cross_attention_dim=tiny.CTX, attention_head_dim=(1, 1, 1), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=tiny.POOLED + 6 * 256, norm_num_groups=32)
    if family == "flux_wide":  # WIDE_FLUX's layout: FLUX.1's width, one single block, no double block
        return FluxTransformer2DModel(
            patch_size=1, in_channels=64, num_layers=0, num_single_layers=1, attention_head_dim=128,
            num_attention_heads=24, joint_attention_dim=tiny.CTX, pooled_projection_dim=tiny.POOLED,
            guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    return FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,
        joint_attention_dim=tiny.CTX, pooled_projection_dim=tiny.POOLED, guidance_embeds=True,
        axes_dims_rope=(8, 12, 12))


# diffusers 0.42 converts kohya Flux files (lora_unet_single_blocks_N_linear1, ...) with FLUX.1's widths
# written into the converter (dims=[3072, 3072, 3072, 12288] for linear1), so the files we write for Flux
# are checked in diffusers on a Flux of that width: one single block, no double block (~200 M parameters).
WIDE_FLUX = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "hidden_size": 3072,
    "num_heads": 24, "axes_dim": [16, 56, 56], "mlp_ratio": 4.0, "theta": 10000, "depth": 0,
    "depth_single_blocks": 1, "context_in_dim": tiny.CTX, "vec_in_dim": tiny.POOLED, "qkv_bias": True,
    "guidance_embed": True, "txt_ids_dims": [], "yak_mlp": False, "txt_norm": False}
OUT_FAMILIES = ("sd15", "sdxl", "flux_wide")


def host_model(family: str, wide=None):
    """The ComfyUI model of a family: tiny_families' or, for 'flux_wide', the `wide` fixture's."""
    return wide if family == "flux_wide" else tiny.build(family)


def host_keys(family: str, model) -> list[str]:
    if family == "flux_wide":
        return [k for k in model.model.state_dict() if k.endswith((".linear1.weight", ".linear2.weight"))]
    return tiny.attention_linear_keys(family)


@pytest.fixture(scope="module")
def wide():
    """WIDE_FLUX as ComfyUI builds a detected Flux (tiny_families.build's way), seeded random weights."""
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.Flux(dict(WIDE_FLUX))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    tiny._fill_(model.diffusion_model, torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    yield patcher
    del patcher, model


def pipeline(family: str, model):
    """The family's diffusers pipeline around `model` alone (no text encoders, VAE or tokenizers)."""
    from diffusers import (
        DDIMScheduler,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    if family == "sd15":
        return StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=model,
                                       scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    if family == "sdxl":
        return StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None,
                                         tokenizer_2=None, unet=model, scheduler=DDIMScheduler())
    return FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)


def pipeline_class(family: str):
    from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
    return {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}.get(family, FluxPipeline)


def layer_map(family: str, host_model) -> dict[str, tuple[str, tuple | None]]:
    """diffusers module name -> (ComfyUI weight key, row slice or None), from ComfyUI's own maps."""
    import comfy.utils
    config = host_model.model.model_config.unet_config
    out = {}
    if family in ("sd15", "sdxl"):
        for d, c in comfy.utils.unet_to_diffusers(config).items():
            if d.endswith(".weight"):
                out[d[: -len(".weight")]] = ("diffusion_model." + c, None)
        return out
    for d, c in comfy.utils.flux_to_diffusers(config, output_prefix="diffusion_model.").items():
        if not d.endswith(".weight"):
            continue
        if isinstance(c, str):
            out[d[: -len(".weight")]] = (c, None)
        elif len(c) == 2 or c[2] is None:
            out[d[: -len(".weight")]] = (c[0], None if c[1] is None else tuple(c[1]))
    return out


def linear_weights(model) -> dict[str, torch.Tensor]:
    """Every linear's weight by module name (the base layer's for PEFT-wrapped ones)."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith((".base_layer", ".lora_A", ".lora_B")) \
                and ".lora_" not in name:
            out[name.removesuffix(".base_layer")] = module.weight.detach().clone()
        elif hasattr(module, "base_layer") and isinstance(module.base_layer, torch.nn.Linear):
            out[name] = module.base_layer.weight.detach().clone()
    return out


def changes(before: dict, after: dict) -> dict[str, torch.Tensor]:
    return {n: after[n] - before[n] for n in before if n in after and float((after[n] - before[n]).abs().max()) > 0}


class DiffusersLog(logging.Handler):
    """Every warning diffusers and peft log while loading (unexpected or missing keys among them)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        for name in ("diffusers", "peft"):
            logging.getLogger(name).addHandler(self)
        return self

    def __exit__(self, *exc):
        for name in ("diffusers", "peft"):
            logging.getLogger(name).removeHandler(self)

    def problems(self) -> list[str]:
        words = ("unexpected", "missing", "no lora keys associated", "not found", "were not used")
        return [m for m in self.messages if any(w in m.lower() for w in words) and "text_encoder" not in m]


def diffusers_load(family: str, path) -> dict[str, torch.Tensor]:
    """load_lora_weights(path) into a tiny diffusers model, fuse, return the changed weights; fails when
    diffusers leaves a key of the file unused or a module without its LoRA. Float64 (but the 200 M-parameter
    flux_wide), so that fusing (W + dW, then minus W) loses nothing of small changes."""
    model = diffusers_model(family)
    model = model if family == "flux_wide" else model.to(torch.float64)
    pipe = pipeline(family, model)
    with DiffusersLog() as log:
        pipe.load_lora_weights(str(path))
        wrapped = [n for n, m in model.named_modules() if isinstance(getattr(m, "base_layer", None), torch.nn.Linear)]
        before = {n: model.get_submodule(n).base_layer.weight.detach().clone() for n in wrapped}
        pipe.fuse_lora(lora_scale=1.0)
    assert not log.problems(), log.problems()
    out = changes(before, {n: model.get_submodule(n).base_layer.weight.detach() for n in wrapped})
    del pipe, model, before
    gc.collect()  # pipelines and PEFT hooks hold reference cycles: free the model now
    return out


# ---------------------------------------------------------------- the ComfyUI side

@pytest.fixture(scope="module")
def pack(comfy_host):
    return comfy_host.pack


def weights(patcher, family: str) -> dict[str, torch.Tensor]:
    """The weights LoRAs may change, as ComfyUI loads them for sampling (lora_fixtures.patched_weights,
    but for flux_wide only its two big linears: the rest is 600 MB that no test LoRA touches)."""
    import comfy.model_management as mm
    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        sd = patcher.model.state_dict()
        keys = host_keys(family, patcher) if family == "flux_wide" else list(sd)
        return {k: sd[k].detach().clone() for k in keys}
    finally:
        mm.unload_all_models()


def ours_changes(host_before: dict, host_after: dict, mapping: dict, names) -> dict[str, torch.Tensor]:
    """Our weight change per diffusers module name (sliced where ComfyUI fuses, e.g. Flux qkv)."""
    out = {}
    for name in names:
        key, offset = mapping[name]
        d = host_after[key] - host_before[key]
        if offset is not None:
            dim, start, length = offset
            d = d.narrow(dim, start, length)
        out[name] = d
    return out


def worst(ours: dict, theirs: dict) -> float:
    assert set(ours) == set(theirs), (sorted(set(ours) ^ set(theirs)))[:6]
    return max(float((ours[n].double() - theirs[n].double()).norm() / theirs[n].double().norm()) for n in theirs)


def host_changed(family: str, mapping: dict, before: dict, after: dict) -> set[str]:
    """diffusers names of every layer our patched model changed."""
    return {n for n, (key, offset) in mapping.items()
            if key in after and float((after[key] - before[key]).abs().max()) > 0
            and (offset is None or float((after[key] - before[key]).narrow(*offset).abs().max()) > 0)}


def load_with_workbench(pack, comfy_host, family: str, file_name: str, model=None):
    """(our changes by diffusers name, Load LoRA's report) for a file in the loras folder."""
    model = model if model is not None else tiny.build(family)
    out = pack.nodes.load_lora.LoadLoRA.execute(file_name, 1.0, 0.0, "merge", model=model).args
    patched, report = out[0], out[3]
    before, after = weights(model, family), weights(patched, family)
    mapping = layer_map(family, model)
    return ours_changes(before, after, mapping, host_changed(family, mapping, before, after)), report


def _randomize(model, seed: int, scale: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "hada_" in name or "lokr_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)


def peft_config(family: str, **kw):
    from peft import LoraConfig
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": FLUX_TARGETS if family == "flux" else UNET_TARGETS,
                         "init_lora_weights": False} | kw)


# ---------------------------------------------------------------- in: diffusers, peft, lycoris -> Load LoRA

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("level", ["model", "pipeline"])
def test_diffusers_files_read_with_diffusers_alphas(comfy_host, pack, family, level):
    """Alphas only in lora_adapter_metadata (lora_alpha 8 on rank 4, alpha_pattern to_k 16, rank_pattern
    to_v 2): Load LoRA applies what diffusers' fused weights hold, and says where each alpha came from."""
    from peft.utils import get_peft_model_state_dict
    model = diffusers_model(family)
    model.add_adapter(peft_config(family, alpha_pattern={"to_k": 16}, rank_pattern={"to_v": 2}))
    _randomize(model, seed=11)
    folder = comfy_host.loras_dir / "interop"
    name = f"diffusers_{level}_{family}.safetensors"
    if level == "model":  # bare module names: down_blocks.0...attn1.to_k.lora_A.weight
        model.save_lora_adapter(str(folder), weight_name=name)
    else:  # unet./transformer. prefixed names and metadata keys
        component = "transformer" if family == "flux" else "unet"
        layers = {f"{component}_lora_layers": get_peft_model_state_dict(model),
                  f"{component}_lora_adapter_metadata": model.peft_config["default"].to_dict()}
        pipeline_class(family).save_lora_weights(str(folder), weight_name=name, **layers)
    with safe_open(str(folder / name), "pt") as f:
        assert not any(k.endswith(".alpha") for k in f.keys()) and "lora_adapter_metadata" in f.metadata()
    before = linear_weights(model)
    model.fuse_lora()
    theirs = changes(before, linear_weights(model))
    ours, report = load_with_workbench(pack, comfy_host, family, f"interop/{name}")
    error = worst(ours, theirs)
    FIGURES[f"diffusers {level} -> Load LoRA, {family}"] = error
    print(f"\n{family} diffusers {level}-level file -> Load LoRA: {len(theirs)} layers, max rel. error {error:.1e}")
    assert error < TOL
    assert "alphas used: 8 from lora_adapter_metadata lora_alpha" in report
    assert "16 from lora_adapter_metadata alpha_pattern 'to_k'" in report


def test_peft_save_pretrained_folder_reads_its_adapter_config(comfy_host, pack):
    """get_peft_model(...).save_pretrained(): base_model.model.* names, lora_alpha only in adapter_config.json."""
    from peft import get_peft_model
    model = diffusers_model("sd15")
    peft_model = get_peft_model(model, peft_config("sd15", lora_alpha=32, use_rslora=True))
    _randomize(peft_model, seed=12)
    folder = comfy_host.loras_dir / "interop" / "peft_sd15"
    peft_model.save_pretrained(str(folder))
    assert (folder / "adapter_config.json").is_file()
    before = linear_weights(model)
    peft_model.merge_adapter()
    theirs = changes(before, linear_weights(model))
    ours, report = load_with_workbench(pack, comfy_host, "sd15", "interop/peft_sd15/adapter_model.safetensors")
    error = worst(ours, theirs)
    FIGURES["peft save_pretrained (rsLoRA) -> Load LoRA, sd15"] = error
    print(f"\npeft save_pretrained folder (rsLoRA, alpha 32, r 4) -> Load LoRA: max rel. error {error:.1e}")
    assert error < TOL and "from adapter_config.json lora_alpha (rsLoRA" in report


LYCORIS = [("sd15", "lora"), ("sd15", "loha"), ("sd15", "lokr"), ("sdxl", "loha"), ("flux", "lokr"),
           ("flux", "lora")]


def lycoris_applied(model, network) -> dict[str, torch.Tensor]:
    """The weight change each lycoris module applies when the network runs (its forward on an identity
    input, network applied minus restored), by diffusers module name."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    with torch.no_grad():
        for lora in network.loras:
            module = lora.org_module[0]
            eye = torch.eye(module.in_features)
            applied = module(eye)
            lora.restore()
            out[names[id(module)]] = (applied - module(eye)).T
            lora.apply_to()
    return out


@pytest.mark.parametrize("family,algo", LYCORIS)
def test_lycoris_files_read_as_lycoris_applies_them(comfy_host, pack, family, algo):
    """LyCORIS LoRA, LoHa and LoKr files (lycoris_ + diffusers path names), alpha 2 on dim 4: Load LoRA
    changes each layer as the lycoris network changes it when it runs. (lycoris-lora 4.1.3's own
    merge_to scales LoHa/LoKr by (alpha/dim)^2, its forward, ComfyUI and A1111 by alpha/dim: the
    figure is printed.)"""
    from lycoris import LycorisNetwork, create_lycoris
    LycorisNetwork.apply_preset({"target_module": [], "target_name": (
        [r".*attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|to_add_out)$"] if family == "flux"
        else [r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)$"]), "use_fnmatch": False})
    model = diffusers_model(family)
    extra = {"factor": 4} if algo == "lokr" else {}
    network = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo=algo, **extra)
    network.apply_to()
    _randomize(network, seed=13, scale=0.3)  # changes well above float32 rounding of the forward
    name = f"lycoris_{algo}_{family}.safetensors"
    path = comfy_host.loras_dir / "interop" / name
    path.parent.mkdir(exist_ok=True)
    network.save_weights(str(path), torch.float32, {})
    theirs = lycoris_applied(model, network)
    network.restore()
    before = linear_weights(model)
    network.merge_to(1.0)
    merged = changes(before, linear_weights(model))
    ours, report = load_with_workbench(pack, comfy_host, family, f"interop/{name}")
    error, merge_gap = worst(ours, theirs), worst(merged, theirs)
    FIGURES[f"lycoris {algo} -> Load LoRA, {family}"] = error
    print(f"\n{family} lycoris {algo} ({len(network.loras)} modules) -> Load LoRA: max rel. error {error:.1e} "
          f"(lycoris' own merge_to vs its forward: {merge_gap:.1e})")
    assert error < TOL and "0 unmatched" in report


# ---------------------------------------------------------------- out: Train LoRA, Merge LoRA -> diffusers

def _train_args(model, name):
    return {"model": model, "clip": None, "vae": None, "images": [], "captions": "", "trigger_word": "tok",
            "output_name": name, "scope": "", "rank": 4, "alpha": 2.0, "targets": "attention", "steps": 1,
            "learning_rate": 1e-1, "batch_size": 1, "grad_accumulation": 1, "optimizer": "adamw",
            "lr_schedule": "constant", "warmup_steps": 0, "seed": 0, "resolution": 64, "bucketing": True,
            "noise_offset": 0.0, "min_snr_gamma": 5.0, "gradient_checkpointing": False,
            "training_dtype": "float32", "save_every": 0, "sample_prompt": "", "sample_every": 0,
            "resume_from": "None"}


def _train(pack, family, name, model=None):
    model = model if model is not None else tiny.build(family)
    inputs = tiny.sample_inputs("flux" if family == "flux_wide" else family, 0)
    cond = dict(inputs["cond"])
    samples = pack.nodes.train_bridge.build_samples(model, [inputs["latent"][0]], [[cond.pop("cross_attn"), cond]])
    with torch.inference_mode(False), torch.enable_grad():
        run = pack.nodes.train_lora.TrainingRun(_train_args(model, name))
        run.train(samples)
        return model, run, run.outputs()


def _standard_keys(family: str, keys) -> None:
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    if family.startswith("flux"):  # kohya/musubi: lora_unet_ + ComfyUI's path
        assert all(m.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for m in modules), modules
    else:  # kohya sd-scripts: lora_unet_ + the diffusers path
        assert all(m.startswith(("lora_unet_down_blocks_", "lora_unet_mid_block_", "lora_unet_up_blocks_"))
                   for m in modules), sorted(modules)[:4]


@pytest.mark.parametrize("family", OUT_FAMILIES)
def test_train_lora_file_loads_in_diffusers_with_our_weights(comfy_host, pack, wide, family):
    model, run, out = _train(pack, family, f"interop/trained_{family}", host_model(family, wide))
    path = comfy_host.loras_dir / "interop" / f"trained_{family}.safetensors"
    with safe_open(str(path), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
        assert {float(f.get_tensor(k)) for k in keys if k.endswith(".alpha")} == {2.0}
    _standard_keys(family, keys)
    assert "modelspec.date" not in meta and "date" not in json.loads(meta["lw.provenance"])
    before, after = weights(model, family), weights(out.args[0], family)
    mapping = layer_map(family, model)
    ours = ours_changes(before, after, mapping, host_changed(family, mapping, before, after))
    theirs = diffusers_load(family, path)
    error = worst(ours, theirs)
    FIGURES[f"Train LoRA -> diffusers, {family}"] = error
    print(f"\n{family} Train LoRA file ({len(keys) // 3} modules) -> diffusers load_lora_weights: {len(theirs)} "
          f"layers, max rel. error {error:.1e}")
    assert error < TOL


def _kohya_parent(family: str, keys, shapes, rank: int, alpha: float, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key in keys:
        n = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
        rows, cols = shapes[key]
        sd[f"{n}.lora_up.weight"] = torch.randn(rows, rank, generator=g) * 0.2
        sd[f"{n}.lora_down.weight"] = torch.randn(rank, cols, generator=g) * 0.2
        sd[f"{n}.alpha"] = torch.tensor(alpha)
    return sd


def _diffusers_parent(family: str, host_model, keys, folder, name: str) -> None:
    """A diffusers-written parent (bare names, alpha in the header) on the layers of `keys` only."""
    mapping = {k: n for n, (k, offset) in layer_map(family, host_model).items() if offset is None}
    model = diffusers_model(family, seed=5)
    model.add_adapter(peft_config(family, r=8, lora_alpha=4, target_modules=[mapping[k] for k in keys]))
    _randomize(model, seed=14)
    model.save_lora_adapter(str(folder), weight_name=name)


@pytest.mark.parametrize("family", OUT_FAMILIES)
def test_merge_lora_file_of_parents_with_other_ranks_loads_in_diffusers(comfy_host, pack, wide, family):
    """Parents of ranks 2 (alpha 1) and 8 (alpha 4), the second on half the layers only (SD: written by
    diffusers with bare names, its alpha in the header; Flux: kohya names): the concat merge has ranks 10
    and 2 per layer, one alpha in the file, and diffusers gives the exact weighted sum, where the same
    merge written with alpha = rank per module (as before) is off in diffusers."""
    from safetensors.torch import save_file
    model = host_model(family, wide)
    keys = host_keys(family, model)
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    folder = comfy_host.loras_dir / "interop"
    folder.mkdir(exist_ok=True)
    a, b = f"merge_a_{family}.safetensors", f"merge_b_{family}.safetensors"
    save_file(_kohya_parent(family, keys, shapes, 2, 1.0, seed=21), str(folder / a),
              {"ss_base_model_version": pack.lora_core.formats.families.family(FAMILY_NAME[family]).base_model_version})
    half = keys[::2]
    if family == "flux_wide":
        save_file(_kohya_parent(family, half, shapes, 8, 4.0, seed=22), str(folder / b))
    else:
        _diffusers_parent(family, model, half, folder, b)
    rows = {"lora_1": f"interop/{a}", "on_1": True, "strength_model_1": 0.7, "strength_clip_1": 0.0,
            "lora_2": f"interop/{b}", "on_2": True, "strength_model_2": -0.5, "strength_clip_2": 0.0}
    merged, file_name, report = pack.nodes.merge_lora.MergeLoRA.execute(
        method="concat", target_rank=64, rank_mode="fixed", energy=0.95, density=0.5, seed=0,
        output_name=f"interop/merged_{family}", scope="", **rows).args
    assert sorted({x.rank for x in merged.adapters.values()}) == [2, 10]
    path = comfy_host.loras_dir / file_name
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    _standard_keys(family, tensors)
    assert len({float(t) for k, t in tensors.items() if k.endswith(".alpha")}) == 1
    parents = json.loads(meta["lw.provenance"])["parents"]
    assert all(len(p["sha256"]) == 64 and len(p["data_sha256"]) == 64 for p in parents)

    # The exact weighted sum: the parents through Load LoRA, chained (each checked against its tool above).
    host = model
    for name, strength in ((a, 0.7), (b, -0.5)):
        host = pack.nodes.load_lora.LoadLoRA.execute(f"interop/{name}", strength, 0.0, "merge", model=host).args[0]
    before, after = weights(model, family), weights(host, family)
    mapping = layer_map(family, model)
    exact = ours_changes(before, after, mapping, host_changed(family, mapping, before, after))
    theirs = diffusers_load(family, path)
    error = worst(exact, theirs)
    mine = load_with_workbench(pack, comfy_host, family, file_name, model)[0]

    # The same merge with alpha = rank per module (what files had before): diffusers keeps one alpha.
    old = {k: t for k, t in tensors.items() if not k.endswith(".alpha")}
    alpha = float(next(t for k, t in tensors.items() if k.endswith(".alpha")))
    for k in [k for k in old if k.endswith(".lora_up.weight")]:
        module = k[: -len(".lora_up.weight")]
        rank = old[k].shape[1]
        old[k] = old[k] * (alpha / rank)
        old[f"{module}.alpha"] = torch.tensor(float(rank))
    save_file(old, str(folder / f"merged_old_{family}.safetensors"))
    old_error = worst(exact, diffusers_load(family, folder / f"merged_old_{family}.safetensors"))
    FIGURES[f"Merge LoRA -> diffusers, {family}"] = error
    FIGURES[f"same merge, alpha = rank per module -> diffusers, {family}"] = old_error
    print(f"\n{family} concat merge of ranks 2 and 8 ({len(theirs)} layers) -> diffusers: max rel. error {error:.1e} "
          f"(Load LoRA {worst(mine, exact):.1e}); written with alpha = rank per module: {old_error:.1%}")
    assert error < TOL and worst(mine, exact) < TOL
    if family != "flux_wide":  # why one alpha per file: for SD files diffusers applies only the most common alpha
        assert old_error > 0.1  # (its kohya Flux converter bakes each module's alpha in, so both forms work there)


def test_same_merge_twice_is_the_same_file_and_parents_keep_their_identity(comfy_host, pack):
    """Byte-identical files for identical inputs; a renamed, re-tagged parent keeps its data_sha256."""
    from safetensors.torch import save_file
    model = tiny.build("sd15")
    keys = tiny.attention_linear_keys("sd15")
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    folder = comfy_host.loras_dir / "interop"
    folder.mkdir(exist_ok=True)
    save_file(_kohya_parent("sd15", keys, shapes, 2, 1.0, seed=31), str(folder / "id_parent.safetensors"),
              {"ss_output_name": "first"})
    tensors = {}
    with safe_open(str(folder / "id_parent.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(folder / "id_parent_renamed.safetensors"), {"ss_output_name": "re-tagged", "x": "y"})

    def merge(parent, out):
        rows = {"lora_1": f"interop/{parent}", "on_1": True, "strength_model_1": 0.5, "strength_clip_1": 0.0}
        return pack.nodes.merge_lora.MergeLoRA.execute(
            method="svd", target_rank=2, rank_mode="fixed", energy=0.95, density=0.5, seed=0,
            output_name=f"interop/{out}", scope="s", **rows).args[1]

    one, two = merge("id_parent.safetensors", "same_a"), merge("id_parent.safetensors", "same_b")
    data = [(comfy_host.loras_dir / n).read_bytes() for n in (one, two)]
    # The title (output_name) is in the file: identical apart from it, and byte-identical once equal.
    assert data[0] == data[1].replace(b"same_b", b"same_a")
    again = merge("id_parent.safetensors", "same_a")
    assert (comfy_host.loras_dir / again).read_bytes() == data[0]
    renamed = merge("id_parent_renamed.safetensors", "same_c")
    with safe_open(str(comfy_host.loras_dir / one), "pt") as f, \
            safe_open(str(comfy_host.loras_dir / renamed), "pt") as g:
        p1 = json.loads(f.metadata()["lw.provenance"])["parents"][0]
        p2 = json.loads(g.metadata()["lw.provenance"])["parents"][0]
    assert p1["sha256"] != p2["sha256"] and p1["data_sha256"] == p2["data_sha256"]


def test_train_lora_same_inputs_same_bytes_and_resume_from_a_standard_named_file(comfy_host, pack):
    """Two identical runs give one file, byte for byte (no date anywhere); a run resumed from that file
    (SD1.x names: diffusers paths) starts from its weights and names it by its tensor data."""
    _, _, _ = _train(pack, "sd15", "interop/twice_a")
    _, _, _ = _train(pack, "sd15", "interop/twice_b")
    a = (comfy_host.loras_dir / "interop" / "twice_a.safetensors").read_bytes()
    b = (comfy_host.loras_dir / "interop" / "twice_b.safetensors").read_bytes()
    assert a == b.replace(b"twice_b", b"twice_a")
    model = tiny.build("sd15")
    inputs = tiny.sample_inputs("sd15", 0)
    cond = dict(inputs["cond"])
    samples = pack.nodes.train_bridge.build_samples(model, [inputs["latent"][0]], [[cond.pop("cross_attn"), cond]])
    args = _train_args(model, "interop/resumed") | {"resume_from": "interop/twice_a.safetensors", "steps": 2}
    with torch.inference_mode(False), torch.enable_grad():
        run = pack.nodes.train_lora.TrainingRun(args)
        run.train(samples)
    resumed = run.provenance["resumed_from"]
    assert resumed["data_sha256"] == pack.lora_core.formats.safetensors_io.data_sha256(
        str(comfy_host.loras_dir / "interop" / "twice_a.safetensors"))


def test_print_figures():
    """The figures of this module's tests (-s shows them), for the README's table."""
    for key, value in sorted(FIGURES.items()):
        print(f"{key:60s} {value:.2e}")


@pytest.fixture(scope="module", autouse=True)
def _clean_interop(comfy_host):
    yield
    shutil.rmtree(comfy_host.loras_dir / "interop", ignore_errors=True)
