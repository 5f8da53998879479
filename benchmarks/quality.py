#!/usr/bin/env python3
"""What a LoRA does, measured on the toy world: concept, scope, against core, stacking, merge.

    python3 benchmarks/quality.py            # full figures (4 seeds, 600 steps): 27 minutes on 2 cores
    python3 benchmarks/quality.py --quick    # 2 seeds, 300 steps: about 5 minutes on 2 cores

Runs in the pinned ComfyUI host's python (re-executes itself like benchmarks/run.py), loads the
toy world's checkpoint with Load Checkpoint, trains with this pack's Train LoRA node and core's
TrainLoraNode on the same images, steps and rank, stacks and merges with our nodes, draws with
KSampler and reads every image with the toy world's detector. Prints a table and writes
benchmarks/results/quality-<date>.json and quality-latest.md. What each figure means:
benchmarks/README.md ("Quality on the toy world").
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # lwbench; never the repo root (its nodes/ would shadow ComfyUI's nodes.py)
FIXTURES = HERE.parent / "tests" / "host_fixture"

from lwbench import host as hostmod  # noqa: E402

# Goals from issue 16; each figure is printed beside its goal and both sides' numbers.
GOALS = {"concept": 0.80, "scope": 0.95}
# Our Train LoRA runs of each concept: (key, row in the table, row in the figure, with the
# regularisation images, other Train LoRA inputs). v_pred_like_loss and feed-forward targets were measured on the 20-image
# recipe and did not help (results/quality-2026-11-30-20images.json), so they are not run again.
OUR_RUNS = (
    ("plain", "ours", "ours, no regularisation", False, {}),
    ("reg", "ours + regularisation", "ours + regularisation", True, {}),
    ("cross", "ours + regularisation, cross-attention targets", "ours + reg, cross-attention only", True,
     {"targets": "cross-attention"}),
    # The concept goal on the star was reached only this way in the exploration (82% / 91%, one run).
    ("cross_lr8", "ours + regularisation, cross-attention targets, lr 8e-3", "ours + reg, cross-attn, lr 8e-3", True,
     {"targets": "cross-attention", "learning_rate": 8e-3}),
    # Output preservation (preserve_untriggered): with no regularisation images at all, and with them on the
    # cross-attention layers at learning rate 8e-3 (preservation pulls toward the base model, so it takes a
    # higher rate: on the star, 4e-3 gave 56% / 95%, 8e-3 64% / 95%, one run each).
    ("preserve", "ours, output preservation, no regularisation", "ours, output preservation", False,
     {"preserve_untriggered": True}),
    ("reg_preserve_cross", "ours + regularisation + output preservation, cross-attention, lr 8e-3",
     "ours + reg + preservation, cross-attn", True,
     {"preserve_untriggered": True, "targets": "cross-attention", "learning_rate": 8e-3}),
    # Preservation weighed 3x against the images, and a rate high enough to learn through it: in the
    # exploration the star in 77% (83% with the twins repeated 3x instead), none of the untriggered samples
    # the base model draws right changed.
    ("reg_preserve3_cross", "ours + regularisation + output preservation x3, cross-attention, lr 2.4e-2",
     "ours + reg + preservation x3, cross-attn, lr 2.4e-2", True,
     {"preserve_untriggered": True, "preservation_weight": 3.0, "targets": "cross-attention", "learning_rate": 2.4e-2}),
)
# Stack LoRA's clamp widgets, and the stacks measured: (row, "off" or "defaults", widgets set on top).
CLAMP_WIDGETS = ("clamp_weights", "weight_min", "weight_max", "use_budget", "budget", "use_layer_cap", "layer_cap",
                 "decorrelate", "use_spectral_cap", "spectral_cap")
STACKS = (
    ("1.0 each, no clamps", "off", {}),
    ("default clamps", "defaults", {}),
    ("decorrelate", "off", {"decorrelate": True}),
    ("budget 1.5 + layer cap 0.10 (the defaults until 2026-11-30)", "off",
     {"clamp_weights": True, "use_budget": True, "budget": 1.5, "use_layer_cap": True, "layer_cap": 0.10}),
)
# The stacks and merges use the LoRAs trained with regularisation.
FIGURE = HERE.parent / "docs" / "images" / "toy_world_quality.png"


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer prompts, seeds and steps")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--no-write", action="store_true")
    return p.parse_args(argv)


class Bench:
    def __init__(self, toy, quality, world, quick: bool):
        self.toy, self.q, self.world = toy, quality, world
        self.steps = 300 if quick else 600
        self.per_prompt = 2 if quick else 4
        base = world.base_scenes()
        self.untriggered = base[::8] if quick else base[::3]            # 12 or 32 base scenes
        self.base_images = {}
        self.loras = {}          # concept -> {"plain": LoRA, "reg": LoRA}, for the stack and merge sections
        self.figure_rows = []    # (label, model, clip) drawn into the README figure

    # ------------------------------------------------------------ helpers
    def draw(self, model, prompts, seed=11):
        return self.toy.draw(model, prompts, seed, self.per_prompt)

    def base_drawing(self, key, prompts):
        if key not in self.base_images:
            self.base_images[key] = self.draw(self.toy.model, prompts)
        return self.base_images[key]

    def scope(self, model) -> dict:
        """Untriggered prompts, same seeds: does the model still draw what the base model draws?"""
        prompts = [s.caption() for s in self.untriggered]
        base = self.base_drawing("untriggered", prompts)
        drawn = self.draw(model, prompts)
        base_read, drawn_read = self.toy.read(base), self.toy.read(drawn)
        scenes = [s for s in self.untriggered for _ in range(self.per_prompt)]  # draw()'s order: prompt by prompt
        kept, right = self.q.agreement_where_drawn_right(base_read, drawn_read, scenes)
        return {"same_detections": round(self.q.agreement(base_read, drawn_read), 4),
                "same_where_base_right": round(kept, 4), "base_right": right, "samples": len(base_read),
                "movement": round(self.q.mean_movement(base, drawn), 4)}

    def concept_scenes(self, concept):
        scenes = concept.scenes()
        return scenes[:: max(1, len(scenes) // (6 if self.per_prompt == 2 else 16))]

    def concept(self, model, concept) -> dict:
        scenes = self.concept_scenes(concept)
        readings = self.toy.read(self.draw(model, [concept.prompt(s) for s in scenes]))
        return {"shows_value": round(self.q.share_showing(readings, concept.kind, concept.value), 4),
                "samples": len(readings)}

    # ------------------------------------------------------------ sections
    def training(self, concept_name: str) -> dict:
        q = self.q
        concept = q.CONCEPTS[concept_name]
        images, captions = q.training_set(concept)  # the same recipe for ours and core: toy_world/quality.py
        reg = q.regularisation_set()
        out = {"images": q.IMAGES, "reg_images": q.REG_IMAGES, "steps": self.steps, "rank": q.RANK,
               "learning_rate": q.LEARNING_RATE, "batch_size": q.BATCH,
               "base": self.concept(self.toy.model, concept)}
        runs, loras = {}, {}
        if concept_name == "star":
            self.keep_for_figure("base model", self.toy.model)
        for key, run, figure_label, with_reg, options in OUR_RUNS:
            log(f"{concept_name}: {run}")
            model, loras[key], seconds = self.toy.train_ours(concept, images, captions, self.steps,
                                                             name=f"{concept_name}_{key}",
                                                             reg=reg if with_reg else None, **options)
            runs[run] = {"seconds": round(seconds, 1), **self.figures(model, concept)}
            if concept_name == "star":
                self.keep_for_figure(figure_label, model)
        log(f"{concept_name}: core TrainLoraNode")
        try:
            model, seconds = self.toy.train_core(concept, images, captions, self.steps)
        except Exception as e:  # reported, not hidden: the table says core's run failed and why
            runs["core TrainLoraNode"] = {"error": f"{type(e).__name__}: {str(e)[:160]}"}
        else:
            runs["core TrainLoraNode"] = {"seconds": round(seconds, 1), **self.figures(model, concept)}
            if concept_name == "star":
                self.keep_for_figure("core TrainLoraNode", model)
        out["runs"] = runs
        self.loras[concept_name] = loras
        return out

    def scope_floor(self) -> dict:
        """What training alone costs scope: the recipe on 50 more base-world images (nothing new to learn,
        trigger 'lwnull'), measured as every run's scope is."""
        q = self.q
        log("scope floor: a LoRA with nothing new to learn")
        nothing_new = q.Concept("shape", "none", "lwnull")
        images, captions = q.images_of(self.world.base_scenes(), q.IMAGES, seed=33)
        model, _, seconds = self.toy.train_ours(nothing_new, images, captions, self.steps, name="scope_floor",
                                                reg=q.regularisation_set())
        return {"seconds": round(seconds, 1), "scope": self.scope(model)}

    def keep_for_figure(self, label: str, model, clip=None) -> None:
        self.figure_rows.append((label, model, clip))

    def figure(self, path: Path) -> None:
        """One row per model, the same seeds and prompt in every column: what the figures measured."""
        from PIL import Image, ImageDraw
        prompt_star = "lwstar, a red star on a grey background"
        prompt_both = "lwstar, lwdots, a red star on a grey background, dotted"
        rows = []
        for label, model, clip in self.figure_rows:
            prompt = prompt_both if label.startswith(("stack", "merge")) else prompt_star
            images = self.toy.draw(model, [prompt], 5, 6, clip=clip)
            rows.append((f"{label}: '{prompt}'", images))
        cell, label_h = 96, 18
        sheet = Image.new("RGB", (6 * cell, len(rows) * (cell + label_h)), (255, 255, 255))
        draw = ImageDraw.Draw(sheet)
        for r, (label, images) in enumerate(rows):
            y = r * (cell + label_h)
            draw.text((4, y + 3), label, fill=(0, 0, 0))
            for c, image in enumerate(images):
                tile = Image.fromarray((image.clamp(0, 1) * 255).byte().numpy()).resize((cell, cell), Image.NEAREST)
                sheet.paste(tile, (c * cell, y + label_h))
        path.parent.mkdir(parents=True, exist_ok=True)
        sheet.save(path)

    def figures(self, model, concept) -> dict:
        return {"concept": self.concept(model, concept), "scope": self.scope(model)}

    def stack(self, loras, clamps: str = "defaults", **overrides):
        """Stack LoRA in merge mode at 1.0 each; clamps "defaults": every clamp widget at the node's own
        default (read from its schema, so the row follows the defaults), "off": none; then `overrides`."""
        node = self.toy.nodes["LW_StackLoRA"]
        widgets = {i.id: i.default for i in node.define_schema().inputs if i.id in CLAMP_WIDGETS}
        if clamps == "off":
            widgets.update({k: False for k in CLAMP_WIDGETS if isinstance(widgets[k], bool)})
        widgets.update(overrides)
        rows = {}
        for i, lora in enumerate(loras, start=1):
            rows.update({f"lora_{i}_in": lora, f"strength_model_{i}": 1.0, f"strength_clip_{i}": 1.0, f"on_{i}": True})
        out = node.execute(model=self.toy.model, clip=self.toy.clip, mode="merge", **widgets, **rows)
        return out.args[0], out.args[1], out.args[3]

    def both(self, model, clip, a, b) -> dict:
        scenes = self.concept_scenes(a)
        prompts = [f"{a.trigger}, {b.trigger}, a {s.colour} {a.value} on a {s.background} background, {b.value}"
                   for s in scenes]
        readings = self.toy.read(self.toy.draw(model, prompts, 11, self.per_prompt, clip=clip))
        return {"shows_both": round(sum(r[a.kind] == a.value and r[b.kind] == b.value for r in readings)
                                    / len(readings), 4),
                f"shows_{a.value}": round(self.q.share_showing(readings, a.kind, a.value), 4),
                f"shows_{b.value}": round(self.q.share_showing(readings, b.kind, b.value), 4),
                "samples": len(readings)}

    def stacking(self) -> dict:
        q = self.q
        a, b = q.CONCEPTS["star"], q.CONCEPTS["dotted"]
        loras = [self.loras["star"]["reg"], self.loras["dotted"]["reg"]]
        out = {}
        for label, clamps, overrides in STACKS:
            log(f"stack: {label}")
            model, clip, report = self.stack(loras, clamps, **overrides)
            out[label] = {**self.both(model, clip, a, b), "scope": self.scope(model)}
            self.keep_for_figure(f"stack, {label}", model, clip)
            if label == "1.0 each, no clamps":
                self.stack_reference = (model, clip)
        return out

    def merging(self) -> dict:
        q = self.q
        a, b = q.CONCEPTS["star"], q.CONCEPTS["dotted"]
        loras = [self.loras["star"]["reg"], self.loras["dotted"]["reg"]]
        node = self.toy.nodes["LW_MergeLoRA"]
        ref_model, ref_clip = self.stack_reference
        scenes = self.concept_scenes(a)
        prompts = [f"{a.trigger}, {b.trigger}, a {s.colour} {a.value} on a {s.background} background, {b.value}"
                   for s in scenes]
        reference = self.toy.draw(ref_model, prompts, 11, self.per_prompt, clip=ref_clip)
        out = {}
        for method, rank in (("concat", 64), ("svd", 8), ("svd", 4), ("svd", 2)):
            label = method if method == "concat" else f"svd rank {rank}"
            log(f"merge: {label}")
            rows = {}
            for i, lora in enumerate(loras, start=1):
                rows.update({f"lora_{i}_in": lora, f"strength_model_{i}": 1.0, f"strength_clip_{i}": 1.0})
            merged = node.execute(method=method, target_rank=rank, rank_mode="fixed", energy=0.95, density=0.5,
                                  seed=0, output_name="", scope="", **rows).args[0]
            model, clip, _ = self.stack([merged], "off")
            drawn = self.toy.draw(model, prompts, 11, self.per_prompt, clip=clip)
            if label == "svd rank 4":
                self.keep_for_figure(f"merge, {label}", model, clip)
            out[label] = {**self.both(model, clip, a, b),
                          "same_detections_as_stack": round(q.agreement(self.toy.read(reference),
                                                                        self.toy.read(drawn)), 4),
                          "movement_from_stack": round(q.mean_movement(reference, drawn), 4)}
        return out


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    host = hostmod.ensure_host_python(Path(__file__), sys.argv[1:])
    sys.path.insert(0, str(FIXTURES))
    began = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lw_quality_") as tmp:
        dirs = {name: Path(tmp) / name for name in ("loras", "output", "input", "user", "temp")}
        for path in dirs.values():
            path.mkdir()
        comfy = hostmod.import_comfyui(host.comfyui, dirs, {"loras": dirs["loras"]})
        import torch
        from toy_world import quality, world
        torch.set_grad_enabled(True)
        toy = quality.ToyWorld(comfy.nodes.NODE_CLASS_MAPPINGS, host.comfyui / "models")
        bench = Bench(toy, quality, world, args.quick)
        results = {"settings": {"quick": args.quick, "sampler": quality.SAMPLER, "per_prompt": bench.per_prompt,
                                "goals": GOALS}}
        for name in ("star", "dotted"):
            results[f"train {name}"] = bench.training(name)
        results["scope floor"] = bench.scope_floor()
        results["stacking"] = bench.stacking()
        results["merge"] = bench.merging()
        if not args.no_write:
            bench.figure(FIGURE)
    results["seconds"] = round(time.perf_counter() - began, 1)
    text = render(results)
    print(text)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = time.strftime("%Y-%m-%d") + ("-quick" if args.quick else "")
        (args.out / f"quality-{stamp}.json").write_text(json.dumps(results, indent=1) + "\n")
        (args.out / f"quality-latest{'-quick' if args.quick else ''}.md").write_text(text + "\n")
    return 0


def render(r: dict) -> str:
    lines = ["# Quality on the toy world", "",
             f"KSampler {r['settings']['sampler']}, {r['settings']['per_prompt']} samples a prompt; "
             f"goals: concept >= {GOALS['concept']:.0%}, scope >= {GOALS['scope']:.0%} same detections.", ""]
    for key in [k for k in r if k.startswith("train ")]:
        t = r[key]
        lines += [f"## {key}: {t['images']} images ({t.get('reg_images', 20)} for regularisation), {t['steps']} steps, "
                  f"rank {t['rank']}, batch {t.get('batch_size', 4)}", "",
                  f"base model shows it in {t['base']['shows_value']:.0%} of {t['base']['samples']} triggered samples",
                  "", "| run | concept (shows the value) | scope (same detections) | scope where the base draws "
                  "right | movement | seconds |", "|---|---|---|---|---|---|"]
        for name, run in t["runs"].items():
            if "error" in run:
                lines.append(f"| {name} | failed: {run['error']} | | | | |")
                continue
            lines.append(f"| {name} | {run['concept']['shows_value']:.0%} | {_scope_cells(run['scope'])} | "
                         f"{run['seconds']} |")
        lines.append("")
    if "scope floor" in r:
        floor = r["scope floor"]["scope"]
        lines += [f"Scope floor: a LoRA trained with the same recipe on {r['train star']['images']} more base-world "
                  f"images (nothing new to learn) keeps {floor['same_detections']:.0%} of the untriggered samples "
                  f"(movement {floor['movement']:.3f}); {_where_right(floor)}.", ""]
    lines += ["## Stacking: star + dotted, 1.0 each", "",
              "| stack | shows both | star | dotted | scope (same detections) | scope where the base draws right | "
              "movement |", "|---|---|---|---|---|---|---|"]
    for name, s in r["stacking"].items():
        lines.append(f"| {name} | {s['shows_both']:.0%} | {s['shows_star']:.0%} | {s['shows_dotted']:.0%} | "
                     f"{_scope_cells(s['scope'])} |")
    lines += ["", "## Merge of the two against their unclamped stack", "",
              "| merge | shows both | same detections as the stack | movement from the stack |", "|---|---|---|---|"]
    for name, m in r["merge"].items():
        lines.append(f"| {name} | {m['shows_both']:.0%} | {m['same_detections_as_stack']:.0%} | "
                     f"{m['movement_from_stack']:.3f} |")
    lines += ["", f"{r['seconds']} s in all."]
    return "\n".join(lines)


def _scope_cells(scope: dict) -> str:
    where = f"{scope['same_where_base_right']:.1%} of {scope['base_right']}" if "base_right" in scope else "-"
    return f"{scope['same_detections']:.1%} | {where} | {scope['movement']:.3f}"


def _where_right(scope: dict) -> str:
    return (f"of the {scope['base_right']} of {scope['samples']} samples the base model draws as captioned, "
            f"it keeps {scope['same_where_base_right']:.1%}")


if __name__ == "__main__":
    sys.exit(main())
