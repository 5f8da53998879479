"""Every example workflow (UI format, as the template browser serves it) runs on the tiny models."""
import importlib.util
import json
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))


def _converter():
    path = Path(__file__).resolve().parents[2] / "scripts" / "workflow_to_prompt.py"
    spec = importlib.util.spec_from_file_location("workflow_to_prompt", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_there_are_four_examples():
    assert {p.stem for p in EXAMPLES} >= {"load_lora", "stack_three_clamped", "train_then_stack", "merge_three"}


@pytest.mark.parametrize("workflow", EXAMPLES, ids=lambda p: p.stem)
def test_example_runs_to_completion_with_outputs(comfy_http, workflow):
    convert = _converter()
    prompt = convert.convert(json.loads(workflow.read_text()), convert.fetch_object_info(comfy_http.url))
    assert any(node["class_type"].startswith("LW_") for node in prompt.values())
    entry = comfy_http.run_prompt(prompt, timeout=300)
    assert entry["status"]["status_str"] == "success"
    produced = [item for out in entry["outputs"].values() for key in ("images", "text", "lw_report")
                for item in out.get(key, [])]
    assert produced, f"{workflow.name} produced no outputs"
