"""Train LoRA's optimizers (lora_core.training.schedule): what the host can run and why not, and a short
run with Prodigy (prodigyopt, a test requirement of scripts/comfy_host.py) that learns and resumes."""
import importlib.util

import pytest
import torch

from lora_core.training import (
    LoRATrainLayer,
    Sample,
    TrainForward,
    TrainHooks,
    TrainSettings,
    available_optimizers,
    make_optimizer,
    optimizer_support,
    optimizer_tooltip,
    simple_noise_model,
    train,
)
from lora_core.training import schedule
from lora_core.training.state_io import load_optimizer_state, save_optimizer_state


class Toy(torch.nn.Module):
    """x0-prediction by one frozen linear over channels, with a LoRA beside it."""

    def __init__(self, seed=0, dim=8):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(dim, dim, bias=False)
        self.lin.weight.data = torch.randn(dim, dim, generator=g) / dim ** 0.5
        self.requires_grad_(False)

    def forward(self, x_t, sigma, cond):
        tokens = (x_t / (1 + sigma.view(-1, 1, 1, 1) ** 2) ** 0.5).flatten(2).transpose(1, 2)
        return self.lin(tokens).transpose(1, 2).reshape(x_t.shape)


def _student(seed=3):
    model = Toy()
    layer = LoRATrainLayer(8, 8, 2, 2, torch.Generator().manual_seed(seed), name="lin")
    model.lin.forward = TrainForward(model.lin, layer)
    return model, list(layer.parameters())


def _data(n=8):
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(8, 8, generator=g) * 0.3  # the change to learn
    samples = []
    for _ in range(n):
        x = torch.randn(8, 2, 2, generator=g)
        samples.append(Sample(x, {}))
    return samples, teacher


def _target(teacher):
    base = Toy()

    def target(x_t, sigma, cond):
        tokens = (x_t / (1 + sigma.view(-1, 1, 1, 1) ** 2) ** 0.5).flatten(2).transpose(1, 2)
        return (tokens @ (base.lin.weight + teacher).T).transpose(1, 2).reshape(x_t.shape)
    return target


def _error(model, target):
    """Held-out mean squared difference between the model's prediction and the teacher's."""
    g = torch.Generator().manual_seed(99)
    x_t, sigma = torch.randn(32, 8, 2, 2, generator=g), torch.rand(32, generator=g) * 2
    with torch.no_grad():
        return float((model(x_t, sigma, {}) - target(x_t, sigma, {})).pow(2).mean())


def test_the_standard_three_always_run_and_the_tooltip_says_why_others_are_missing(monkeypatch):
    support = optimizer_support()
    assert support["adamw"] is None and support["adam"] is None and support["sgd"] is None
    assert available_optimizers()[:3] == ["adamw", "adam", "sgd"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("prodigyopt", "bitsandbytes") else real(name, *a))
    assert available_optimizers() == ["adamw", "adam", "sgd"]
    tip = optimizer_tooltip()
    assert "prodigy: the prodigyopt package is not installed" in tip
    assert "adamw8bit: the bitsandbytes package is not installed" in tip
    with pytest.raises(ValueError, match="optimizer 'prodigy' cannot run here: the prodigyopt package"):
        make_optimizer("prodigy", [torch.nn.Parameter(torch.zeros(2))], 1e-4, 0.0)
    with pytest.raises(ValueError, match="optimizer 'lion' unknown"):
        make_optimizer("lion", [torch.nn.Parameter(torch.zeros(2))], 1e-4, 0.0)


def test_8bit_adamw_needs_bitsandbytes_and_a_cuda_gpu(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "bitsandbytes" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert optimizer_support()["adamw8bit"] == "it needs a CUDA GPU, and this ComfyUI has none"
    assert "adamw8bit" not in available_optimizers()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert "adamw8bit" in available_optimizers()


def test_a_short_prodigy_run_learns_without_a_learning_rate_and_resumes(tmp_path):
    pytest.importorskip("prodigyopt", reason="prodigyopt is a test requirement (scripts/comfy_host.py)")
    assert "prodigy" in available_optimizers()
    samples, teacher = _data()
    target = _target(teacher)
    model, params = _student()
    before = _error(model, target)
    reported = []
    # learning_rate 1e-7 teaches AdamW nothing; Prodigy does not use it and, from its d0 = 1e-6, finds
    # a step size (about 0.03 here) within 150 steps that does as well as AdamW at a tuned 3e-2
    settings = TrainSettings(steps=150, learning_rate=1e-7, batch_size=4, optimizer="prodigy", lr_schedule="constant",
                             seed=2)
    result, optimizer = train(model, samples, params, simple_noise_model(), settings,
                              TrainHooks(on_step=lambda s, loss, lr: reported.append(lr)), target=target)
    assert type(optimizer).__name__ == "Prodigy"
    after = _error(model, target)
    adamw_model, adamw_params = _student()
    train(adamw_model, samples, adamw_params, simple_noise_model(),
          TrainSettings(steps=150, learning_rate=1e-7, batch_size=4, lr_schedule="constant", seed=2), target=target)
    assert after < 0.6 * before and _error(adamw_model, target) > 0.99 * before
    assert reported[-1] > reported[0] > 0 and reported[-1] != 1e-7  # the step size d it estimated, growing
    assert optimizer.param_groups[0]["lr"] == 1.0  # base rate 1 (constant schedule)

    # the optimizer state survives a save and a resume (Prodigy's d, its sums and step count included)
    save_optimizer_state(str(tmp_path / "run.lwstate"), optimizer, result.steps_done)
    state, step = load_optimizer_state(str(tmp_path / "run.lwstate"))
    resumed = make_optimizer("prodigy", params, 1e-7, settings.weight_decay)
    resumed.load_state_dict(state)
    assert step == 150 and resumed.param_groups[0]["d"] == pytest.approx(optimizer.param_groups[0]["d"])
    more, _ = train(model, samples, params, simple_noise_model(), TrainSettings(
        steps=160, learning_rate=1e-7, batch_size=4, optimizer="prodigy", lr_schedule="constant", seed=2),
        start_step=150, optimizer=resumed, target=target)
    assert more.steps_done == 160 and all(torch.isfinite(torch.tensor(more.losses)))


def test_schedules_scale_prodigys_unit_rate():
    assert schedule.base_learning_rate("prodigy", 3e-4) == 1.0 and schedule.base_learning_rate("adamw", 3e-4) == 3e-4
