"""Apply a LoRA stack, change one strength, restore the base model: ours vs core, alternating.

Every case runs twice, like with like:
  cold  fresh node objects, and the pack's LoRA caches (parsed files, matches, stack shapes,
        heatmaps) emptied first: a LoRA meets both sides for the first time;
  warm  node objects kept from the previous cycle (core's LoraLoader keeps its loaded file) and the
        pack's caches kept: the same LoRAs queued again.

One cycle per implementation and repetition, from the base model loaded:
  apply     the node chain runs (node time), then comfy.model_management.load_models_gpu([out])
            patches the weights (patch time) -- that is when ComfyUI writes LoRAs into weights;
  strength  one LoRA's strength changes: the nodes ComfyUI re-executes (the changed node and
            those downstream of it; a Stack LoRA node entirely) run again, then load_models_gpu;
  restore   load_models_gpu([base]): what the next prompt without LoRAs does (unpatch).
Core LoraLoaderModelOnly node objects are kept from apply to strength change, as ComfyUI's
executor keeps them (so core re-uses its cached file there, as in a real session).
"""
from __future__ import annotations

import time

import torch

from .measure import PatchBreakdown, PeakRSS, settle

CORE, OURS_CHAIN, OURS_STACK, OURS_CHAIN_BYPASS, OURS_STACK_BYPASS = (
    "core LoraLoaderModelOnly chain", "ours LoadLoRA chain (merge)", "ours StackLoRA (merge)",
    "ours LoadLoRA chain (bypass)", "ours StackLoRA (bypass)")
IMPLS = [CORE, OURS_CHAIN, OURS_STACK, OURS_CHAIN_BYPASS, OURS_STACK_BYPASS]
HOST_LOOP = "ComfyUI's patch loop, zero patch"  # the host floor's turn in the alternation (not a node chain)
STRENGTHS = (1.0, 0.8)  # the changed LoRA alternates between these
COLD, WARM = "cold", "warm"
# What a file's content determines; per-model caches (key maps, weight norms) stay: core has its own cost there.
LORA_CACHES = ("lora_files", "matches", "stack_shapes", "heatmaps")


class Stacker:
    """Runs one implementation's node chain on a base MODEL, keeping node objects like the executor."""

    def __init__(self, hub, impl: str, base, names: list[str]):
        self.hub, self.impl, self.base, self.names = hub, impl, base, names
        self.core_nodes = []
        self.models = []  # output MODEL of each chained node
        self.changed = len(names) // 2  # the LoRA whose strength changes (the middle one of 3)

    # -------------------------------------------------------------- node runs
    def _core(self, start: int, strengths: list[float]):
        node_cls = self.hub.node("LoraLoaderModelOnly")
        while len(self.core_nodes) < len(self.names):
            self.core_nodes.append(node_cls())
        m = self.base if start == 0 else self.models[start - 1]
        for i in range(start, len(self.names)):
            m = self.core_nodes[i].load_lora_model_only(m, self.names[i], strengths[i])[0]
            self._keep(i, m)
        return m

    def _chain(self, start: int, strengths: list[float], mode: str):
        node_cls = self.hub.node("LW_LoadLoRA")
        m = self.base if start == 0 else self.models[start - 1]
        for i in range(start, len(self.names)):
            m = node_cls.execute(lora_name=self.names[i], strength_model=strengths[i], strength_clip=1.0, mode=mode,
                                 model=m, clip=None).args[0]
            self._keep(i, m)
        return m

    def _stack(self, strengths: list[float], mode: str):
        node_cls = self.hub.node("LW_StackLoRA")
        kwargs = stack_defaults(node_cls)
        kwargs["mode"] = mode
        for i, (name, s) in enumerate(zip(self.names, strengths), start=1):
            kwargs.update({f"lora_{i}": name, f"strength_model_{i}": s, f"strength_clip_{i}": 1.0, f"on_{i}": True})
        return node_cls.execute(model=self.base, **kwargs).args[0]

    def _keep(self, i: int, m) -> None:
        if len(self.models) <= i:
            self.models.append(m)
        else:
            self.models[i] = m

    def run(self, strengths: list[float], start: int = 0):
        """The MODEL after re-running the nodes from `start` (0: all)."""
        if self.impl == CORE:
            return self._core(start, strengths)
        if self.impl in (OURS_CHAIN, OURS_CHAIN_BYPASS):
            return self._chain(start, strengths, "bypass" if self.impl == OURS_CHAIN_BYPASS else "merge")
        return self._stack(strengths, "bypass" if self.impl == OURS_STACK_BYPASS else "merge")


_STACK_DEFAULTS: dict = {}


def stack_defaults(node_cls) -> dict:
    """Stack LoRA's widget defaults (what a user gets), rows left empty."""
    if not _STACK_DEFAULTS:
        for inp in node_cls.define_schema().inputs:
            if inp.id in ("model", "clip", "lora_stack") or inp.id[-1].isdigit():
                continue
            _STACK_DEFAULTS[inp.id] = getattr(inp, "default", None)
    return dict(_STACK_DEFAULTS)


def _load(patcher):
    import comfy.model_management as mm
    mm.load_models_gpu([patcher])


def cycle(hub, impl: str, base, names: list[str], rep: int, trim: bool = False, stacker: Stacker | None = None,
          ) -> dict:
    """apply -> change one strength -> restore; returns the timings and peak memory of each step.

    trim=False (timing runs): only garbage is collected between steps, as in a running ComfyUI, so freed
    weight buffers stay in the heap and are reused. trim=True (memory runs): freed heap is handed back to
    the OS first, so the peak RSS over the start is what this implementation itself needs.
    stacker: one kept from the previous cycle (warm); None starts cold (fresh nodes, LoRA caches emptied).
    """
    out: dict = {}
    if stacker is None:
        hub.pack_module("lora_core.caches").clear(*LORA_CACHES)
        stacker = Stacker(hub, impl, base, names)
    strengths = [1.0] * len(names)
    with torch.inference_mode():
        _load(base)
        settle(trim)
        with PeakRSS() as peak, PatchBreakdown() as parts:
            t0 = time.perf_counter()
            model = stacker.run(strengths)
            t1 = time.perf_counter()
            _load(model)
            t2 = time.perf_counter()
        out["apply"] = {"node": t1 - t0, "patch": t2 - t1, "total": t2 - t0, "peak_rss": peak.delta,
                        "patch_core_copy": parts.copy, "patch_lora_math": parts.math}

        strengths[stacker.changed] = STRENGTHS[1] if rep % 2 == 0 else 0.6
        start = stacker.changed if impl not in (OURS_STACK, OURS_STACK_BYPASS) else 0
        del model
        settle(trim)
        with PeakRSS() as peak:
            t0 = time.perf_counter()
            model = stacker.run(strengths, start)
            t1 = time.perf_counter()
            _load(model)
            t2 = time.perf_counter()
        out["strength"] = {"node": t1 - t0, "patch": t2 - t1, "total": t2 - t0, "peak_rss": peak.delta,
                           "weights_written": len(model.backup)}  # ComfyUI backs up every weight it patches
        del model
        stacker.models.clear()
        del stacker
        settle(trim)
        t0 = time.perf_counter()
        _load(base)
        out["restore"] = {"total": time.perf_counter() - t0}
    return out


def check_equivalence(hub, base, names: list[str], pristine: dict[str, torch.Tensor]) -> dict:
    """Ours (LoadLoRA chain) and core patch the same weights (relative difference over a few layers),
    and restoring gives the base weights back bit for bit; `pristine`: copies taken before any patch."""
    import comfy.model_management as mm
    keys = list(pristine)
    result = {}
    with torch.inference_mode():
        weights = {}
        for impl in (CORE, OURS_CHAIN, OURS_STACK):
            model = Stacker(hub, impl, base, names).run([1.0] * len(names))
            mm.load_models_gpu([model])
            sd = model.model.state_dict()
            weights[impl] = {k: sd[k].detach().clone() for k in keys}
            mm.load_models_gpu([base])
        sd = base.model.state_dict()
        result["restored_bit_exact"] = all(torch.equal(sd[k], pristine[k]) for k in keys)
        for impl in (OURS_CHAIN, OURS_STACK):
            worst = 0.0
            for k in keys:
                a, b = weights[impl][k].double(), weights[CORE][k].double()
                worst = max(worst, float((a - b).norm() / b.norm()))
            result[f"max_rel_diff {impl} vs core"] = worst
        result["note"] = ("StackLoRA runs at its widget defaults (the range [-1, 1] only; budget and layer cap "
                          "off), so at strengths of 1.0 it must agree with core as the chain does, to ~1e-6.")
    return result


def host_loop_seconds(hub, base, keys: list[str], reps: int = 3) -> float:
    """ComfyUI's own patch loop with a patch that changes nothing on these weights: its copies and books
    alone, what any LoRA node pays before its math (median of `reps`)."""
    import comfy.model_management as mm
    from comfy.weight_adapter import WeightAdapterBase

    class ZeroPatch(WeightAdapterBase):
        name = "lw_bench_zero"

        def __init__(self):
            self.loaded_keys, self.weights = set(), []

        def calculate_weight(self, weight, *args, **kwargs):
            return weight

    times = []
    with torch.inference_mode():
        for _ in range(reps):
            clone = base.clone()
            clone.add_patches({k: ZeroPatch() for k in keys}, 1.0)
            _load(base)
            settle(False)
            t0 = time.perf_counter()
            mm.load_models_gpu([clone])
            times.append(time.perf_counter() - t0)
            del clone
            _load(base)
    return sorted(times)[len(times) // 2]
