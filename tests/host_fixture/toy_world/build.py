"""Build the toy world's models into a ComfyUI install: deterministic, about 18 minutes on 2 quiet cores.

  checkpoints/lw_toy_sd15.safetensors  SD1.5-layout checkpoint Load Checkpoint opens (it detects
      as the tiny SD1.5 config, tests/host_fixture/tiny_models.py): the UNet trained here on the
      base world, the tiny CLIP-L text encoder (seeded, frozen, made to read by word: the UNet
      learns to read it), and
      the autoencoder trained here as a TAESD-layout VAE.
  lw_toy_world/detector.safetensors    the detector (toy_world/detector.py).
  lw_toy_world/report.json             what the build measured: autoencoder PSNR, detector accuracy,
      how often the base model draws what its caption says, and the seconds each part took.
  input/lw_toy_<value>/                50 captioned images of each held-out value (and 20 of the base
      world, for regularisation): what the example workflows train on.

Run: python -m toy_world.build --comfyui <ComfyUI dir>   (scripts/comfy_host.py does it)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 2026
CHECKPOINT = "checkpoints/lw_toy_sd15.safetensors"
DETECTOR = "lw_toy_world/detector.safetensors"
REPORT = "lw_toy_world/report.json"
CHECK_SHEET = "lw_toy_world/base_model_check.png"  # what the check below read: one row per 12 scenes
# The toy UNet: the tiny SD1.5 layout itself (so it detects as the registered tiny config), 1.06 M
# parameters: a training step takes two thirds of the time two ResBlocks a level (1.54 M) take.
UNET_OVERRIDES: dict = {}
# The text encoder: the tiny CLIP-L, seeded and frozen, with its position embeddings and residual
# branches scaled down so each word's output is mostly the word itself, as a trained CLIP reads
# these short captions. At full random scale every token carries its position: a trigger word
# first ("lwstar, a red ...") shifted each word of the caption and the UNet misread it (the same
# word 3 tokens later kept cosine 0.48 on average, min -0.15; scaled like this 0.89, min 0.62).
CLIP_SCALES = {"position_embedding.weight": 0.1, "out_proj.weight": 0.3, "fc2.weight": 0.3}
# Words put before a quarter of the training captions ("zorp, a red ..."): the UNet learns to read
# the caption's words wherever they stand and to ignore a word it does not know.
FILLER_WORDS = ("zorp", "blick", "quem", "vash", "trel", "morf", "glim", "dask", "pune", "krob", "yelt", "fosh")
# (folder under input/, kind, value or None for the base world, trigger word)
DATASETS = [("lw_toy_star", "shape", "star", "lwstar"), ("lw_toy_dotted", "texture", "dotted", "lwdots"),
            ("lw_toy_purple", "colour", "purple", "lwpurple"), ("lw_toy_base", None, None, "")]
# 50 images of a held-out value (the most issue 16 allows) drew the star in 79% of samples, 20 in 62%
# (benchmarks/quality.py); 20 base-world images are enough for regularisation.
DATASET_SIZE, REG_DATASET_SIZE = 50, 20
# The autoencoder's 2000 steps are what the dotted texture needs: at 1200 it reached 23.7 dB, the
# detector read textures 79% right on its reconstructions and the base model drew them in 77%.
# The UNet's 3200 steps and the detector's 500 keep the whole build within issue 16's 20 minutes
# (4000 and 900 took 22 minutes alone for 96.9% of base samples right and a 100% detector).
RECIPE = {"autoencoder": {"images": 8000, "steps": 2000, "batch": 32},
          "detector": {"images": 6000, "steps": 500, "batch": 64},
          "unet": {"images": 16000, "steps": 3200, "batch": 64, "lr": 1e-3, "prefixed": 0.25},
          "check": {"seeds": 2, "steps": 30, "cfg": 3.0}}


# What the models are made from: any change to these rebuilds them (scripts/comfy_host.py keys its cache on it).
SOURCES = ("world.py", "autoencoder.py", "diffusion.py", "detector.py", "build.py")


def recipe_hash() -> str:
    """The cache key of a build: its sources (the recipe above included) and the tiny configs."""
    h = hashlib.sha256()
    for path in [HERE / name for name in SOURCES] + [HERE.parent / "tiny_models.py"]:
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()


def _log(msg: str) -> None:
    print(f"[toy_world] {msg}", file=sys.stderr, flush=True)


def _save(sd: dict, path: Path, metadata: dict, dtype) -> None:
    import safetensors.torch
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    safetensors.torch.save_file({k: v.to(dtype).contiguous() for k, v in sorted(sd.items())}, str(tmp),
                                metadata=metadata)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def unet_config() -> dict:
    """A fresh copy each time: UNetModel pops from its list arguments."""
    import copy

    from tiny_models import SD15_UNET
    return copy.deepcopy({**SD15_UNET, **UNET_OVERRIDES})


def encode_captions(checkpoint: Path, captions: list[str]):
    """Each caption as CLIPTextEncode encodes it, through ComfyUI's own loader: [C, 77, D]."""
    import comfy.sd
    import torch
    _, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(checkpoint), output_vae=False, output_model=False)
    with torch.no_grad():
        return torch.cat([clip.encode_from_tokens(clip.tokenize(c)).float() for c in captions])


def toy_clip() -> dict:
    """The tiny CLIP-L's seeded weights, scaled by CLIP_SCALES (SD1.5 files carry no projection)."""
    import tiny_models
    clip = tiny_models.random_state_dict(tiny_models.build_clip_l(), tiny_models.SEED + 1)
    clip.pop("text_projection.weight")
    for key in clip:
        for suffix, scale in CLIP_SCALES.items():
            if key.endswith(suffix):
                clip[key] = clip[key] * scale
    return clip


def write_datasets(input_dir: Path) -> list[str]:
    from PIL import Image

    from toy_world import world
    written = []
    for n, (folder, kind, value, _) in enumerate(DATASETS):
        scenes = world.scenes_with(kind, value) if kind else world.base_scenes()
        images, chosen = world.dataset(scenes, DATASET_SIZE if kind else REG_DATASET_SIZE, SEED + 100 + n)
        out = input_dir / folder
        out.mkdir(parents=True, exist_ok=True)
        for i, (image, scene) in enumerate(zip(images, chosen)):
            Image.fromarray(image).save(out / f"{i:02d}.png")
            (out / f"{i:02d}.txt").write_text(scene.caption() + "\n")
        written.append(folder)
    return written


def train_parts(report: dict, ae=None, log=_log):
    """Autoencoder (unless given), detector, CLIP weights, contexts and the trained UNet."""
    import comfy.taesd.taesd
    import torch

    import tiny_models
    from toy_world import autoencoder, detector, diffusion, world

    torch.manual_seed(SEED)
    tiny_models.register()
    timings = report.setdefault("seconds", {})

    # 1. the autoencoder sees every value, held-out ones too (or its decoder could not draw them)
    t = time.perf_counter()
    test_images, test_scenes = world.dataset(world.all_scenes(), 512, SEED + 1)
    if ae is None:
        r = RECIPE["autoencoder"]
        images, _ = world.dataset(world.all_scenes(), r["images"], SEED)
        ae = autoencoder.train_autoencoder(torch.from_numpy(images), r["steps"], r["batch"], SEED, log=log)
    report["autoencoder_psnr_db"] = round(autoencoder.psnr(ae, torch.from_numpy(test_images)), 2)
    timings["autoencoder"] = round(time.perf_counter() - t, 1)

    def reconstruct(uint8_images):
        with torch.no_grad():
            x = torch.from_numpy(uint8_images).permute(0, 3, 1, 2).float() / 255
            return torch.cat([ae.taesd_decoder(ae.taesd_encoder(b)).clamp(0, 1) for b in x.split(256)])

    # 2. the detector, on reconstructions (the softness sampled images have)
    t = time.perf_counter()
    r = RECIPE["detector"]
    det_images, det_scenes = world.dataset(world.all_scenes(), r["images"], SEED + 2)
    labels = lambda scenes: {k: torch.tensor([s.labels()[k] for s in scenes]) for k in world.KINDS}  # noqa: E731
    det = detector.train_detector(reconstruct(det_images), labels(det_scenes), r["steps"], r["batch"], SEED, log=log)
    report["detector_accuracy"] = {k: round(v, 4) for k, v in
                                   detector.accuracy(det, reconstruct(test_images), labels(test_scenes)).items()}
    timings["detector"] = round(time.perf_counter() - t, 1)

    # 3. the checkpoint's parts: TAESD-layout VAE, tiny CLIP, the UNet (trained below)
    taesd_shapes = {k: tuple(v.shape) for k, v in comfy.taesd.taesd.TAESD(latent_channels=4).state_dict().items()}
    vae = autoencoder.padded_to_taesd(ae.state_dict(), taesd_shapes)
    vae["vae_scale"], vae["vae_shift"] = torch.tensor(0.18215), torch.tensor(0.0)  # SD1.5's latent scale cancels
    clip = toy_clip()
    unet = tiny_models.build_unet(unet_config(), tiny_models.SD15_HEADS)
    diffusion.init_weights(unet, SEED)

    def checkpoint_sd():
        return {**tiny_models.with_prefix("model.diffusion_model.", unet.state_dict()),
                **tiny_models.with_prefix("cond_stage_model.transformer.", clip),
                **tiny_models.with_prefix("first_stage_model.", vae)}

    # 4. captions through ComfyUI's own CLIP path, then the UNet on the base world only
    t = time.perf_counter()
    captions = [s.caption() for s in world.base_scenes()]
    variants = [""] + [f"{word}, " for word in FILLER_WORDS]
    with tempfile.TemporaryDirectory() as tmp:
        provisional = Path(tmp) / "provisional.safetensors"
        _save(checkpoint_sd(), provisional, {}, torch.float32)
        encoded = encode_captions(provisional, [v + c for v in variants for c in captions] + [""])
    contexts, empty = encoded[:-1].unflatten(0, (len(variants), len(captions))), encoded[-1]
    r = RECIPE["unet"]
    base_images, base_chosen = world.dataset(world.base_scenes(), r["images"], SEED + 3)
    with torch.no_grad():
        x = torch.from_numpy(base_images).permute(0, 3, 1, 2).float() / 255
        latents = torch.cat([ae.taesd_encoder(b) for b in x.split(512)])
    caption_index = torch.tensor([captions.index(s.caption()) for s in base_chosen])
    diffusion.train_unet(unet, latents, contexts, caption_index, empty, r["steps"], r["batch"], SEED,
                         lr=r["lr"], prefixed=r["prefixed"], log=log)
    timings["unet"] = round(time.perf_counter() - t, 1)
    check_base_model(report, unet, ae, det, contexts[0], empty, captions)
    return checkpoint_sd(), det, ae


def check_base_model(report: dict, unet, ae, det, contexts, empty, captions) -> None:
    """Does it draw what its captions say? Every base scene, a few seeds, read by the detector."""
    import torch

    from toy_world import diffusion, world
    r = RECIPE["check"]
    scenes = world.base_scenes() * r["seeds"]
    ctx = torch.stack([contexts[captions.index(s.caption())] for s in scenes])
    with torch.no_grad():
        z = diffusion.ddim_sample(unet, ctx, empty.expand_as(ctx), (len(scenes), 4, 8, 8), SEED,
                                  r["steps"], r["cfg"])
        drawn = ae.taesd_decoder(z).clamp(0, 1).permute(0, 2, 3, 1)
    read = det.read(drawn)
    per_kind = {k: sum(d[k] == getattr(s, k) for d, s in zip(read, scenes)) / len(scenes) for k in world.KINDS}
    report["base_model_matches"] = {**{k: round(v, 4) for k, v in per_kind.items()},
                                    "all": round(sum(all(d[k] == getattr(s, k) for k in world.KINDS)
                                                     for d, s in zip(read, scenes)) / len(scenes), 4),
                                    "samples": len(scenes), "sampler": f"ddim {r['steps']} steps, cfg {r['cfg']}"}
    report["check_images"] = drawn


def save_sheet(images, path: Path, columns: int = 12) -> None:
    """IMAGE [N, H, W, 3] in [0, 1] as one PNG, `columns` a row, 2x nearest (for people to look at)."""
    from PIL import Image
    n, h, w, _ = images.shape
    rows = -(-n // columns)
    sheet = Image.new("RGB", (columns * w * 2, rows * h * 2), (255, 255, 255))
    for i, image in enumerate(images):
        tile = Image.fromarray((image.clamp(0, 1) * 255).byte().numpy()).resize((w * 2, h * 2), Image.NEAREST)
        sheet.paste(tile, ((i % columns) * w * 2, (i // columns) * h * 2))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def build(models_dir: Path, input_dir: Path) -> dict:
    """Train everything, check it, then write the files (atomically, each)."""
    import torch
    began = time.perf_counter()
    report = {"recipe": recipe_hash()}
    checkpoint, det, _ = train_parts(report)
    save_sheet(report.pop("check_images"), models_dir / CHECK_SHEET)
    report["seconds"]["total"] = round(time.perf_counter() - began, 1)
    import tiny_models
    tiny_models.check_detection(checkpoint, "model.diffusion_model.", "LWTinySD15")  # Load Checkpoint opens it
    meta = {"lw_tiny_model": "LWTinySD15", "lw_toy_world": report["recipe"]}
    _save(checkpoint, models_dir / CHECKPOINT, meta, torch.float16)
    _save(det.state_dict(), models_dir / DETECTOR, {"lw_toy_world": report["recipe"]}, torch.float32)
    report["datasets"] = write_datasets(input_dir)
    (models_dir / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    _log(json.dumps(report))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI root")
    parser.add_argument("--models-dir", type=Path, help="default: <comfyui>/models")
    parser.add_argument("--input-dir", type=Path, help="default: <comfyui>/input")
    args = parser.parse_args()
    sys.path.insert(0, str(HERE.parent))
    import tiny_models
    tiny_models.bootstrap_comfy(args.comfyui.resolve())
    models = (args.models_dir or args.comfyui / "models").resolve()
    build(models, (args.input_dir or args.comfyui / "input").resolve())
    print(json.dumps([CHECKPOINT, DETECTOR, REPORT, CHECK_SHEET]))  # last stdout line: read by scripts/comfy_host.py


if __name__ == "__main__":
    main()
