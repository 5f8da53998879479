"""Smoke tests of the ComfyUI server subprocess (comfy_server / comfy_http fixtures)."""
import urllib.parse
import urllib.request


def test_object_info_lists_core_nodes(comfy_http):
    info = comfy_http.get_json("/object_info")
    for node in ("KSampler", "CheckpointLoaderSimple", "LoraLoader", "UNETLoader"):
        assert node in info
    checkpoints = info["CheckpointLoaderSimple"]["input"]["required"]["ckpt_name"][0]
    assert "lw_tiny_sd15.safetensors" in checkpoints


def test_session_loras_dir_is_visible(comfy_http, loras_dir):
    probe = loras_dir / "lw_http_probe.safetensors"
    probe.write_bytes(b"")  # the listing only looks at names
    try:
        assert "lw_http_probe.safetensors" in comfy_http.get_json("/models/loras")
    finally:
        probe.unlink()


def test_txt2img_over_http(comfy_http, tiny_txt2img):
    entry = comfy_http.run_prompt(tiny_txt2img(seed=5, prefix="lw_http"), timeout=120)
    images = entry["outputs"]["7"]["images"]
    assert len(images) == 1 and images[0]["filename"].startswith("lw_http")
    query = urllib.parse.urlencode({k: images[0][k] for k in ("filename", "subfolder", "type")})
    with urllib.request.urlopen(f"{comfy_http.url}/view?{query}", timeout=30) as response:
        assert response.read(8) == b"\x89PNG\r\n\x1a\n"


def test_our_display_names_differ_from_every_other_node_and_ids_stay(comfy_http):
    info = comfy_http.get_json("/object_info")
    ours = {node: info[node]["display_name"] for node in ("LW_LoadLoRA", "LW_StackLoRA", "LW_TrainLoRA", "LW_MergeLoRA")}
    assert ours == {"LW_LoadLoRA": "Load LoRA (Workbench)", "LW_StackLoRA": "Stack LoRA (Workbench)",
                    "LW_TrainLoRA": "Train LoRA (Workbench)", "LW_MergeLoRA": "Merge LoRA (Workbench)"}
    others = {spec.get("display_name") or name: name for name, spec in info.items() if not name.startswith("LW_")}
    assert others["Load LoRA"] == "LoraLoader" and others["Train LoRA"] == "TrainLoraNode"  # core's, for contrast
    assert not set(ours.values()) & set(others), "a display name is also another node's"


def test_row_widgets_declare_their_toggle_and_sliders(comfy_http):
    """Stack and Merge LoRA's rows look like the row editor's (an on/off toggle, strength sliders) in an editor
    without the web extension: the schema says so."""
    info = comfy_http.get_json("/object_info")
    for node, rows in (("LW_StackLoRA", 6), ("LW_MergeLoRA", 4)):
        inputs = {**info[node]["input"]["required"], **info[node]["input"].get("optional", {})}
        for i in range(1, rows + 1):
            assert (inputs[f"on_{i}"][1]["label_on"], inputs[f"on_{i}"][1]["label_off"]) == ("on", "off")
            for part in ("model", "clip"):
                spec = inputs[f"strength_{part}_{i}"][1]
                assert (spec["display"], spec["min"], spec["max"], spec["step"]) == ("slider", -10.0, 10.0, 0.01)
