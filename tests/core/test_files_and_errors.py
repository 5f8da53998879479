"""lora_core alone: file safety (no pickle, truncation, NaN), atomic writes, paths, wrong base."""
import os

import pytest
import torch
from safetensors.torch import save_file

from lora_core import (
    LoRAFileError,
    UnsafePathError,
    WrongBaseModelError,
    match_lora,
    parse_lora,
    read_info,
    read_lora_file,
    safe_join,
    write_lora_file,
)
from lora_factory import lora_state_dict, low_rank_factors


def _write(path, sd, metadata=None):
    save_file(sd, str(path), metadata=metadata)
    return str(path)


def test_pickle_files_are_refused_with_a_hint(tmp_path):
    p = tmp_path / "old.pt"
    p.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(LoRAFileError, match=r"old\.pt: pickle.*Convert it to \.safetensors"):
        read_lora_file(str(p))
    zipped = tmp_path / "looks_safe.safetensors"
    zipped.write_bytes(b"PK\x03\x04" + b"\x00" * 64)  # torch.save's zip container, renamed
    with pytest.raises(LoRAFileError, match="looks_safe.safetensors: pickle"):
        read_lora_file(str(zipped))


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    good = _write(tmp_path / "good.safetensors", {"a.lora_up.weight": torch.ones(64, 4)})
    data = open(good, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(LoRAFileError, match=r"cut\.safetensors: .*truncated"):
        read_lora_file(str(cut))
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data[:8] + b"{not json" + data[17:])
    with pytest.raises(LoRAFileError, match=r"bad\.safetensors: .*(JSON|header)"):
        read_lora_file(str(bad))
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(LoRAFileError, match=r"tiny\.safetensors: file is 2 bytes"):
        read_lora_file(str(tiny))


def test_nan_tensor_is_named(tmp_path):
    t = torch.ones(4, 4)
    t[1, 2] = float("nan")
    p = _write(tmp_path / "nan.safetensors", {"layer.lora_up.weight": t, "layer.lora_down.weight": torch.ones(4, 4)})
    with pytest.raises(LoRAFileError, match=r"nan\.safetensors: tensor 'layer\.lora_up\.weight' contains NaN"):
        read_lora_file(p)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bad", [[float("nan")], [float("inf")], [float("-inf")], [float("inf"), float("-inf")]])
def test_non_finite_values_of_every_dtype_are_named(tmp_path, dtype, bad):
    """fp16 files are checked by one fp32 sum (NaN and inf survive it); the others element by element."""
    up, down = torch.ones(64, 4, dtype=dtype), torch.ones(4, 64, dtype=dtype)
    for i, value in enumerate(bad):
        down[i, 7] = value
    p = _write(tmp_path / "bad.safetensors", {"layer.lora_up.weight": up, "layer.lora_down.weight": down})
    with pytest.raises(LoRAFileError, match=r"tensor 'layer\.lora_down\.weight' contains NaN or inf"):
        read_lora_file(p)


def test_the_largest_finite_fp16_values_are_not_mistaken_for_inf(tmp_path):
    big = torch.full((512, 512), 65504.0, dtype=torch.float16)  # their sum is far beyond fp16, not fp32
    tensors, _ = read_lora_file(_write(tmp_path / "big.safetensors", {"layer.lora_up.weight": big,
                                                                       "layer.lora_down.weight": -big}))
    assert torch.equal(tensors["layer.lora_up.weight"], big)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "out.safetensors"
    write_lora_file(str(target), {"x": torch.arange(4.0)}, {"v": "1"})
    before = target.read_bytes()
    with pytest.raises(Exception):
        write_lora_file(str(target), {"x": "not a tensor"}, {"v": "2"})
    assert target.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]  # no temp file left behind
    tensors, meta = read_lora_file(str(target))
    assert meta == {"v": "1"} and torch.equal(tensors["x"], torch.arange(4.0))


@pytest.mark.parametrize("name", ["../secret.safetensors", "a/../../b.safetensors", "/etc/passwd", "..\\x"])
def test_names_that_leave_the_folder_are_refused(tmp_path, name):
    with pytest.raises(UnsafePathError):
        safe_join(str(tmp_path), name)


def test_names_inside_the_folder_are_joined(tmp_path):
    assert safe_join(str(tmp_path), "sub/x.safetensors") == str(tmp_path / "sub" / "x.safetensors")


HOST = {f"lora_unet_blk{i}_to_q": f"diffusion_model.blk{i}.to_q.weight" for i in range(4)}
HOST_SHAPES = {f"diffusion_model.blk{i}.to_q.weight": torch.Size((24, 16)) for i in range(4)}


def test_lora_for_another_base_is_an_error_with_counts():
    sdxl_like = {f"lora_unet_input_blocks_7_1_transformer_blocks_{i}_attn1_to_q": (24, 16) for i in range(6)}
    lora = parse_lora(lora_state_dict(low_rank_factors(sdxl_like, 4, 1), 4.0), "xl_style.safetensors",
                      {"ss_base_model_version": "sdxl_base_v1-0"})
    with pytest.raises(WrongBaseModelError) as e:
        match_lora(lora, HOST, HOST_SHAPES, {"model"}, model_family="SD1.x")
    msg = str(e.value)
    assert "xl_style.safetensors" in msg and "SDXL" in msg and "SD1.x" in msg and "0 of 6" in msg


def test_shape_mismatch_counts_as_not_matched():
    wrong_size = {f"lora_unet_blk{i}_to_q": (32, 16) for i in range(4)}
    lora = parse_lora(lora_state_dict(low_rank_factors(wrong_size, 4, 1), 4.0), "sd2.safetensors")
    with pytest.raises(WrongBaseModelError, match="4 with other sizes"):
        match_lora(lora, HOST, HOST_SHAPES, {"model"})
    result = match_lora(lora, HOST, HOST_SHAPES, {"model"}, allow_partial=True)
    assert len(result.coverage["model"].shape_mismatch) == 4 and not result.patches


def test_partial_match_reports_the_rest():
    shapes = {f"lora_unet_blk{i}_to_q": (24, 16) for i in range(4)} | {"lora_unet_extra_layer": (24, 16)}
    lora = parse_lora(lora_state_dict(low_rank_factors(shapes, 4, 1), 4.0), "p.safetensors")
    result = match_lora(lora, HOST, HOST_SHAPES, {"model", "clip"})
    assert len(result.patches) == 4 and result.coverage["model"].unmatched == ["lora_unet_extra_layer"]


def test_text_encoder_only_lora_without_clip_says_what_to_connect():
    te = {"lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32)}
    lora = parse_lora(lora_state_dict(low_rank_factors(te, 4, 1), 4.0), "te.safetensors")
    with pytest.raises(WrongBaseModelError, match="Connect the matching MODEL/CLIP"):
        match_lora(lora, HOST, HOST_SHAPES, {"model"})


def test_trigger_words_and_scope_from_metadata():
    info = read_info({"ss_tag_frequency": '{"10_sks": {"sks dog": 12, "grass": 3}}',
                      "modelspec.trigger_phrase": "sks", "lw.scope": "one character: the sks dog",
                      "ss_base_model_version": "sd_v1"})
    assert info.trigger_words == ["sks", "sks dog", "grass"]
    assert info.scope == "one character: the sks dog" and info.base_model == "sd_v1"


def test_a_header_length_starting_with_the_pickle_byte_is_still_safetensors(tmp_path):
    # 0x0280 = 640: the length's first byte is 0x80 and its second a pickle protocol number.
    for pad in range(0, 800, 4):
        p = _write(tmp_path / "h.safetensors", {"a.lora_up.weight": torch.ones(2, 2)}, {"pad": "x" * pad})
        if open(p, "rb").read(2) == b"\x80\x02":
            break
    assert open(p, "rb").read(2) == b"\x80\x02"
    tensors, meta = read_lora_file(p)
    assert torch.equal(tensors["a.lora_up.weight"], torch.ones(2, 2))


def test_the_pack_caches_are_listed_in_one_place_and_can_be_emptied(tmp_path):
    from safetensors.torch import save_file

    import lora_core.stacking.heatmap  # noqa: F401  (a cache registers when its module is imported)
    import lora_core.stacking.stack_analysis  # noqa: F401
    from lora_core import caches
    from lora_core.formats.files import load_lora
    assert {"lora_files", "stack_shapes", "heatmaps"} <= set(caches.names())
    path = tmp_path / "c.safetensors"
    save_file({"lora_unet_x.lora_up.weight": torch.ones(4, 2), "lora_unet_x.lora_down.weight": torch.ones(2, 4)},
              str(path))
    first = load_lora(str(path))
    assert load_lora(str(path)) is first  # parsed once while the file is unchanged
    caches.clear("lora_files")
    assert load_lora(str(path)) is not first
    with pytest.raises(KeyError, match="unknown caches"):
        caches.clear("no_such_cache")


def test_settings_and_shape_errors_are_lora_errors_with_their_messages():
    """One error vocabulary: stacking, heatmap and training settings raise LoRAError subclasses (still
    ValueErrors, so callers that caught ValueError keep working)."""
    from lora_core.errors import LoRAError, LoRASettingsError, LoRAShapeError
    from lora_core.stacking.clamping import ClampSettings
    from lora_core.stacking.heatmap import render_heatmap
    from lora_core.training import make_optimizer, select_targets
    from lora_core.training.schedule import lr_factor

    cases = [
        (lambda: ClampSettings(budget=0.0).validate(), LoRASettingsError, "budget must be a finite number above 0"),
        (lambda: select_targets({}, "no_such_preset"), LoRASettingsError, "targets 'no_such_preset' unknown"),
        (lambda: make_optimizer("no_such_optimizer", [], 1e-4, 0.0), LoRASettingsError,
         "optimizer 'no_such_optimizer' unknown"),
        (lambda: lr_factor(0, 10, "no_such_schedule", 0), LoRASettingsError, "LR schedule 'no_such_schedule' unknown"),
        (lambda: render_heatmap(["a"], ["b", "c"], [[0.5]]), LoRAShapeError, r"heatmap values are \(1, 1\)"),
    ]
    for call, kind, message in cases:
        with pytest.raises(kind, match=message) as err:
            call()
        assert isinstance(err.value, LoRAError) and isinstance(err.value, ValueError)
