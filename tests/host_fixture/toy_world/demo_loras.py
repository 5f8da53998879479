"""Train the example workflows' LoRAs on the toy world with this pack's own Train LoRA node.

Writes models/loras/lw_toy/{star,dotted,purple}.safetensors (about a minute in all on 2 cores):
each learns one held-out value with the recipe benchmarks/quality.py measures (quality.IMAGES captioned
images and quality.REG_IMAGES base-world images for regularisation), as a user would train it. Run by
scripts/comfy_host.py after build.py:

    python demo_loras.py --comfyui <ComfyUI dir>
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
STEPS = 400
OUTPUT = "lw_toy/{value}.safetensors"  # under models/loras


def _comfy_host_script():
    path = HERE.parents[2] / "scripts" / "comfy_host.py"
    spec = importlib.util.spec_from_file_location("lw_comfy_host_script", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", type=Path, required=True, help="ComfyUI root")
    args = parser.parse_args()
    root = args.comfyui.resolve()
    sys.path.insert(0, str(HERE.parent))
    with tempfile.TemporaryDirectory(prefix="lw_toy_loras_") as tmp:
        dirs = {name: Path(tmp) / name for name in ("output", "input", "user", "temp")}
        for path in dirs.values():
            path.mkdir()
        nodes, loop = _comfy_host_script().import_in_process(root, dirs, {})
        import torch

        from toy_world import quality
        torch.set_grad_enabled(True)
        toy = quality.ToyWorld(nodes.NODE_CLASS_MAPPINGS, root / "models")
        reg = quality.regularisation_set()
        written = []
        for value, concept in quality.CONCEPTS.items():
            images, captions = quality.training_set(concept)
            toy.train_ours(concept, images, captions, STEPS, name=value, reg=reg)
            written.append("loras/" + OUTPUT.format(value=value))
            print(f"[toy_world] trained {written[-1]}", file=sys.stderr, flush=True)
        loop.close()
    print(json.dumps(written))  # last stdout line: read by scripts/comfy_host.py


if __name__ == "__main__":
    main()
