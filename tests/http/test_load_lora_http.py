"""LW_LoadLoRA over HTTP against a started ComfyUI server."""
import json
import urllib.error
import urllib.parse
import urllib.request

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save

from lora_factory import lora_state_dict, low_rank_factors

SD15 = "lw_tiny_sd15.safetensors"


def _prompt(lora, strength):
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": SD15}},
        "2": {"class_type": "LW_LoadLoRA", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
                                                      "strength_model": strength, "strength_clip": strength,
                                                      "mode": "bypass"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red fox", "clip": ["2", 1]}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {"model": ["2", 0], "seed": 5, "steps": 2, "cfg": 1.0,
                                                   "sampler_name": "euler", "scheduler": "normal",
                                                   "positive": ["3", 0], "negative": ["3", 0],
                                                   "latent_image": ["5", 0], "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"latents/lw_{strength}"}},
    }


def _fetch_latent(comfy_http, entry) -> torch.Tensor:
    saved = entry["outputs"]["7"]["latents"][0]
    query = urllib.parse.urlencode({k: saved[k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{comfy_http.url}/view?{query}", timeout=30) as response:
        return load_safetensors(response.read())["latent_tensor"]


def test_object_info_lists_load_lora_with_tooltips(comfy_http, loras_dir):
    (loras_dir / "listed.safetensors").write_bytes(b"")  # listed by name; never loaded here
    info = comfy_http.get_json("/object_info/LW_LoadLoRA")["LW_LoadLoRA"]
    assert info["display_name"] == "Load LoRA (Workbench)" and info["category"] == "LoRA Workbench/load"
    assert info["output"] == ["MODEL", "CLIP", "LW_LORA", "STRING", "STRING"]  # report, trigger words
    inputs = {**info["input"]["required"], **info["input"].get("optional", {})}
    assert set(inputs) == {"model", "clip", "lora_name", "strength_model", "strength_clip", "mode", "block_weights"}
    assert all(spec[1].get("tooltip") for spec in inputs.values())
    assert "listed.safetensors" in inputs["lora_name"][0] or "listed.safetensors" in inputs["lora_name"][1].get(
        "options", [])


def _attention_shapes(checkpoint) -> dict:
    """kohya names and shapes of the tiny checkpoint's UNet attention linears, read from its header."""
    from safetensors import safe_open
    shapes = {}
    with safe_open(str(checkpoint), "pt") as f:
        for key in f.keys():
            if key.startswith("model.diffusion_model.") and key.endswith(
                    (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")):
                name = "lora_unet_" + key[len("model.diffusion_model."):-len(".weight")].replace(".", "_")
                shapes[name] = tuple(f.get_slice(key).get_shape())
    return shapes


def test_queued_prompt_with_load_lora_moves_the_latent(comfy_http, loras_dir, host_install):
    shapes = _attention_shapes(host_install.comfyui / "models" / "checkpoints" / SD15)
    assert len(shapes) == 56
    (loras_dir / "http_style.safetensors").write_bytes(
        save(lora_state_dict(low_rank_factors(shapes, 4, seed=21, scale=0.3), alpha=4.0)))
    with_lora = _fetch_latent(comfy_http, comfy_http.run_prompt(_prompt("http_style.safetensors", 1.0)))
    without = _fetch_latent(comfy_http, comfy_http.run_prompt(_prompt("http_style.safetensors", 0.0)))
    assert with_lora.shape == (1, 4, 8, 8) and torch.isfinite(with_lora).all()
    assert (with_lora - without).abs().max() > 1e-3


def test_info_route_reads_the_header_and_refuses_escaping_names(comfy_http, loras_dir):
    info = comfy_http.get_json("/lora_workbench/info?name=lw_demo_style.safetensors")
    assert info["trigger_words"][0] == "lwstyle" and info["family"] == "SD1.x" and info["rank"] == "4"
    assert info["scope"].startswith("one style")
    (loras_dir / "http_corrupt.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    for bad, status in (("../secret.safetensors", 400), ("nope.safetensors", 404), ("http_corrupt.safetensors", 422)):
        try:
            comfy_http.get_json("/lora_workbench/info?" + urllib.parse.urlencode({"name": bad}))
        except urllib.error.HTTPError as err:
            assert err.code == status and "error" in json.loads(err.read())
        else:
            raise AssertionError(f"{bad} was served")
