"""Every model family ComfyUI ships, on tiny seeded instances built by ComfyUI's own config classes:
load parity with core LoraLoader per naming style, bypass forward, a stack of two, a merge, and a short
training run whose file core loads with every key matched. Figures are printed (run with -s)."""
from __future__ import annotations

import json

import pytest
import tiny_families as tiny
import torch
from safetensors import safe_open

from lora_fixtures import max_relative_error, patched_weights, save_lora

FAMILY_NAME = {"sd15": "SD1.x", "sdxl": "SDXL", "flux": "Flux", "chroma": "Chroma", "qwen_image": "Qwen-Image",
               "wan21": "Wan 2.1", "wan22": "Wan 2.2", "hunyuan_video": "HunyuanVideo", "lumina2": "Lumina2",
               "z_image": "Z-Image", "hidream": "HiDream", "ltxv": "LTX-Video", "sd3": "SD3", "aura_flow": "AuraFlow"}
DITS = [f for f in tiny.FAMILIES if f not in ("sd15", "sdxl")]
# Prefixes of the names core's key map gives a layer; one LoRA file per style present in the map.
STYLES = ("lora_unet_", "lycoris_", "lora_transformer_", "diffusion_model.", "transformer.", "base_model.model.",
          "unet.")


def _style(name: str) -> str:
    return next((s for s in STYLES if name.startswith(s)), "bare")


def _target(entry):
    if not isinstance(entry, tuple):
        return entry, None
    return entry[0], None if entry[1] is None else tuple(entry[1])


def core_names_by_style(model, targets: set[str]) -> dict[str, dict[str, tuple]]:
    """style -> {LoRA module name: (weight key, offset)} for every attention target, from core's own map.
    Slices core places outside their weight are left out: core cannot load them either (v0.8.0 maps
    diffusers to_k/to_v of grouped-query Lumina2 as if k and v were as wide as q)."""
    import comfy.lora
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    styles: dict[str, dict[str, tuple]] = {}
    for name, entry in comfy.lora.model_lora_keys_unet(model.model, {}).items():
        key, offset = _target(entry)
        if key not in targets or (offset is not None and offset[1] + offset[2] > shapes[key][offset[0]]):
            continue
        seen = styles.setdefault(_style(name), {})
        if (key, offset) not in seen.values():
            seen[name] = (key, offset)
    return styles


def lora_for(names: dict[str, tuple], shapes: dict, rank=2, seed=0, scale=0.3, peft=False) -> dict:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (key, offset) in sorted(names.items()):
        rows, cols = shapes[key]
        rows = offset[2] if offset else rows
        up, down = torch.randn(rows, rank, generator=g) * scale, torch.randn(rank, cols, generator=g) * scale
        if peft:
            sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = down, up
        else:
            sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
            sd[f"{name}.alpha"] = torch.tensor(float(rank) * 0.5)
    return sd


@pytest.fixture(scope="module")
def pack(comfy_host):
    return comfy_host.pack


def _setup(family):
    model = tiny.build(family)
    keys = tiny.attention_linear_keys(family)
    shapes = {k: tuple(v.shape) for k, v in model.model.state_dict().items()}
    return model, keys, shapes


def _kohya_file(comfy_host, family, keys, shapes, seed, metadata=None):
    names = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_"): (k, None) for k in keys}
    return save_lora(comfy_host.loras_dir, f"fam_{family}_kohya_{seed}.safetensors",
                     lora_for(names, shapes, seed=seed), metadata)


def _ours(pack, name, model, strength=0.8, mode="merge"):
    return pack.nodes.load_lora.LoadLoRA.execute(name, strength, 0.0, mode, model=model).args[:4]  # no trigger_words


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_the_model_family_is_named_from_the_registry(pack, family):
    assert pack.nodes.comfy_bridge.model_family(tiny.build(family)) == FAMILY_NAME[family]


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_load_matches_core_for_every_naming_style_core_maps(comfy_host, pack, family):
    model, keys, shapes = _setup(family)
    styles = core_names_by_style(model, set(keys))
    assert "lora_unet_" in styles and "diffusion_model." in styles
    for style, names in sorted(styles.items()):
        peft = "." in style  # dotted names as diffusers/PEFT write them, underscored ones as kohya does
        name = save_lora(comfy_host.loras_dir, f"fam_{family}_{style.strip('._')}.safetensors",
                         lora_for(names, shapes, seed=3, peft=peft))
        mine, _, _, report = _ours(pack, name, model)
        theirs = comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 0.8)[0]
        error = max_relative_error(patched_weights(mine), patched_weights(theirs), keys)
        print(f"{family:14s} {style:18s} {len(names):3d} modules  max rel. error vs core {error:.1e}")
        assert error < 1e-5
        assert f"model: {len(names)} matched, 0 unmatched" in report
        assert f"applied to: {FAMILY_NAME[family]}" in report


@pytest.mark.parametrize("family", [f for f in DITS if f not in ("sd3", "aura_flow")])
def test_peft_names_core_misses_equal_their_transformer_twin(comfy_host, pack, family):
    """`base_model.model.<name>` (peft's save_pretrained) resolves to the same layers as the
    `transformer.<name>` file that core reads."""
    model, keys, shapes = _setup(family)
    styles = core_names_by_style(model, set(keys))
    prefix = "transformer." if "transformer." in styles else "diffusion_model."
    twin = styles[prefix]
    peft_names = {"base_model.model." + n[len(prefix):]: t for n, t in twin.items()}
    a = save_lora(comfy_host.loras_dir, f"fam_{family}_peft.safetensors", lora_for(peft_names, shapes, seed=5, peft=True))
    b = save_lora(comfy_host.loras_dir, f"fam_{family}_twin.safetensors", lora_for(twin, shapes, seed=5, peft=True))
    mine, theirs = _ours(pack, a, model)[0], comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, b, 0.8)[0]
    assert max_relative_error(patched_weights(mine), patched_weights(theirs), keys) < 1e-5


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_bypass_forward_equals_merge_forward(comfy_host, pack, family):
    model, keys, shapes = _setup(family)
    name = _kohya_file(comfy_host, family, keys, shapes, seed=7)
    base = tiny.denoise(model, family)
    merged = tiny.denoise(_ours(pack, name, model, mode="merge")[0], family)
    bypassed_model, _, _, report = _ours(pack, name, model, mode="bypass")
    bypassed = tiny.denoise(bypassed_model, family)
    moved = float((merged - base).norm() / base.norm())
    gap = float((bypassed - merged).norm() / merged.norm())
    print(f"{family:14s} LoRA moves the output by {moved:.3f}; bypass vs merge {gap:.1e}")
    assert moved > 1e-3 and gap < 1e-4
    assert f"{len(keys)} bypass" in report


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_stack_of_two_and_their_merge_equal_core_chained(comfy_host, pack, family):
    model, keys, shapes = _setup(family)
    spec = {"modelspec.architecture": _architecture(pack, family) + "/lora"}  # as the family's trainers write
    a, b = (_kohya_file(comfy_host, family, keys, shapes, seed=s, metadata=spec) for s in (11, 12))
    rows = {"lora_1": a, "on_1": True, "strength_model_1": 0.6, "strength_clip_1": 0.0,
            "lora_2": b, "on_2": True, "strength_model_2": -0.4, "strength_clip_2": 0.0}
    settings = {"mode": "merge", "clamp_weights": True, "weight_min": -1.0, "weight_max": 1.0, "use_budget": True,
                "budget": 1.5, "use_layer_cap": False, "layer_cap": 0.1, "decorrelate": False}
    stacked, _, stack_out, report, *_ = pack.nodes.stack_lora.StackLoRA.execute(model=model, **settings, **rows).args
    assert [s[1] for s in stack_out] == pytest.approx([0.6, -0.4])
    chain = model
    for name, strength in ((a, 0.6), (b, -0.4)):
        chain = comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(chain, name, strength)[0]
    core_weights = patched_weights(chain)
    assert max_relative_error(patched_weights(stacked), core_weights, keys) < 1e-5

    merge_rows = {"lora_1": a, "strength_model_1": 0.6, "strength_clip_1": 0.0,
                  "lora_2": b, "strength_model_2": -0.4, "strength_clip_2": 0.0}
    _, file_name, text = pack.nodes.merge_lora.MergeLoRA.execute(
        method="concat", target_rank=64, rank_mode="fixed", energy=0.95, density=0.5, seed=0,
        output_name=f"fam_{family}_merged", scope="", **merge_rows).args
    merged = comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, file_name, 1.0)[0]
    assert max_relative_error(patched_weights(merged), core_weights, keys) < 1e-5
    with safe_open(str(comfy_host.loras_dir / file_name), "pt") as f:
        assert f.metadata()["modelspec.architecture"].startswith(_architecture(pack, family))


def _architecture(pack, family) -> str:
    return pack.lora_core.formats.families.family(FAMILY_NAME[family]).architecture


def _train_args(model, name, checkpointing, steps=2):
    return {"model": model, "clip": None, "vae": None, "images": [], "captions": "", "trigger_word": "tok",
            "output_name": name, "scope": "", "rank": 2, "alpha": 0.0, "targets": "attention", "steps": steps,
            "learning_rate": 1e-2, "batch_size": 2, "grad_accumulation": 1, "optimizer": "adamw",
            "lr_schedule": "constant", "warmup_steps": 0, "seed": 0, "resolution": 64, "bucketing": True,
            "noise_offset": 0.0, "min_snr_gamma": 5.0, "gradient_checkpointing": checkpointing,
            "training_dtype": "float32", "save_every": 0, "sample_prompt": "", "sample_every": 0,
            "resume_from": "None"}


def _samples(pack, model, family, count=2):
    """The family's own conditioning (as its text encoder hands it to the sampler) for `count` latents."""
    latents, conditionings = [], []
    for seed in range(count):
        inputs = tiny.sample_inputs(family, seed)
        cond = dict(inputs["cond"])
        latents.append(inputs["latent"][0])
        conditionings.append([cond.pop("cross_attn"), cond])
    return pack.nodes.train_bridge.build_samples(model, latents, conditionings)


def _train(pack, model, family, name, checkpointing):
    with torch.inference_mode(False), torch.enable_grad():
        run = pack.nodes.train_lora.TrainingRun(_train_args(model, name, checkpointing))
        run.train(_samples(pack, model, family))
        return run, run.outputs()


@pytest.mark.parametrize("family", tiny.FAMILIES)
def test_training_saves_a_file_core_loads_with_every_key(comfy_host, pack, family):
    """Two steps with and without gradient checkpointing give the same LoRA (so neither path trains on
    tensors a DiT block updated in place), and the file loads in core with every module matched."""
    import comfy.lora
    model, keys, _ = _setup(family)
    runs = {ckpt: _train(pack, model, family, f"fam_{family}_trained_{int(ckpt)}", ckpt) for ckpt in (True, False)}
    run, out = runs[True]
    assert sorted(run.targets) == sorted(keys)  # the family's attention linears, by its own names
    assert len(run.losses) == 2 and all(torch.isfinite(torch.tensor(run.losses)))
    trained_model, lora = out.args[0], out.args[2]
    assert sum(float(a.roles["up"].abs().sum()) for a in lora.adapters.values()) > 0  # B moved off zero
    other = runs[False][1].args[2]
    gap = max(float((a.roles[r] - other.adapters[p].roles[r]).norm() / a.roles[r].norm())
              for p, a in lora.adapters.items() for r in ("up", "down"))
    assert gap < 1e-4, f"checkpointing changed the trained LoRA by {gap:.2e}"

    path = comfy_host.loras_dir / f"fam_{family}_trained_1.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    assert meta["modelspec.architecture"] == f"{_architecture(pack, family)}/lora"
    assert meta["lw.base_family"] == FAMILY_NAME[family] and meta["lw.partial"] == "false"
    assert json.loads(meta["lw.provenance"])["base_model_sha256"]
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    patches = comfy.lora.load_lora(tensors, key_map, log_missing=False)
    assert sorted(patches) == sorted(keys)  # every module of the file reached its layer in core
    core_model = comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, path.name, 1.0)[0]
    assert max_relative_error(patched_weights(trained_model), patched_weights(core_model), keys) < 1e-5
    print(f"{family:14s} {len(keys):3d} layers  loss {run.losses[0]:.4g} -> {run.losses[-1]:.4g}  "
          f"checkpointing vs not: {gap:.1e}")


def test_bfl_control_lora_with_biases_and_norm_scales_loads_as_core_does(comfy_host, pack):
    """BFL's Flux control LoRAs (`double_blocks.0.img_attn.qkv.lora_A.weight`, `img_in.lora_B.bias`,
    `...norm.key_norm.scale`) are converted by core before mapping; Load LoRA converts them the same way."""
    model, keys, shapes = _setup("flux")
    g = torch.Generator().manual_seed(21)
    sd = {}
    for key in keys + ["diffusion_model.img_in.weight"]:
        name = key[len("diffusion_model."):-len(".weight")]
        rows, cols = shapes[key]
        cols = cols * 2 if name == "img_in" else cols  # control LoRAs widen img_in for the control latent
        sd[f"{name}.lora_A.weight"] = torch.randn(2, cols, generator=g) * 0.3
        sd[f"{name}.lora_B.weight"] = torch.randn(rows, 2, generator=g) * 0.3
        sd[f"{name}.lora_B.bias"] = torch.randn(rows, generator=g) * 0.1
    norms = [k for k in shapes if k.endswith(("norm.key_norm.scale", "norm.query_norm.scale"))]
    assert "diffusion_model.single_blocks.0.norm.key_norm.scale" in norms
    for key in norms:
        sd[key[len("diffusion_model."):]] = 1.0 + torch.randn(shapes[key], generator=g) * 0.1
    name = save_lora(comfy_host.loras_dir, "fam_flux_bfl_control.safetensors", sd)
    mine, _, _, report = _ours(pack, name, model, strength=1.0)
    theirs = comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 1.0)[0]
    a, b, base = patched_weights(mine), patched_weights(theirs), model.model.state_dict()
    changed = [k for k in a if a[k].shape != base[k].shape or not torch.equal(a[k], base[k])]
    assert "diffusion_model.img_in.weight" in changed and a["diffusion_model.img_in.weight"].shape[1] == 128
    assert set(norms) <= set(changed)
    assert max_relative_error(a, b, list(b)) < 1e-6
    modules = len(keys) + 1 + len(norms)
    assert f"model: {modules} matched, 0 unmatched" in report


def test_wan_fun_lora_names_load_as_core_converts_them(comfy_host, pack):
    model, keys, shapes = _setup("wan21")
    names = {"lora_unet__" + k[len("diffusion_model."):-len(".weight")].replace(".", "_"): (k, None) for k in keys}
    assert "lora_unet__blocks_0_cross_attn_k" in names
    name = save_lora(comfy_host.loras_dir, "fam_wan_fun.safetensors", lora_for(names, shapes, seed=23))
    mine, _, _, report = _ours(pack, name, model)
    theirs = comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 0.8)[0]
    assert max_relative_error(patched_weights(mine), patched_weights(theirs), keys) < 1e-5
    assert f"model: {len(keys)} matched, 0 unmatched" in report and "made for: Wan 2.1" in report


@pytest.mark.parametrize("lora_family, model_family", [("flux", "sdxl"), ("wan21", "flux"), ("sd3", "qwen_image")])
def test_a_lora_for_another_family_is_refused_naming_both(comfy_host, pack, lora_family, model_family):
    _, keys, shapes = _setup(lora_family)
    name = _kohya_file(comfy_host, lora_family, keys, shapes, seed=31)
    with pytest.raises(pack.lora_core.WrongBaseModelError) as err:
        _ours(pack, name, tiny.build(model_family))
    assert f"looks made for {FAMILY_NAME[lora_family]} but the MODEL given is {FAMILY_NAME[model_family]}" \
        in str(err.value)


def test_a_lora_of_the_same_family_but_another_size_never_names_one_family_twice(comfy_host, pack):
    model, keys, shapes = _setup("flux")
    wrong = {k: (v[0] * 2, v[1]) if k in keys else v for k, v in shapes.items()}  # a bigger Flux's layers
    names = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_"): (k, None) for k in keys}
    name = save_lora(comfy_host.loras_dir, "fam_flux_other_size.safetensors", lora_for(names, wrong, seed=33))
    with pytest.raises(pack.lora_core.WrongBaseModelError) as err:
        _ours(pack, name, model)
    message = str(err.value)
    assert "made for Flux but the MODEL given is Flux" not in message
    assert "look like Flux, like the MODEL given, but it was made for another variant or size of Flux" in message


@pytest.fixture(scope="module")
def unregistered_family_model(comfy_host):
    """A family ComfyUI may add after the registry was written: Flux's network behind a config class
    the registry does not know (a BASE subclass, so no known class is in its hierarchy)."""
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.supported_models_base
    attributes = {k: v for k, v in vars(comfy.supported_models.Flux).items() if not k.startswith("__")}
    config_class = type("LWFutureDiT", (comfy.supported_models_base.BASE,), attributes)
    config = config_class(tiny.SPECS["flux"].unet_config)
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({})
    tiny._fill_(model.diffusion_model, torch.Generator().manual_seed(0))
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def test_an_unknown_family_loads_trains_and_saves_as_unknown(comfy_host, pack, unregistered_family_model):
    model = unregistered_family_model
    assert pack.nodes.comfy_bridge.model_family(model) == "unknown (LWFutureDiT)"
    _, keys, shapes = _setup("flux")
    name = _kohya_file(comfy_host, "future", keys, shapes, seed=41)
    mine, _, _, report = _ours(pack, name, model)  # core's key maps still reach every layer
    theirs = comfy_host.nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, 0.8)[0]
    assert max_relative_error(patched_weights(mine), patched_weights(theirs), keys) < 1e-5
    assert "applied to: unknown (LWFutureDiT)" in report

    with torch.inference_mode(False), torch.enable_grad():
        run = pack.nodes.train_lora.TrainingRun(_train_args(model, "fam_future_trained", True))
        # the layers named as attention: Flux's img/txt attention; its fused single blocks are not named so
        assert sorted(run.targets) == sorted(k for k in keys if "_attn." in k)
        run.train(_samples(pack, model, "flux"))
    with safe_open(str(comfy_host.loras_dir / "fam_future_trained.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["modelspec.architecture"] == "unknown/lora" and "ss_base_model_version" not in meta
    assert meta["lw.base_family"] == "unknown (LWFutureDiT)"


def test_save_problems_are_found_before_training_and_a_finished_run_keeps_its_weights(
        comfy_host, pack, monkeypatch, tmp_path):
    model, _, _ = _setup("wan21")
    train_lora = pack.nodes.train_lora
    with torch.inference_mode(False), torch.enable_grad():
        for bad_name, why in (("../outside", "outside"), ("", "give an output_name")):
            with pytest.raises(pack.lora_core.LoRAError, match=why):
                train_lora.TrainingRun(_train_args(model, bad_name, False))
        (comfy_host.loras_dir / "not_a_folder").write_bytes(b"")  # a folder name taken by a file: even root
        with pytest.raises(pack.lora_core.LoRAError, match="cannot write into .*not_a_folder"):  # cannot save
            train_lora.TrainingRun(_train_args(model, "not_a_folder/lora", False))

        run = train_lora.TrainingRun(_train_args(model, "fam_kept_weights", False))
        run.train(_samples(pack, model, "wan21"))
        trained = {p: a.roles["up"].clone() for p, a in
                   pack.nodes.train_bridge.layers_to_lora(run.layers, "x").adapters.items()}

        def broken_metadata(*args, **kwargs):
            raise ValueError("metadata writer broke")
        monkeypatch.setattr(train_lora, "build_metadata", broken_metadata)
        with pytest.raises(pack.lora_core.LoRAError, match="weights were saved to .*fam_kept_weights.safetensors"):
            run._save_final(None, partial=False)
    with safe_open(str(comfy_host.loras_dir / "fam_kept_weights.safetensors"), "pt") as f:
        assert f.metadata()["lw.steps"] == "2"
        for prefix, up in trained.items():
            assert torch.equal(f.get_tensor(f"{prefix}.lora_up.weight"), up)

