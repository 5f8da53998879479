"""Files the pack writes get the permissions a normal save gives (0666 & ~umask), still written atomically."""
import contextlib
import os
import stat

import pytest
import torch

from lora_core import parse_lora, read_lora_file, save_lora, write_lora_file
from lora_core.training.state_io import load_optimizer_state, save_optimizer_state
from lora_factory import lora_state_dict, low_rank_factors


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_file_has_the_umask_permissions_and_stays_atomic(tmp_path, mask, expected):
    target = tmp_path / "out.safetensors"
    with umask(mask):
        write_lora_file(str(target), {"x": torch.arange(4.0)}, {"v": "1"})
        assert _mode(target) == expected
        write_lora_file(str(target), {"x": torch.arange(5.0)}, {"v": "2"})  # replacing gives the same mode
        assert _mode(target) == expected
        with pytest.raises(Exception):
            write_lora_file(str(target), {"x": "not a tensor"}, {"v": "3"})
    assert sorted(os.listdir(tmp_path)) == ["out.safetensors"]  # no temp file left behind
    tensors, meta = read_lora_file(str(target))
    assert meta == {"v": "2"} and torch.equal(tensors["x"], torch.arange(5.0))


def test_saved_lora_and_optimizer_state_are_0644_under_umask_022(tmp_path):
    lora = parse_lora(lora_state_dict(low_rank_factors({"lora_unet_a": (8, 8)}, 2, 1), 2.0), "a.safetensors")
    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    param.grad = torch.ones(3)
    optimizer.step()
    with umask(0o022):
        save_lora(str(tmp_path / "sub" / "lora.safetensors"), lora, {"ss_network_dim": "2"})
        save_optimizer_state(str(tmp_path / "lora.safetensors.lwstate"), optimizer, 7)
    assert _mode(tmp_path / "sub" / "lora.safetensors") == 0o644
    assert _mode(tmp_path / "lora.safetensors.lwstate") == 0o644
    state, step = load_optimizer_state(str(tmp_path / "lora.safetensors.lwstate"))
    assert step == 7 and torch.equal(state["state"][0]["exp_avg"], optimizer.state_dict()["state"][0]["exp_avg"])
