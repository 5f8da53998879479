"""The pack's caches (lora_core/caches.py) never keep a LoRA or a model alive."""
import gc
import weakref

from lora_factory import lora_state_dict
from lora_fixtures import SD15, kohya_factors


def test_every_cache_lets_go_of_loras_and_of_a_model_that_go_away(comfy_host):
    pack = comfy_host.pack
    bridge, frobenius = pack.nodes.comfy_bridge, pack.lora_core.stacking.frobenius
    stack_analysis = pack.lora_core.stacking.stack_analysis
    model = comfy_host.nodes.CheckpointLoaderSimple().load_checkpoint(SD15)[0]
    # LoRAs made in memory (as Train and Merge LoRA make them): no file cache holds them
    loras = [pack.lora_core.parse_lora(lora_state_dict(kohya_factors(model, None, rank=4, seed=seed), alpha=2.0),
                                       f"in_memory_{seed}") for seed in (3, 4)]
    rows = {}
    for i, lora in enumerate(loras, start=1):
        rows |= {f"lora_{i}_in": lora, f"on_{i}": True, f"strength_model_{i}": 0.6, f"strength_clip_{i}": 0.0}
    # bypass, decorrelate, layer and spectral caps: the run fills every cache of lora_core/caches.py's table
    out = pack.nodes.stack_lora.StackLoRA.execute(model, "bypass", True, -1.0, 1.0, True, 1.5, True, 0.1, True,
                                                  use_spectral_cap=True, spectral_cap=0.5, **rows)
    adapters = [a for lora in loras for a in lora.adapters.values()]
    assert all(lora.memos["matches"] for lora in loras) and all(a in frobenius._PAIR_DOTS for a in adapters)
    assert stack_analysis._SHAPES and model.model in bridge._MODULES and model.model in bridge._NORM_CACHE
    assert model.model in bridge._SPECTRA_CACHE and model.model in bridge._HOST_CACHE
    assert model.model in bridge._BYPASS_SITES and any(shape.patterns for _, shape in stack_analysis._SHAPES.values())

    refs = [weakref.ref(x) for x in (*loras, *adapters)]
    del out, rows, loras, adapters, lora
    gc.collect()
    assert [r for r in refs if r() is not None] == [], "a cache keeps a LoRA that went away (the model lives on)"

    module = weakref.ref(model.model)
    del model
    gc.collect()
    assert module() is None, "a cache keeps a model that went away"
