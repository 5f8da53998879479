"""The tiny random-weight model families of tiny_families.py: small, quick, deterministic, and
a real forward through ComfyUI that sees the patcher's patches."""
import time

import pytest
import torch

import tiny_families as tf

MAX_PARAMS = 5_000_000
MAX_BUILD_S = 10.0


@pytest.fixture(scope="module")
def table():
    rows = {}
    yield rows
    if rows:
        print(f"\n{'family':<14} {'params':>10} {'build s':>8} {'forward s':>10}")
        for family, (params, build_s, forward_s) in rows.items():
            print(f"{family:<14} {params:>10,} {build_s:>8.3f} {forward_s:>10.3f}")


@pytest.mark.parametrize("family", tf.FAMILIES)
def test_family_builds_small_and_denoises(comfy_host, table, family):
    start = time.perf_counter()
    fresh = tf.build.__wrapped__(family, 0)  # uncached, to time a real build
    build_s = time.perf_counter() - start
    cached = tf.build(family)
    assert type(cached.model.model_config).__name__ == tf.SPECS[family].config
    params = sum(p.numel() for p in cached.model.diffusion_model.parameters())
    assert params < MAX_PARAMS
    assert build_s < MAX_BUILD_S
    # Seeded: a second build has the same weights.
    fresh_sd, cached_sd = fresh.model.state_dict(), cached.model.state_dict()
    assert all(torch.equal(fresh_sd[k], v) for k, v in cached_sd.items())

    latent = tf.sample_inputs(family)["latent"]
    start = time.perf_counter()
    out = tf.denoise(cached, family)
    forward_s = time.perf_counter() - start
    assert out.shape == latent.shape
    assert torch.isfinite(out).all()
    table[family] = (params, build_s, forward_s)


@pytest.mark.parametrize("family", tf.FAMILIES)
def test_attention_keys_are_patchable(comfy_host, family):
    base = tf.build(family)
    keys = tf.attention_linear_keys(family)
    sd = base.model.state_dict()
    assert keys and all(k in sd and sd[k].ndim == 2 for k in keys)

    before = tf.denoise(base, family)
    patched = base.clone()
    gen = torch.Generator().manual_seed(1)
    added = patched.add_patches({k: (torch.randn(sd[k].shape, generator=gen) * 0.05,) for k in keys})
    assert len(added) == len(keys)
    after = tf.denoise(patched, family)
    assert not torch.allclose(after, before)  # denoise runs the patcher's (patched) model
    assert torch.equal(tf.denoise(base, family), before)  # and the cached model is left as it was
