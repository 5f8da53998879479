"""Turn a UI-format workflow (what ComfyUI saves, and example_workflows/ holds) into the API
format /prompt takes, using the server's /object_info for each node's widget order.

Standard library only. Handles what the example workflows use: links, widget values, the
extra "control after generate" value that seed widgets save, and nodes without inputs.
"""
from __future__ import annotations

import json
import urllib.request

CONNECTION_ONLY = {"MODEL", "CLIP", "VAE", "CONDITIONING", "LATENT", "IMAGE", "MASK", "LW_LORA", "LORA_STACK", "*"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    if isinstance(kind, list):  # a combo's options
        return True
    return kind in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") or (
        kind not in CONNECTION_ONLY and isinstance(spec[1] if len(spec) > 1 else None, dict)
        and "default" in spec[1])


def _widget_names(info: dict) -> list[tuple[str, dict]]:
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        for name in order.get(section, []):
            spec = specs.get(name)
            if spec is not None and _is_widget(spec):
                out.append((name, spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
    return out


def convert(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: (str(link[1]), link[2]) for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        info = object_info[node["type"]]
        inputs = {}
        values = list(node.get("widgets_values") or [])
        for name, options in _widget_names(info):
            if not values:
                break
            inputs[name] = values.pop(0)
            if options.get("control_after_generate") or name in ("seed", "noise_seed"):
                if values and values[0] in ("fixed", "increment", "decrement", "randomize"):
                    values.pop(0)
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                inputs[slot["name"]] = list(links[slot["link"]])
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def fetch_object_info(base_url: str) -> dict:
    with urllib.request.urlopen(f"{base_url}/object_info", timeout=60) as response:
        return json.loads(response.read())
