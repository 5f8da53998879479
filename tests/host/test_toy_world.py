"""The toy world (tests/host_fixture/toy_world): its models in ComfyUI, and what a LoRA does there.

Fast versions of benchmarks/quality.py's figures, each measured afresh through ComfyUI's own nodes
with its threshold stated. The models are built once by scripts/comfy_host.py (cached).
"""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from host_fixture.toy_world import build, quality, world


SEED = 7


@pytest.fixture(scope="module")
def toy(comfy_host, host_install) -> quality.ToyWorld:
    return quality.ToyWorld(comfy_host.nodes.NODE_CLASS_MAPPINGS, host_install.comfyui / "models")


@pytest.fixture(scope="module")
def report(host_install) -> dict:
    return json.loads((host_install.comfyui / "models" / build.REPORT).read_text())


def test_build_report_meets_the_recipe_goals(report):
    """What the build measured when it trained the models (figures in the README)."""
    assert report["autoencoder_psnr_db"] >= 24, report
    assert min(report["detector_accuracy"].values()) >= 0.95, report
    assert report["base_model_matches"]["all"] >= 0.8, report


def test_vae_file_round_trips_world_images_through_comfyui_nodes(toy):
    """The slim autoencoder, padded to TAESD's 64 channels, is what ComfyUI's VAE loader opened."""
    images, _ = quality.images_of(world.all_scenes(), 32, SEED)
    latent = toy.nodes["VAEEncode"]().encode(toy.vae, images)[0]["samples"]
    assert latent.shape == (32, 4, 8, 8)
    decoded = toy.nodes["VAEDecode"]().decode(toy.vae, {"samples": latent})[0]
    psnr = float(10 * torch.log10(1 / (decoded - images).pow(2).mean()))
    assert psnr >= 22, f"round trip PSNR {psnr:.1f} dB"
    readings = toy.read(decoded)
    truth = world.dataset(world.all_scenes(), 32, SEED)[1]  # the scenes images_of rendered
    assert quality.share_matching(readings, truth) >= 0.9


def test_base_model_draws_what_its_captions_say(toy):
    scenes = world.base_scenes()[::4]  # 24 scenes, every kind represented
    drawn = toy.draw(toy.model, [s.caption() for s in scenes], SEED)
    share = quality.share_matching(toy.read(drawn), scenes)
    assert share >= 0.75, f"base model drew its caption in {share:.0%} of {len(scenes)} samples"
    # and never the held-out values it was not trained on
    assert quality.share_showing(toy.read(drawn), "shape", "star") == 0


@pytest.fixture(scope="module")
def star_training(toy):
    """Train LoRA at the node with the benchmark's recipe (quality.IMAGES captioned stars, quality.REG_IMAGES
    base-world images for regularisation, its batch, rank and learning rate)."""
    concept = quality.CONCEPTS["star"]
    images, captions = quality.training_set(concept)
    model, lora, seconds = toy.train_ours(concept, images, captions, STEPS, name="test_star",
                                          reg=quality.regularisation_set())
    return {"concept": concept, "model": model, "lora": lora, "images": images, "captions": captions}


STEPS = 600
# Measured 2026-11-30 on the 2-core CI machine by benchmarks/quality.py (the world of 3200 UNet steps, this
# recipe, 600 steps): concept 69% of 96 triggered samples (base model 1%), scope 92%; the merge 92-100% the
# same detections as its stack. Thresholds leave room for the 16 samples here.
CONCEPT_MIN = 0.25
SCOPE_MIN = 0.85
SCOPE_WHERE_RIGHT_MIN = 0.9
MERGE_SAME_MIN = 0.8
# Output preservation with no regularisation images: 90% in the benchmark, 83% (20 of 24) here on 2026-11-30;
# the plain recipe without regularisation images keeps 41%.
PRESERVED_SCOPE_MIN = 0.75
SCOPE_SCENES = world.base_scenes()[::8]                          # 12 untriggered prompts


def test_trained_lora_draws_the_held_out_shape_its_trigger_asks_for(toy, star_training):
    concept = star_training["concept"]
    prompts = [concept.prompt(s) for s in concept.scenes()[::6]]  # 8 triggered prompts, 2 seeds each
    base = quality.share_showing(toy.read(toy.draw(toy.model, prompts, SEED, 2)), "shape", "star")
    learned = quality.share_showing(toy.read(toy.draw(star_training["model"], prompts, SEED, 2)), "shape", "star")
    assert base <= 0.125, f"the base model drew a star in {base:.0%} of triggered samples: nothing left to learn"
    assert learned >= CONCEPT_MIN, f"with the LoRA, {learned:.0%} of triggered samples show a star"


def test_trained_lora_keeps_prompts_without_its_trigger(toy, star_training):
    prompts = [s.caption() for s in SCOPE_SCENES]
    base = toy.draw(toy.model, prompts, SEED, 2)
    drawn = toy.draw(star_training["model"], prompts, SEED, 2)
    base_read, drawn_read = toy.read(base), toy.read(drawn)
    same = quality.agreement(base_read, drawn_read)
    moved = quality.mean_movement(base, drawn)
    assert same >= SCOPE_MIN, f"untriggered prompts: {same:.0%} same detections as the base model, same seeds " \
                              f"(movement {moved:.3f})"
    scenes = [s for s in SCOPE_SCENES for _ in range(2)]  # draw()'s order: each prompt's 2 samples together
    kept, right = quality.agreement_where_drawn_right(base_read, drawn_read, scenes)
    assert right >= 0.8 * len(base_read), f"the base model drew only {right} of {len(base_read)} samples as captioned"
    assert kept >= SCOPE_WHERE_RIGHT_MIN, f"of the {right} samples the base draws right, {kept:.0%} stay the same"


def test_scope_where_the_base_draws_right_counts_only_the_pairs_whose_base_image_matches_its_caption():
    red = world.Scene("triangle", "red", "grey", "plain")
    blue = world.Scene("circle", "blue", "grey", "striped")
    read = dataclasses.asdict  # a detector reading names every kind, as a Scene's fields do
    base = [read(red), read(blue), read(red), read(blue)]  # the third and fourth are wrong for their captions
    drawn = [read(red), read(red), read(blue), read(blue)]
    scenes = [red, blue, blue, red]
    assert quality.agreement(base, drawn) == 0.5
    assert quality.agreement_where_drawn_right(base, drawn, scenes) == (0.5, 2)   # pairs 1 and 2: one kept
    assert quality.agreement_where_drawn_right(base, base, scenes) == (1.0, 2)
    assert quality.agreement_where_drawn_right(base[2:], drawn[2:], scenes[2:]) == (0.0, 0)


def test_output_preservation_keeps_prompts_without_the_trigger_with_no_regularisation_images(toy):
    """preserve_untriggered trains each star also under its caption without 'lwstar', toward the base model's
    own prediction. Without regularisation images the plain recipe kept 41% of untriggered samples (benchmark,
    96 + 128 samples); with preservation 90%, the star still drawn in 61%."""
    concept = quality.CONCEPTS["star"]
    images, captions = quality.training_set(concept)
    model, _, _ = toy.train_ours(concept, images, captions, STEPS, name="test_star_preserved",
                                 preserve_untriggered=True)
    prompts = [s.caption() for s in SCOPE_SCENES]
    same = quality.agreement(toy.read(toy.draw(toy.model, prompts, SEED, 2)), toy.read(toy.draw(model, prompts, SEED, 2)))
    assert same >= PRESERVED_SCOPE_MIN, f"untriggered prompts: {same:.0%} same detections as the base model, same seeds"
    triggered = [concept.prompt(s) for s in concept.scenes()[::6]]
    learned = quality.share_showing(toy.read(toy.draw(model, triggered, SEED, 2)), "shape", "star")
    assert learned >= CONCEPT_MIN, f"with the LoRA, {learned:.0%} of triggered samples show a star"


def _stack(toy, rows: list, clamps: bool, decorrelate: bool = False):
    values = {}
    for i, (lora, strength) in enumerate(rows, start=1):
        key = f"lora_{i}" if isinstance(lora, str) else f"lora_{i}_in"
        values.update({key: lora, f"strength_model_{i}": strength, f"strength_clip_{i}": strength, f"on_{i}": True})
    out = toy.nodes["LW_StackLoRA"].execute(
        model=toy.model, clip=toy.clip, mode="merge", clamp_weights=clamps, weight_min=-1.0, weight_max=1.0,
        use_budget=clamps, budget=1.5, use_layer_cap=clamps, layer_cap=0.1, decorrelate=decorrelate, **values)
    return out.args[0], out.args[1]


BOTH_SCENES = quality.CONCEPTS["star"].scenes()[::4]


def _both_prompts():
    return [f"lwstar, lwdots, a {s.colour} star on a {s.background} background, dotted" for s in BOTH_SCENES]


def test_svd_merge_draws_what_its_stack_draws(toy):
    rows = {"lora_1": "lw_toy/star.safetensors", "strength_model_1": 1.0, "strength_clip_1": 1.0,
            "lora_2": "lw_toy/dotted.safetensors", "strength_model_2": 1.0, "strength_clip_2": 1.0}
    merged = toy.nodes["LW_MergeLoRA"].execute(method="svd", target_rank=8, rank_mode="fixed", energy=0.95,
                                               density=0.5, seed=0, output_name="", scope="", **rows).args[0]
    stack_model, stack_clip = _stack(toy, [("lw_toy/star.safetensors", 1.0), ("lw_toy/dotted.safetensors", 1.0)],
                                     clamps=False)
    merge_model, merge_clip = _stack(toy, [(merged, 1.0)], clamps=False)
    stacked = toy.draw(stack_model, _both_prompts(), SEED, 2, clip=stack_clip)
    drawn = toy.draw(merge_model, _both_prompts(), SEED, 2, clip=merge_clip)
    same = quality.agreement(toy.read(stacked), toy.read(drawn))
    assert same >= MERGE_SAME_MIN, f"rank-8 merge: {same:.0%} same detections as the stack it came from"
