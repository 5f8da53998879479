"""Regenerate example_workflows/*.json (except the hand-written load_lora.json) and their .jpg
thumbnails (shown by ComfyUI's template browser) in a real browser.

The graphs are built with LiteGraph in ComfyUI's own page and saved with app.graph.serialize(),
so widget order and values (control_after_generate included) are exactly what the frontend
writes. Needs a running ComfyUI with this pack and the toy world (its checkpoint, its datasets in
input/ and its example LoRAs lw_toy/{star,dotted,purple}, all made by scripts/comfy_host.py):

    python3 scripts/comfy_host.py serve --port 8188 &
    ~/.cache/lora-workbench/venv-py311/bin/python tests/browser/build_examples.py --url http://127.0.0.1:8188

Not a test (pytest collects only test_*.py); tests/browser/test_examples.py runs the results.
"""
from __future__ import annotations

import argparse
import json
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

OUT = Path(__file__).resolve().parents[2] / "example_workflows"
CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

# Runs in the page: small helpers, then one builder per workflow. Each returns nothing; the
# caller serializes app.graph afterwards.
HELPERS = """
window.lwBuild = {
  add(type, pos, values = {}, title = null) {
    const node = LiteGraph.createNode(type);
    if (!node) throw new Error(`no node type ${type}`);
    node.pos = pos;
    app.graph.add(node);
    for (const [name, value] of Object.entries(values)) {
      const widget = node.widgets?.find((w) => w.name === name);
      if (!widget) throw new Error(`${type} has no widget ${name}`);
      widget.value = value;
    }
    if (title) node.title = title;
    return node;
  },
  link(from, output, to, input) {
    const out = typeof output === "number" ? output : from.findOutputSlot(output);
    const inp = typeof input === "number" ? input : to.findInputSlot(input);
    if (out < 0 || inp < 0) throw new Error(`bad link ${from.type}.${output} -> ${to.type}.${input}`);
    if (!from.connect(out, to, inp)) throw new Error(`cannot link ${from.type}.${output} -> ${to.type}.${input}`);
  },
  // The toy world's sampler settings (tests/host_fixture/toy_world/quality.py SAMPLER): four seeds a prompt.
  sampler(pos, model, clip, vae, positive, prefix, title = "Positive", seed = 42) {
    const { add, link } = window.lwBuild;
    const [x, y] = pos;
    const pos_ = add("CLIPTextEncode", [x, y], { text: positive }, title);
    const neg = add("CLIPTextEncode", [x, y + 220], { text: "" }, "Negative (empty)");
    const latent = add("EmptyLatentImage", [x, y + 440], { width: 64, height: 64, batch_size: 4 });
    const ks = add("KSampler", [x + 440, y], { seed, control_after_generate: "fixed", steps: 20, cfg: 3.0,
      sampler_name: "ddim", scheduler: "ddim_uniform", denoise: 1.0 });
    const decode = add("VAEDecode", [x + 800, y]);
    const save = add("SaveImage", [x + 800, y + 120], { filename_prefix: prefix });
    link(clip[0], clip[1], pos_, "clip");
    link(clip[0], clip[1], neg, "clip");
    link(model[0], model[1], ks, "model");
    link(pos_, 0, ks, "positive");
    link(neg, 0, ks, "negative");
    link(latent, 0, ks, "latent_image");
    link(ks, 0, decode, "samples");
    link(vae[0], vae[1], decode, "vae");
    link(decode, 0, save, "images");
    return save;
  },
};
"""

CKPT = "lw_toy_sd15.safetensors"
TOY_LORAS = {"star": "lw_toy/star.safetensors", "dotted": "lw_toy/dotted.safetensors",
             "purple": "lw_toy/purple.safetensors"}

BUILDERS = {
    "stack_three_clamped": """
() => {
  const { add, link, sampler } = window.lwBuild;
  const ckpt = add("CheckpointLoaderSimple", [40, 120], { ckpt_name: "%(ckpt)s" });
  const stack = add("LW_StackLoRA", [420, 60], {
    mode: "merge", clamp_weights: true, weight_min: -1.0, weight_max: 1.0, use_budget: true, budget: 1.5,
    use_layer_cap: true, layer_cap: 0.1, decorrelate: false,
    lora_1: "%(star)s", strength_model_1: 1.0, strength_clip_1: 1.0,
    lora_2: "%(dotted)s", strength_model_2: 1.0, strength_clip_2: 1.0,
    lora_3: "%(purple)s", strength_model_3: 1.0, strength_clip_3: 1.0,
  }, "Stack LoRA (three toy-world LoRAs, clamped)");
  link(ckpt, "MODEL", stack, "model");
  link(ckpt, "CLIP", stack, "clip");
  sampler([940, 60], [stack, 0], [stack, 1], [ckpt, 2],
          "lwstar, lwdots, lwpurple, a purple star on a white background, dotted", "lora_workbench/stack_three");
  const report = add("PreviewAny", [940, 760], {}, "Stack report");
  link(stack, "report", report, "source");
  const heat = add("PreviewImage", [1360, 480], {}, "Interference heatmap");
  link(stack, "interference", heat, "images");
}
""",
    "train_then_stack": """
() => {
  const { add, link, sampler } = window.lwBuild;
  const ckpt = add("CheckpointLoaderSimple", [40, 60], { ckpt_name: "%(ckpt)s" });
  const data = add("LoadImageTextDataSetFromFolder", [40, 260], { folder: "lw_toy_star" },
                   "Training images: 50 captioned stars");
  const reg = add("LoadImageTextDataSetFromFolder", [40, 420], { folder: "lw_toy_base" },
                  "Regularisation: 20 images the base model draws");
  const train = add("LW_TrainLoRA", [420, 40], {
    captions: "", trigger_word: "lwstar", output_name: "lora_workbench_examples/lwstar",
    scope: "one shape: the toy world's star (example)", rank: 8, alpha: 0, targets: "attention", steps: 300,
    learning_rate: 0.004, batch_size: 8, grad_accumulation: 1, optimizer: "adamw", lr_schedule: "cosine",
    warmup_steps: 0, seed: 1, control_after_generate: "fixed", resolution: 64, bucketing: false, noise_offset: 0.0,
    min_snr_gamma: 5.0, gradient_checkpointing: false, training_dtype: "float32", save_every: 0,
    sample_prompt: "lwstar, a red star on a grey background", sample_every: 100, resume_from: "None",
  }, "Train LoRA (300 steps, rank 8, 64 px)");
  link(ckpt, "MODEL", train, "model");
  link(ckpt, "CLIP", train, "clip");
  link(ckpt, "VAE", train, "vae");
  link(data, 0, train, "images");
  link(data, 1, train, "captions");
  link(reg, 0, train, "reg_images");
  link(reg, 1, train, "reg_captions");
  const loss = add("PreviewImage", [40, 700], {}, "Loss curve");
  link(train, "loss", loss, "images");
  const stack = add("LW_StackLoRA", [900, 40], {
    lora_2: "%(dotted)s", strength_model_2: 1.0, strength_clip_2: 1.0,
    strength_model_1: 1.0, strength_clip_1: 1.0,
  }, "Stack: the new star + the dotted LoRA");
  link(ckpt, "MODEL", stack, "model");
  link(ckpt, "CLIP", stack, "clip");
  link(train, "LORA", stack, "lora_1_in");
  const prompt = "lwstar, a red star on a grey background";
  sampler([1420, 40], [ckpt, 0], [ckpt, 1], [ckpt, 2], prompt, "lora_workbench/demo_1_base", "Base model");
  sampler([1420, 760], [train, 0], [train, 1], [ckpt, 2], prompt, "lora_workbench/demo_2_trained",
          "Same seed, trained LoRA");
  sampler([1420, 1480], [stack, 0], [stack, 1], [ckpt, 2], "lwstar, lwdots, a red star on a grey background, dotted",
          "lora_workbench/demo_3_stack", "Same seed, stacked with dotted");
}
""",
    "merge_three": """
() => {
  const { add, link, sampler } = window.lwBuild;
  const merge = add("LW_MergeLoRA", [40, 60], {
    method: "svd", target_rank: 8, rank_mode: "fixed", energy: 0.95, density: 0.5, seed: 0,
    control_after_generate: "fixed", output_name: "lora_workbench_examples/merged_toy",
    scope: "star, dotted and purple merged (example)",
    lora_1: "%(star)s", strength_model_1: 1.0, strength_clip_1: 1.0,
    lora_2: "%(dotted)s", strength_model_2: 1.0, strength_clip_2: 1.0,
    lora_3: "%(purple)s", strength_model_3: 1.0, strength_clip_3: 1.0,
  }, "Merge LoRA (three -> rank 8, saved)");
  const report = add("PreviewAny", [40, 1140], {}, "Merge report");
  link(merge, "report", report, "source");
  const ckpt = add("CheckpointLoaderSimple", [520, 860], { ckpt_name: "%(ckpt)s" });
  const stack = add("LW_StackLoRA", [520, 40], { clamp_weights: false, use_budget: false, use_layer_cap: false },
                    "Try the merged LoRA (no clamps)");
  link(ckpt, "MODEL", stack, "model");
  link(ckpt, "CLIP", stack, "clip");
  link(merge, "LORA", stack, "lora_1_in");
  sampler([1040, 40], [stack, 0], [stack, 1], [ckpt, 2],
          "lwstar, lwdots, lwpurple, a purple star on a white background, dotted", "lora_workbench/merge_three");
}
""",
}
BUILDERS = {name: js % {"ckpt": CKPT, **TOY_LORAS} for name, js in BUILDERS.items()}


FIT_ALL = """() => {
  const nodes = app.graph.nodes;
  const x0 = Math.min(...nodes.map(n => n.pos[0])), x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0]));
  const y0 = Math.min(...nodes.map(n => n.pos[1] - 30)), y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1]));
  const scale = Math.min(1, 1220 / (x1 - x0), 720 / (y1 - y0));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [730 / scale - (x0 + x1) / 2, 470 / scale - (y0 + y1) / 2];
  app.canvas.setDirty(true, true);
}"""
LOD = "LiteGraph.Canvas.MinFontSizeForLOD"


def thumbnail(page, name: str) -> None:
    """example_workflows/<name>.jpg: the template browser shows it on the workflow's card."""
    from io import BytesIO

    from PIL import Image

    page.evaluate(FIT_ALL)
    page.wait_for_timeout(500)
    shot = Image.open(BytesIO(page.screenshot(clip={"x": 100, "y": 100, "width": 1260, "height": 740})))
    shot = shot.convert("RGB").resize((630, 370), Image.LANCZOS)
    shot.save(OUT / f"{name}.jpg", quality=85, optimize=True)


def build(url: str, names: list[str]) -> None:
    request = urllib.request.Request(f"{url}/settings/Comfy.TutorialCompleted", data=b"true", method="POST")
    urllib.request.urlopen(request, timeout=10).read()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(url)
        page.wait_for_function("window.app?.graph && window.LiteGraph && app.extensions?.length", timeout=60000)
        page.evaluate(HELPERS)
        # thumbnails are zoomed out: draw full detail anyway (the user's setting is restored below)
        lod = page.evaluate(f"app.extensionManager.setting.get('{LOD}')")
        page.evaluate(f"app.extensionManager.setting.set('{LOD}', 0)")
        for name in names:
            page.evaluate("app.graph.clear()")
            page.evaluate(BUILDERS[name])
            # a load round trip, so the row editors lay the nodes out as a user would see them
            graph = page.evaluate("JSON.parse(JSON.stringify(app.graph.serialize()))")
            page.evaluate("g => app.loadGraphData(g, true, false)", graph)
            page.wait_for_timeout(500)
            graph = page.evaluate("JSON.parse(JSON.stringify(app.graph.serialize()))")
            graph.pop("id", None)  # a fresh id on every load is the frontend's business
            graph["extra"] = {"ds": {"scale": 0.8, "offset": [20, 20]}}
            path = OUT / f"{name}.json"
            path.write_text(json.dumps(graph, indent=1) + "\n")
            thumbnail(page, name)
            print(f"wrote {path} ({len(graph['nodes'])} nodes) and its thumbnail")
        for path in sorted(OUT.glob("*.json")):  # hand-written ones get a thumbnail too
            if path.stem not in BUILDERS and path.stem in names + ["load_lora"]:
                page.evaluate("async g => { await app.loadGraphData(g, true, false); }", json.loads(path.read_text()))
                page.wait_for_timeout(500)
                thumbnail(page, path.stem)
                print(f"wrote {path.with_suffix('.jpg')}")
        page.evaluate(f"v => app.extensionManager.setting.set('{LOD}', v)", lod)
        browser.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8188")
    parser.add_argument("names", nargs="*", default=list(BUILDERS))
    args = parser.parse_args()
    build(args.url.rstrip("/"), args.names)
