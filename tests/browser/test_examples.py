"""Every example workflow loads in the real frontend, runs on the real server, and its outputs exist;
the node views (effective strengths, live loss chart, merge report) show the run."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import pytest
from host_fixture.toy_world import build

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "example_workflows").glob("*.json"))
RUN_TIMEOUT_S = 300


@pytest.fixture(scope="session")
def scratch_folder(host_install, loras_dir):
    """A folder under models/loras for what the examples write (a fresh one per session; the examples'
    own folder when LW_UPDATE_SCREENSHOTS=1, so the README screenshots show its names). What the
    runs wrote is removed after the session."""
    docs = os.environ.get("LW_UPDATE_SCREENSHOTS") == "1"
    name = "lora_workbench_examples" if docs else f"lw_browser_{uuid.uuid4().hex[:8]}"
    yield name
    for root in (Path(host_install.comfyui) / "models" / "loras", Path(loras_dir)):
        folder = root / name
        if not docs:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        for file in WRITTEN:
            for path in folder.parent.glob(file + "*"):  # the LoRA and its optimizer state
                path.unlink()
        with contextlib.suppress(OSError):
            folder.rmdir()


WRITTEN: list[str] = []  # LoRA files the example runs wrote, names relative to the loras folder


def _get(url: str, raw: bool = False):
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
            return response.status, body if raw else json.loads(body)
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def _history(comfy_http, prompt_id: str) -> dict | None:
    return comfy_http.get_json(f"/history/{prompt_id}").get(prompt_id)


def _chart(ui) -> dict | None:
    return ui.js("""() => {
        const view = document.querySelector('[data-lw-train]');
        if (!view) return null;
        const canvas = view.querySelector('canvas');
        return {points: Number(canvas.dataset.points), state: view.dataset.state, step: Number(view.dataset.step),
                samples: view.querySelectorAll('.lw-train-samples img').length};
    }""")


def _nodes(ui, node_type: str) -> list[int]:
    return ui.js("t => app.graph.nodes.filter(n => n.type === t).map(n => n.id)", node_type)


def _check_outputs(ui, comfy_http, entry: dict, prompt: dict) -> list[str]:
    """Check that every output the run reports exists on the server; returns the LoRA files it wrote."""
    written = []
    outputs = entry["outputs"]
    for node_id, node in prompt.items():
        kind, out = node["class_type"], outputs.get(node_id, {})
        if kind == "SaveImage":
            assert out.get("images"), f"SaveImage {node_id} saved nothing"
            for image in out["images"]:
                query = urllib.parse.urlencode({k: image[k] for k in ("filename", "subfolder", "type")})
                status, body = _get(f"{comfy_http.url}/view?{query}", raw=True)
                assert status == 200 and body[:8] == b"\x89PNG\r\n\x1a\n", image
        elif kind == "PreviewAny":
            assert any(out.get("text") or []), f"PreviewAny {node_id} showed nothing"
        elif kind == "LW_StackLoRA":
            assert out.get("lw_effective"), "Stack LoRA reported no effective strengths"
        elif kind == "LW_TrainLoRA":
            summary = json.loads(out["lw_train"][0])
            assert summary["steps"] == node["inputs"]["steps"] and len(out["lw_loss"]) == summary["steps"]
            written.append((summary["file"], node["inputs"]["trigger_word"]))
        elif kind == "LW_MergeLoRA":
            saved = [line[7:] for line in out["lw_report"][0].splitlines() if line.startswith("saved: ")]
            assert saved and out["lw_merge"], out
            written.append((saved[0], None))
    for file_name, trigger in written:  # the saved LoRAs are real files in the loras folder
        status, info = _get(f"{comfy_http.url}/lora_workbench/info?name={urllib.parse.quote(file_name)}")
        assert status == 200, (file_name, status, info)
        if trigger:
            assert trigger in info["trigger_words"]
        assert info["provenance"], f"{file_name} carries no provenance"
    return [w[0] for w in written]


def _info_text(ui, file_name: str) -> str:
    """A Load LoRA beside the graph, set to a file the run wrote: its info panel's text."""
    node = ui.js("""name => {
        const xs = app.graph.nodes.map(n => n.pos[0] + n.size[0]);
        const node = LiteGraph.createNode('LW_LoadLoRA');
        node.pos = [Math.max(...xs) + 80, 0];
        app.graph.add(node);
        const w = node.widgets.find(w => w.name === 'lora_name');
        w.value = name;  // written by the run: not in the list until the models are refreshed
        w.callback?.(name);
        return node.id;
    }""", file_name)
    ui.focus([node], top=100)
    selector = f"[data-lw-info][data-node='{node}'] .lw-info[data-name='{file_name}']"
    ui.page.locator(selector).wait_for(timeout=10_000)
    ui.settle(300)
    return ui.page.locator(selector).inner_text()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_workflow_loads_runs_and_shows_its_results(ui, comfy_http, info_route, path, scratch_folder):
    workflow = json.loads(path.read_text())
    ui.load(workflow, path.stem)
    types = ui.js("() => app.graph.nodes.map(n => n.type)")
    assert sorted(types) == sorted(n["type"] for n in workflow["nodes"])
    missing = ui.js("() => app.graph.nodes.filter(n => !LiteGraph.registered_node_types[n.type]).map(n => n.type)")
    assert not missing, f"{path.name}: node types the server does not know: {missing}"
    # the row editors show the rows the file saved
    for stack in _nodes(ui, "LW_StackLoRA") + _nodes(ui, "LW_MergeLoRA"):
        saved = next(n for n in workflow["nodes"] if n["id"] == stack)
        names = [v for v in saved["widgets_values"] if isinstance(v, str) and v.endswith(".safetensors")]
        linked = [i for i in saved["inputs"] if i["name"].endswith("_in") and i.get("link") is not None]
        ui.focus([stack])
        shown = ui.js("id => document.querySelectorAll(`[data-lw-editor][data-node='${id}'] .lw-row`).length", stack)
        assert shown == len(names) + len(linked), (path.name, stack, names, linked, shown)
    # what the examples write goes to this session's scratch folder
    ui.js("""folder => { for (const n of app.graph.nodes) {
        const writes = n.type === 'LW_TrainLoRA' || n.type === 'LW_MergeLoRA';
        const w = writes && n.widgets.find(w => w.name === 'output_name');
        if (w && w.value) w.value = folder + '/' + w.value.split('/').pop(); } }""", scratch_folder)
    prompt = ui.prompt()["output"]

    trains = _nodes(ui, "LW_TrainLoRA")
    if trains:
        stacks = _nodes(ui, "LW_StackLoRA")
        ui.focus_bottom(trains[0], stacks[:1])
    started = time.monotonic()
    prompt_id = ui.queue()
    seen, mid_shot = [], False
    while (entry := _history(comfy_http, prompt_id)) is None:
        assert time.monotonic() - started < RUN_TIMEOUT_S, f"{path.name} still running after {RUN_TIMEOUT_S} s"
        if trains:
            chart = _chart(ui)
            if chart and chart["state"] == "running" and (not seen or chart["points"] != seen[-1]):
                seen.append(chart["points"])
            if not mid_shot and seen and seen[-1] >= 3:
                ui.screenshot("train_view_live", docs=True)
                mid_shot = True
        time.sleep(0.1)
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"], indent=1)[:3000]
    written = _check_outputs(ui, comfy_http, entry, prompt)
    WRITTEN.extend(written)
    assert all(name.startswith(scratch_folder + "/") for name in written), written

    if trains:  # the live loss chart grew while the run went on, one point per step
        steps = prompt[str(trains[0])]["inputs"]["steps"]
        assert len(seen) >= 3 and seen == sorted(seen) and seen[-1] <= steps, seen
        ui.wait_for("n => document.querySelector('[data-lw-train]')?.dataset.state === 'done'", timeout=15_000)
        chart = _chart(ui)
        assert chart["points"] == steps and chart["step"] == steps, chart
        if prompt[str(trains[0])]["inputs"]["sample_every"]:
            assert chart["samples"] >= 1, "the sample renders should show as they are made"
        ui.focus_bottom(trains[0], _nodes(ui, "LW_StackLoRA")[:1])
        ui.screenshot("train_view", docs=True)
        print(f"loss chart points seen while running: {seen}")
    for merge in _nodes(ui, "LW_MergeLoRA"):
        ui.focus_bottom(merge, _nodes(ui, "LW_StackLoRA")[:1])
        ui.wait_for("() => document.querySelector(\"[data-lw-report='LW_MergeLoRA'] table tr + tr\")", timeout=15_000)
        text = ui.page.locator("[data-lw-report='LW_MergeLoRA']").inner_text()
        assert "svd merge of 3 LoRAs" in text and "saved" in text, text
        ui.screenshot("merge_report", docs=True)
    for stack in _nodes(ui, "LW_StackLoRA"):
        ui.focus([stack], top=100)
        ui.wait_for("() => document.querySelector('[data-lw-editor] .lw-eff')", timeout=15_000)
    for file_name in written:  # what the info panel says about the LoRAs the run wrote: their origin
        text = _info_text(ui, file_name)
        if trains:
            assert (f"trained in LoRA Workbench on {build.DATASET_SIZE} images, {build.REG_DATASET_SIZE} "
                    "regularisation images, 300 steps") in text, text  # the toy world's dataset folders
            assert "lwstar" in text, text
            ui.screenshot("lora_info_trained", docs=True)
        else:
            assert "merged (svd) from lw_toy/star.safetensors ×1" in text, text
            ui.screenshot("lora_info_merged", docs=True)
    if path.stem == "stack_three_clamped":
        ui.focus(_nodes(ui, "LW_StackLoRA"), top=100)
        ui.screenshot("stack_three_clamped", docs=True)
    ui.screenshot(f"example_{path.stem}")


def test_template_browser_lists_the_examples_with_thumbnails(ui, comfy_http):
    listed = comfy_http.get_json("/workflow_templates").get("lora_workbench", [])
    assert sorted(listed) == sorted(p.stem for p in EXAMPLES)
    for path in EXAMPLES:  # the card's thumbnail: <name>.jpg beside the workflow
        status, body = _get(f"{comfy_http.url}/api/workflow_templates/lora_workbench/{path.stem}.jpg", raw=True)
        assert status == 200 and body[:3] == b"\xff\xd8\xff", f"{path.stem}.jpg is missing"
    # the README's path: the ComfyUI logo menu, Browse Templates, then the pack under Extensions
    ui.page.locator("svg.comfyui-logo").click()
    ui.page.get_by_role("menuitem", name="Browse Templates").click()
    ui.page.get_by_text("lora_workbench", exact=True).first.click()
    for path in EXAMPLES:
        ui.page.get_by_text(path.stem, exact=True).first.wait_for(timeout=10_000)
    # the cards in view show their thumbnails (the frontend loads them lazily, as blobs)
    ui.wait_for("""() => [...document.querySelectorAll('.p-dialog img')].filter(i => i.complete && i.naturalWidth > 0
                          && i.getBoundingClientRect().top < window.innerHeight).length >= 3""", timeout=15_000)
    ui.screenshot("templates", docs=True)
    ui.page.keyboard.press("Escape")
