"""Stack LoRA's spectral cap in a real ComfyUI: a planted rank-1 spike on one layer is brought to exactly
the cap (dense SVD of the patched weight's change), every other layer is patched as without the cap."""
import pytest
import torch

from lora_factory import lora_state_dict
from lora_fixtures import SD15, attention_targets, kohya_factors, kohya_name, patched_weights, sampler_prompt, save_lora

SETTINGS = {"mode": "merge", "clamp_weights": False, "weight_min": -1.0, "weight_max": 1.0, "use_budget": False,
            "budget": 1.5, "use_layer_cap": False, "layer_cap": 0.1, "decorrelate": False}


@pytest.fixture(scope="module")
def sd15(comfy_host):
    return comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SD15)[:2]


@pytest.fixture(scope="module")
def spiky(comfy_host, sd15):
    """Two rank-4 LoRAs on every attention layer; on SPIKE both carry the same strong rank-1 direction."""
    model, _ = sd15
    spike = sorted(attention_targets(model))[0]
    g = torch.Generator().manual_seed(80)
    rows, cols = attention_targets(model)[spike]
    u, v = torch.randn(rows, 1, generator=g), torch.randn(1, cols, generator=g)
    names = []
    for i in range(2):
        factors = kohya_factors(model, rank=4, seed=81 + i, scale=0.05)
        up, down = factors[kohya_name(spike)]
        up[:, :1], down[:1] = u / u.norm() * 1.5, v / v.norm() * 1.5
        names.append(save_lora(comfy_host.loras_dir, f"spiky_{i}.safetensors", lora_state_dict(factors, alpha=4.0)))
    return spike, names


def rows(names, strength=0.9):
    out = {}
    for i, name in enumerate(names, start=1):
        out |= {f"lora_{i}": name, f"on_{i}": True, f"strength_model_{i}": strength, f"strength_clip_{i}": 0.0}
    return out


def top(matrix):
    return float(torch.linalg.svdvals(matrix.double())[0])


def test_a_planted_spike_is_capped_exactly_and_other_layers_are_untouched(comfy_host, sd15, spiky, monkeypatch):
    model, _ = sd15
    spike, names = spiky
    node = comfy_host.pack.nodes.stack_lora.StackLoRA
    base = patched_weights(model)
    free = node.execute(model=model, **SETTINGS, **rows(names)).args
    free_w = patched_weights(free[0])
    ratios = {k: top(free_w[k] - base[k]) / top(base[k]) for k in attention_targets(model)}
    others = max(r for k, r in ratios.items() if k != spike)
    cap = (ratios[spike] + 2 * others) / 3  # between the spike and the rest
    assert ratios[spike] > 1.5 * cap > 1.5 * others

    out = node.execute(model=model, **SETTINGS, **rows(names), use_spectral_cap=True, spectral_cap=cap)
    capped_w = patched_weights(out.args[0])
    assert top(capped_w[spike] - base[spike]) / top(base[spike]) == pytest.approx(cap, rel=1e-4)
    for key in attention_targets(model):
        if key != spike:
            assert torch.equal(capped_w[key], free_w[key]), key
    report = out.args[3]
    assert "spectral cap touched 1 layers" in report and spike in report and f"-> {cap:.4f}" in report
    # the general path (what DoRA / LoHa stacks take) gives the same
    monkeypatch.setattr(comfy_host.pack.lora_core.stacking.stack_analysis, "stack_shape", lambda entries: None)
    slow = node.execute(model=model, **SETTINGS, **rows(names), use_spectral_cap=True, spectral_cap=cap)
    slow_w = patched_weights(slow.args[0])
    assert float((slow_w[spike] - capped_w[spike]).abs().max()) < 1e-6 and slow.args[3] == report
    # and the default (cap off) is today's stack
    assert node.execute(model=model, **SETTINGS, **rows(names)).args[3] == free[3]


def test_spectral_cap_in_bypass_equals_merge(comfy_host, spiky):
    _, names = spiky
    latents = {}
    for mode in ("merge", "bypass"):
        inputs = {"model": ["1", 0], "clip": ["1", 1], **SETTINGS, "mode": mode, **rows(names),
                  "use_spectral_cap": True, "spectral_cap": 0.05}
        prompt = sampler_prompt({"2": {"class_type": "LW_StackLoRA", "inputs": inputs}}, cfg=3.0)
        latents[mode] = comfy_host.run(prompt, outputs=["6"])["6"].output(0)["samples"]
    assert (latents["bypass"] - latents["merge"]).abs().max() / latents["merge"].abs().max() < 1e-5
