"""The pack in ComfyUI's graph editor, in a real browser: node search, the Stack LoRA row editor,
the LoRA info panel and route."""
import json
import urllib.error
import urllib.parse
import urllib.request

import pytest

OUR_NODES = {"LW_LoadLoRA": "Load LoRA (Workbench)", "LW_StackLoRA": "Stack LoRA (Workbench)",
             "LW_TrainLoRA": "Train LoRA (Workbench)", "LW_MergeLoRA": "Merge LoRA (Workbench)"}
SD15 = "lw_tiny_sd15.safetensors"
STYLE = "lw_demo_style.safetensors"  # trigger phrase 'lwstyle' (tests/host_fixture/demo_lora.py)
EDITOR = "[data-lw-editor='LW_StackLoRA']"


def _node_types(ui) -> list[str]:
    return ui.js("() => app.graph.nodes.map(n => n.type)")


def test_node_search_finds_and_adds_our_four_nodes(ui):
    for n, (node_type, display) in enumerate(OUR_NODES.items()):
        box = ui.open_node_search()  # a double click on empty canvas
        box.fill(display)
        option = ui.page.locator(".p-autocomplete-option").filter(has_text=display).filter(
            has_text="LoRA Workbench").first
        option.wait_for(state="visible", timeout=10_000)
        if node_type == "LW_StackLoRA":
            ui.screenshot("node_search", docs=True)
        option.click()
        ui.wait_for("t => app.graph.nodes.some(n => n.type === t)", node_type)
        box.wait_for(state="hidden")
        # out of the way, so the next double click lands on empty canvas again
        ui.js("([t, n]) => { app.graph.nodes.find(x => x.type === t).pos = [3000 + 600 * n, 0]; }", [node_type, n])
        ui.settle()
    assert sorted(_node_types(ui)) == sorted(OUR_NODES)
    # and the same four through LiteGraph, as scripts and other extensions create them
    for node_type in OUR_NODES:
        ui.add_node(node_type, (1200, 100))
    assert sorted(_node_types(ui)) == sorted(list(OUR_NODES) * 2)


def test_node_search_tells_ours_apart_from_cores_load_and_train_lora(ui):
    for word in ("Load LoRA", "Train LoRA"):
        box = ui.open_node_search()
        box.fill(word)
        ui.page.locator(f".p-autocomplete-option[aria-label='{word} (Workbench)']").wait_for(timeout=10_000)
        listed = ui.js("() => [...document.querySelectorAll('.p-autocomplete-option')].map(o => o.innerText)")
        by_name = {text.split("\n")[0].strip(): text for text in listed}
        assert "Comfy Core" in by_name[word], listed  # core's node, under its own name
        assert "LoRA Workbench" in by_name[f"{word} (Workbench)"], listed
        ui.page.keyboard.press("Escape")
        box.wait_for(state="hidden")


def _stack_graph(ui, **values) -> dict:
    ckpt = ui.add_node("CheckpointLoaderSimple", (-260, 80), {"ckpt_name": SD15})
    stack = ui.add_node("LW_StackLoRA", (80, 40), values)
    show = ui.add_node("PreviewAny", (600, 60))
    ui.connect(ckpt, "MODEL", stack, "model")
    ui.connect(ckpt, "CLIP", stack, "clip")
    ui.connect(stack, "report", show, "source")
    ui.focus([stack], top=20)
    return {"ckpt": ckpt, "stack": stack, "show": show}


def _pick(ui, row: int, text: str, value: str) -> None:
    ui.page.locator(f"{EDITOR} .lw-row[data-row='{row}'] .lw-pick").click()
    picker = ui.page.locator(".lw-panel.lw-picker")
    picker.locator("input").fill(text)
    picker.locator(".lw-picker-item", has_text=value).first.wait_for()
    ui.page.keyboard.press("Enter")
    ui.page.locator(f"{EDITOR} .lw-row[data-row='{row}'][data-lora='{value}']").wait_for()


def _rows(ui) -> list[dict]:
    return ui.js("""() => [...document.querySelectorAll("[data-lw-editor] .lw-row")].map(r => ({
        row: Number(r.dataset.row), lora: r.dataset.lora, on: r.querySelector('.lw-toggle').checked,
        model: Number(r.querySelector("input.lw-num[data-field=strength_model]").value),
        effective: [...r.querySelectorAll('.lw-eff')].map(e => ({value: Number(e.dataset.effective),
            clamped: e.classList.contains('lw-clamped')}))}))""")


def test_row_editor_adds_toggles_reorders_and_the_prompt_carries_the_rows(ui, comfy_http):
    ids = _stack_graph(ui)
    stack = ids["stack"]
    assert len(_rows(ui)) == 1, "a new Stack LoRA shows one empty row"
    _pick(ui, 1, "demo_a", "lw_demo_a.safetensors")

    ui.page.locator(f"{EDITOR} .lw-add").click()
    ui.page.locator(f"{EDITOR} .lw-row[data-row='2']").wait_for()
    _pick(ui, 2, "demo_b", "lw_demo_b.safetensors")
    box = ui.page.locator(f"{EDITOR} .lw-row[data-row='2'] input.lw-num[data-field=strength_model]")
    box.fill("1.6")
    box.press("Tab")
    ui.page.locator(f"{EDITOR} .lw-add").click()
    _pick(ui, 3, "demo_style", STYLE)  # "style" alone also matches http_style.safetensors of tests/http
    ui.page.locator(f"{EDITOR} .lw-row[data-row='3'] .lw-toggle").click()  # row 3 off
    rows = _rows(ui)
    assert [(r["lora"], r["on"], r["model"]) for r in rows] == [
        ("lw_demo_a.safetensors", True, 1.0), ("lw_demo_b.safetensors", True, 1.6), (STYLE, False, 1.0)]

    inputs = ui.prompt()["output"][str(stack)]["inputs"]
    assert (inputs["lora_1"], inputs["lora_2"], inputs["lora_3"], inputs["lora_4"]) == (
        "lw_demo_a.safetensors", "lw_demo_b.safetensors", STYLE, "None")
    assert inputs["strength_model_2"] == pytest.approx(1.6) and inputs["on_3"] is False and inputs["on_1"] is True

    # reorder: row 2 up, then the (off) style row to the top by dragging its handle
    ui.page.locator(f"{EDITOR} .lw-row[data-row='2'] .lw-up").click()
    ui.page.locator(f"{EDITOR} .lw-row[data-row='3'] .lw-handle").drag_to(
        ui.page.locator(f"{EDITOR} .lw-row[data-row='1']"))
    assert [(r["lora"], r["on"]) for r in _rows(ui)] == [
        (STYLE, False), ("lw_demo_b.safetensors", True), ("lw_demo_a.safetensors", True)]
    inputs = ui.prompt()["output"][str(stack)]["inputs"]
    assert (inputs["lora_1"], inputs["on_1"], inputs["lora_2"], inputs["strength_model_2"]) == (
        STYLE, False, "lw_demo_b.safetensors", pytest.approx(1.6))

    # a saved workflow reloads with the same rows (widget values are what is saved)
    saved = ui.js("() => JSON.parse(JSON.stringify(app.graph.serialize()))")
    ui.clear()
    ui.load(saved)
    ui.focus([stack], top=20)
    assert [(r["lora"], r["on"], r["model"]) for r in _rows(ui)] == [
        (STYLE, False, 1.0), ("lw_demo_b.safetensors", True, 1.6), ("lw_demo_a.safetensors", True, 1.0)]

    # a run: every row shows the strength actually applied next to the requested one
    entry = comfy_http.wait_for(ui.queue(), timeout=120)
    assert entry["status"]["status_str"] == "success"
    ui.wait_for("() => document.querySelectorAll('[data-lw-editor] .lw-eff').length >= 4", timeout=20_000)
    rows = _rows(ui)
    b_row = rows[1]
    assert b_row["effective"][0]["clamped"] and b_row["effective"][0]["value"] <= 1.0 + 1e-6, \
        "1.6 requested is above weight_max 1.0: the editor must show the clamped value"
    assert rows[0]["effective"][0]["value"] == 0 and not rows[0]["effective"][0]["clamped"], "an off row shows 'off'"
    ui.focus_bottom(stack, [ids["show"]])
    ui.screenshot("stack_rows", docs=True)
    ui.focus([stack], top=20)

    # remove the first row: the others move up, the prompt follows
    ui.page.locator(f"{EDITOR} .lw-row[data-row='1'] .lw-remove").click()
    assert [r["lora"] for r in _rows(ui)] == ["lw_demo_b.safetensors", "lw_demo_a.safetensors"]
    inputs = ui.prompt()["output"][str(stack)]["inputs"]
    assert (inputs["lora_1"], inputs["lora_2"], inputs["lora_3"]) == (
        "lw_demo_b.safetensors", "lw_demo_a.safetensors", "None")


def test_row_editor_moves_connected_loras_with_their_row(ui):
    ids = _stack_graph(ui)
    stack = ids["stack"]
    load = ui.add_node("LW_LoadLoRA", (-260, 400), {"lora_name": STYLE})
    ui.connect(ids["ckpt"], "MODEL", load, "model")
    ui.page.locator(f"{EDITOR} .lw-add").click()
    ui.connect(load, "LORA", stack, "lora_2_in")
    ui.wait_for("() => document.querySelector(\"[data-lw-editor] .lw-row[data-row='2'] .lw-linked\")")
    ui.page.locator(f"{EDITOR} .lw-row[data-row='2'] .lw-up").click()
    links = ui.js("""id => Object.fromEntries(app.graph.getNodeById(id).inputs
        .filter(i => /^lora_\\d_in$/.test(i.name)).map(i => [i.name, i.link != null]))""", stack)
    assert links["lora_1_in"] and not links["lora_2_in"]
    assert ui.prompt()["output"][str(stack)]["inputs"]["lora_1_in"] == [str(load), 2]


def test_info_panel_shows_trigger_words_and_copies_them(ui, info_route):
    load = ui.add_node("LW_LoadLoRA", (80, 40), {"lora_name": STYLE})
    ui.focus([load], top=40)
    panel = ui.page.locator("[data-lw-info] .lw-info")
    panel.wait_for(timeout=10_000)
    text = panel.inner_text()
    assert "LoRA Workbench demo (lwstyle)" in text and "SD1.x" in text and "rank 4" in text and "alpha 4" in text
    assert "one style: the demo style of the tiny test model" in text
    chip = ui.page.locator("[data-lw-info] .lw-trigger[data-word='lwstyle']")
    chip.click()
    assert ui.js("() => navigator.clipboard.readText()") == "lwstyle"
    ui.screenshot("lora_info", docs=True)

    # the same panel from a Stack LoRA row's info button
    stack = ui.add_node("LW_StackLoRA", (520, 40), {"lora_1": STYLE})
    ui.focus([load, stack], top=40)
    ui.page.locator(f"{EDITOR} .lw-row[data-row='1'] .lw-info-btn").click()
    popup = ui.page.locator(".lw-panel.lw-info-panel .lw-trigger[data-word='lwstyle']")
    popup.wait_for(timeout=10_000)
    ui.screenshot("lora_info_stack_row", docs=True)

    # picking another LoRA updates the panel
    ui.js("""id => { const w = app.graph.getNodeById(id).widgets.find(w => w.name === 'lora_name');
        w.value = 'lw_demo_a.safetensors'; w.callback?.(w.value); }""", load)
    ui.page.locator("[data-lw-info] .lw-trigger[data-word='lwdemoa']").wait_for(timeout=10_000)


@pytest.mark.parametrize(("weight", "label"), [(3.0, "output preservation ×3"), (1.0, "output preservation")])
def test_info_panel_says_how_a_trained_lora_was_trained(ui, info_route, host_install, loras_dir, weight, label):
    """A Train LoRA file's provenance as the panel words it: images, steps, rate, and output preservation with
    its weight when that is not 1 (the demo style's tensors under a provenance Train LoRA writes)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(host_install.comfyui / "models" / "loras" / STYLE), "pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())
    settings = {"steps": 600, "learning_rate": 0.024, "resolution": 64, "preserve_untriggered": True,
                "preservation_weight": weight}
    metadata["lw.provenance"] = json.dumps({"images_sha256": ["0" * 64] * 50, "reg_images_sha256": ["1" * 64] * 20,
                                            "settings": settings})
    name = f"lw_provenance_w{weight:g}.safetensors"
    save_file(tensors, str(loras_dir / name), metadata)
    load = ui.add_node("LW_LoadLoRA", (80, 40), {"lora_name": name})  # not listed until a refresh: set directly
    ui.focus([load], top=40)
    panel = ui.page.locator(f"[data-lw-info] .lw-info[data-name='{name}']")
    panel.wait_for(timeout=10_000)
    lines = panel.inner_text().splitlines()
    assert ("trained in LoRA Workbench on 50 images, 20 regularisation images, 600 steps, lr 0.024, 64px, "
            f"{label}") in lines, lines  # the whole line: at weight 1 no "×1" after it


def _get(url: str):
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


@pytest.mark.parametrize("prefix", ["", "/api"])
def test_info_route_reads_the_header_and_refuses_names_leaving_the_folder(comfy_server, info_route, prefix):
    base = f"{comfy_server}{prefix}/lora_workbench/info?name="
    status, body = _get(base + STYLE)
    assert status == 200, (status, body)
    assert body["trigger_words"][0] == "lwstyle" and body["family"] == "SD1.x" and body["rank"] == "4"
    for name in ("../" + STYLE, "../../main.py", "loras/../../x.safetensors", "..\\x.safetensors"):
        status, body = _get(base + urllib.parse.quote(name))
        assert status == 400 and "'..'" in body["error"], (name, status, body)
    status, body = _get(base + urllib.parse.quote("/etc/passwd"))
    assert status == 400 and "relative" in body["error"]
    status, body = _get(base + "no_such_lora.safetensors")
    assert status == 404 and "not found" in body["error"]
    status, body = _get(base)
    assert status == 400


def test_info_route_from_the_page(ui, info_route):
    ui.expect_console_error("400 (Bad Request) @ " + ui.url + "/api/lora_workbench/info?name=..%2Fsecret")
    result = ui.js("""async () => {
        const name = encodeURIComponent('../secret.safetensors');
        const r = await comfyAPI.api.api.fetchApi('/lora_workbench/info?name=' + name);
        return [r.status, await r.json()];
    }""")
    assert result[0] == 400 and "'..'" in result[1]["error"]


def test_row_block_weights_are_compact_saved_and_shown_after_a_run_and_old_saves_load(ui, comfy_http):
    ids = _stack_graph(ui, lora_1=STYLE)
    stack = ids["stack"]
    text = ui.page.locator(f"{EDITOR} .lw-row[data-row='1'] input.lw-blocks-text")
    assert text.input_value() == "" and text.get_attribute("list") == "lw-block-presets"
    # one line per row: the block weights field sits under the two strength sliders
    heights = ui.js("() => [...document.querySelectorAll('[data-lw-editor] .lw-row')].map(r => r.offsetHeight)")
    assert heights[0] <= 110
    vector = "1,0,1,1,2,1,1,1"  # the tiny SD1.5: BASE, IN01, IN03, MID, OUT00..OUT03
    text.fill(vector)
    text.press("Tab")
    inputs = ui.prompt()["output"][str(stack)]["inputs"]
    assert inputs["blocks_1"] == vector and inputs["blocks_2"] == ""
    assert inputs["use_spectral_cap"] is False and inputs["spectral_cap"] == pytest.approx(0.5)

    # a saved workflow reloads with its block weights
    saved = ui.js("() => JSON.parse(JSON.stringify(app.graph.serialize()))")
    ui.clear()
    ui.load(saved)
    ui.focus([stack], top=20)
    assert ui.page.locator(f"{EDITOR} .lw-row[data-row='1'] input.lw-blocks-text").input_value() == vector
    assert ui.prompt()["output"][str(stack)]["inputs"]["blocks_1"] == vector

    # a run: the row says how many blocks the vector reached and how many are off (IN01 at 0)
    entry = comfy_http.wait_for(ui.queue(), timeout=120)
    assert entry["status"]["status_str"] == "success"
    ui.wait_for("() => document.querySelector(\"[data-lw-editor] .lw-row[data-row='1'] .lw-eff[data-blocks]\")",
                timeout=20_000)
    summary = ui.page.locator(f"{EDITOR} .lw-row[data-row='1'] .lw-eff[data-blocks]")
    assert summary.inner_text() == "8 blocks, 1 off"
    assert "OUT00 1" in summary.get_attribute("title") and "IN01 0" in summary.get_attribute("title")

    # a workflow saved before block weights and the spectral cap existed (33 widget values) loads unchanged
    node = next(n for n in saved["nodes"] if n["id"] == stack)
    node["widgets_values"] = node["widgets_values"][:33]
    ui.clear()
    ui.load(saved)
    inputs = ui.prompt()["output"][str(stack)]["inputs"]
    assert inputs["lora_1"] == STYLE and inputs["blocks_1"] == "" and inputs["use_spectral_cap"] is False
