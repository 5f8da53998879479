"""Merge weighted LoRAs into one LoRA: exact concat, optimal SVD, TIES and DARE.

Layers are aligned by their kohya name (export.kohya_prefix), so kohya, PEFT and diffusers
files that name the same layer merge together; an input without a layer adds nothing to
it. Per layer the exact target is E = sum_i w_i dW_i, dW_i = (alpha_i / r_i) B_i A_i.

  concat  U = [w_i c_i B_i], D = [A_i]: U @ D == E exactly, rank sum r_i, alpha = rank.
  svd     best rank-k approximation of E (Eckart-Young) from the factors: with U = Q_u R_u
          and D^T = Q_d R_d, E = Q_u (R_u R_d^T) Q_d^T, so only the small R x R core is
          decomposed and the error is the discarded singular values, never a dense matrix.
  ties    TIES-merging (Yadav et al. 2023) of the dense tau_i = w_i dW_i, then an SVD cut.
  dare    DARE (Yu et al. 2024): drop with p = 1 - density, rescale by 1/(1-p), sum, SVD cut.

LoHa/LoKr (and Tucker LoCon) inputs have no (up, down) pair; they join through their
dense delta. The merged LoRA is plain kohya LoRA (up/down/alpha) that every tool loads.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch

from ..errors import LoRAError, LoRAShapeError
from ..formats.adapters import Adapter, LoHaAdapter, LoKrAdapter, LowRankAdapter
from ..formats.export import kohya_prefix
from ..formats.families import FLUX, SD3, SDXL, UNKNOWN, guess_family
from ..formats.keymap import is_text_encoder_name
from ..formats.layouts import LoRA
from ..formats.variants import DoRAVariant
from ..patching.factors import stack_factors

METHODS = ("concat", "svd", "ties", "dare")
RANK_MODES = ("fixed", "energy")
FACTOR_DTYPE = torch.float64  # U, D and the R x R core are small: fp64 is free and keeps errors exact
DENSE_DTYPE = torch.float32  # full-size deltas: fp32 is far finer than anything a LoRA file stores
TE1_FAMILIES = (SDXL, SD3, FLUX)  # kohya calls their first text encoder lora_te1_, SD1/SD2's lora_te_


@dataclass
class MergeInput:
    lora: LoRA
    weight: float = 1.0
    clip_weight: float | None = None  # for text-encoder layers; None: `weight`

    def weight_for(self, layer: str) -> float:
        if self.clip_weight is not None and is_text_encoder_name(layer):
            return float(self.clip_weight)
        return float(self.weight)


@dataclass
class LayerReport:
    name: str
    shape: tuple[int, ...]
    inputs: int  # how many inputs have this layer
    rank: int
    max_rank: int  # the most this layer allows (its size, or the inputs' total rank)
    rel_error: float  # ||merged - exact||_F / ||exact||_F with exact = sum_i w_i dW_i
    energy_kept: float = 0.0  # sum of kept s^2 of the matrix the rank cut applied to
    energy_total: float = 0.0
    entries: int = 0  # ties/dare: task entries seen
    removed: int = 0  # ties: trimmed by magnitude; dare: dropped at random
    sign_conflicts: int = 0  # ties: entries that survived trimming but lost the sign election

    @property
    def retained_energy(self) -> float:
        return self.energy_kept / self.energy_total if self.energy_total > 0 else 1.0

    @property
    def removed_fraction(self) -> float:
        return self.removed / self.entries if self.entries else 0.0


@dataclass
class MergeReport:
    method: str
    target_rank: int
    rank_mode: str
    inputs: list[str]
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def retained_energy(self) -> float:
        """Energy kept by the rank cut over all layers (svd: of E itself; ties/dare: of their result)."""
        total = sum(r.energy_total for r in self.layers)
        return sum(r.energy_kept for r in self.layers) / total if total > 0 else 1.0

    def _fraction(self, method: str) -> float | None:
        if self.method != method:
            return None
        entries = sum(r.entries for r in self.layers)
        return sum(r.removed for r in self.layers) / entries if entries else 0.0

    @property
    def trimmed_fraction(self) -> float | None:
        return self._fraction("ties")

    @property
    def dropped_fraction(self) -> float | None:
        return self._fraction("dare")

    @property
    def max_rank(self) -> int:
        return max((r.rank for r in self.layers), default=0)

    def summary(self) -> str:
        if not self.layers:
            return f"{self.method} merge of {len(self.inputs)} LoRAs: no layers."
        errors = [r.rel_error for r in self.layers]
        ranks = [r.rank for r in self.layers]
        text = (f"{self.method} merge of {len(self.inputs)} LoRAs ({', '.join(self.inputs)}): {len(self.layers)} "
                f"layers, rank {min(ranks)}-{max(ranks)}, error vs the exact weighted sum: mean "
                f"{sum(errors) / len(errors):.2%}, worst {max(errors):.2%}")
        if self.method != "concat":
            text += f", energy kept by the rank cut {self.retained_energy:.2%}"
        if self.method == "ties":
            sign_lost = sum(r.sign_conflicts for r in self.layers) / max(1, sum(r.entries for r in self.layers))
            text += f", trimmed {self.trimmed_fraction:.1%} of entries, {sign_lost:.1%} lost the sign vote"
        if self.method == "dare":
            text += f", dropped {self.dropped_fraction:.1%} of entries"
        return text + "."

    def to_text(self, limit: int = 10) -> str:
        lines = [self.summary()]
        worst = sorted(self.layers, key=lambda r: (-r.rel_error, r.name))[:limit]
        if worst:
            lines.append("worst layers:")
        for r in worst:
            extra = f", {'trimmed' if self.method == 'ties' else 'dropped'} {r.removed_fraction:.1%}" \
                if self.method in ("ties", "dare") else ""
            lines.append(f"  {r.rel_error:8.3%}  rank {r.rank:>4}/{r.max_rank:<5} {r.name}{extra}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = {"method": self.method, "target_rank": self.target_rank, "rank_mode": self.rank_mode,
               "inputs": list(self.inputs), "notes": list(self.notes), "max_rank": self.max_rank,
               "retained_energy": self.retained_energy, "trimmed_fraction": self.trimmed_fraction,
               "dropped_fraction": self.dropped_fraction, "layers": []}
        for r in self.layers:
            row = asdict(r)
            row.update(shape=list(r.shape), retained_energy=r.retained_energy, removed_fraction=r.removed_fraction)
            out["layers"].append(row)
        return out


# ---------------------------------------------------------------- gathering layers

@dataclass
class _Part:
    source: str
    weight: float
    adapter: Adapter


@dataclass
class _Layer:
    name: str
    shape: tuple[int, ...]  # the weight's shape: 2-D, or 4-D for a conv
    sources: list[str]
    parts: list[_Part] = field(default_factory=list)  # inputs with a non-zero weight here

    @property
    def shape2d(self) -> tuple[int, int]:
        return self.shape[0], math.prod(self.shape[1:])


@dataclass(frozen=True)
class _Options:
    method: str
    target_rank: int
    rank_mode: str
    energy: float
    density: float
    device: torch.device
    generator: torch.Generator | None


def _normalise(inputs) -> list[MergeInput]:
    items = []
    for item in inputs:
        if isinstance(item, LoRA):
            item = MergeInput(item)
        elif not isinstance(item, MergeInput):
            item = MergeInput(*item)
        for w in (item.weight, item.clip_weight):
            if w is not None and not math.isfinite(float(w)):
                raise LoRAError(f"{item.lora.name}: merge weight {w} is not a finite number.")
        items.append(item)
    if not items:
        raise LoRAError("nothing to merge: no LoRAs were given.")
    return items


def _common_family(items: list[MergeInput]) -> str:
    found: dict[str, list[str]] = {}
    for item in items:
        family = guess_family(list(item.lora.adapters), item.lora.metadata, strict=True)
        if family != UNKNOWN:
            found.setdefault(family, []).append(item.lora.name)
    if len(found) > 1:
        listing = "; ".join(f"{fam}: {', '.join(names)}" for fam, names in sorted(found.items()))
        raise LoRAError(f"the LoRAs were made for different base models ({listing}); a merge of them fits none. "
                        "Merge only LoRAs of one base model.")
    return next(iter(found), UNKNOWN)


def _weight_shape(adapter: Adapter) -> tuple[int, ...]:
    """The patched weight's shape; conv adapters carry their kernel in one of their tensors."""
    rows, cols = adapter.target_shape_2d()
    r = adapter.roles
    kernel = None
    if isinstance(adapter, LowRankAdapter) and r["down"].dim() == 4:
        kernel = tuple((r["mid"] if r.get("mid") is not None else r["down"]).shape[2:])
    elif isinstance(adapter, LoHaAdapter) and "hada_t1" in r:
        kernel = tuple(r["hada_t1"].shape[2:])
    elif isinstance(adapter, LoKrAdapter) and ("lokr_t2" in r or r.get("lokr_w2", torch.empty(0)).dim() == 4):
        kernel = tuple(r["lokr_t2" if "lokr_t2" in r else "lokr_w2"].shape[2:])
    if kernel is None:
        return rows, cols
    return rows, cols // math.prod(kernel), *kernel


def _align_key(kohya: str) -> str:
    # ComfyUI reads lora_te_ and lora_te1_ as the same (first) text encoder.
    return "lora_te_" + kohya[len("lora_te1_"):] if kohya.startswith("lora_te1_") else kohya


def _collect(items: list[MergeInput], family: str, names=None) -> tuple[list[_Layer], list[str]]:
    layers: dict[str, _Layer] = {}
    te1_named: set[str] = set()
    notes = []
    for item in items:
        src, seen = item.lora.name, {}
        for prefix, adapter in item.lora.adapters.items():
            kohya = kohya_prefix(prefix)
            # Aligned by the family's standard name, so ComfyUI-path and diffusers-path kohya names of one
            # layer meet; the merged layer keeps the name its first input gives it.
            key = _align_key(names.get(kohya, kohya) if names else kohya)
            if key in seen:
                raise LoRAError(f"{src}: modules '{seen[key]}' and '{prefix}' name the same layer '{kohya}'.")
            seen[key] = prefix
            if kohya.startswith("lora_te1_"):
                te1_named.add(key)
            shape = _weight_shape(adapter)
            layer = layers.get(key)
            if layer is None:
                layer = layers[key] = _Layer(_align_key(kohya), shape, [])
            elif _conflict(layer.shape, shape):
                raise LoRAShapeError(f"layer '{kohya}': {layer.sources[0]} has it as {_fmt(layer.shape)} but {src} "
                                     f"as {_fmt(shape)}; the LoRAs were made for models with different layer sizes.")
            elif len(shape) > len(layer.shape):
                layer.shape = shape
            layer.sources.append(src)
            if item.weight_for(kohya) != 0.0:
                layer.parts.append(_Part(src, item.weight_for(kohya), adapter))
        dora = sum(isinstance(a.variant, DoRAVariant) for a in item.lora.adapters.values())
        if dora:
            notes.append(f"{src}: {dora} DoRA layers are merged by their low-rank direction; the DoRA magnitude "
                         "depends on the model's weights and is not carried over.")
        if item.lora.foreign:
            notes.append(f"{src}: {len(item.lora.foreign)} modules of algorithms that cannot be merged (e.g. "
                         f"'{sorted(item.lora.foreign)[0]}') are left out.")
    for key, layer in layers.items():
        if layer.name.startswith("lora_te_") and (key in te1_named or family in TE1_FAMILIES):
            layer.name = "lora_te1_" + layer.name[len("lora_te_"):]
    if not layers:
        raise LoRAError("nothing to merge: none of the LoRAs holds a layer this merge can read.")
    return [layers[k] for k in sorted(layers)], notes


def _conflict(a: tuple[int, ...], b: tuple[int, ...]) -> bool:
    # A 2-D LoRA for a 1x1 conv fits the 4-D one (ComfyUI reshapes); different kernels do not.
    flat = (a[0], math.prod(a[1:])) != (b[0], math.prod(b[1:]))
    return flat or (len(a) == len(b) == 4 and a != b)


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


# ---------------------------------------------------------------- per-layer math

def _finite(t: torch.Tensor, layer: _Layer, source: str) -> torch.Tensor:
    if not bool(torch.isfinite(t).all()):
        raise LoRAError(f"layer '{layer.name}': {source} gives NaN or inf values; that LoRA is broken "
                        "(often a training run that diverged) or its weight is far too large.")
    return t


def _stack(layer: _Layer, device) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """(U, D, X): U @ D + X == E, weights and alpha/rank scales folded into U; X for non-low-rank parts."""
    parts, dense = [], None
    for p in layer.parts:
        f = p.adapter.low_rank()  # (up, down, scale); a conv LoRA without Tucker mid counts too
        if f is None:
            d = _finite(p.adapter.delta(torch.Size(layer.shape2d), device, DENSE_DTYPE), layer, p.source) * p.weight
            dense = d if dense is None else dense + d
            continue
        up, down, scale = f
        parts.append((_finite(up, layer, p.source), _finite(down, layer, p.source), p.weight * scale))
    if not parts:
        return None, None, dense
    factors = stack_factors(parts, device, FACTOR_DTYPE)
    return factors.up, factors.down, dense


def _tasks(layer: _Layer, device) -> list[torch.Tensor]:
    """Dense tau_i = w_i dW_i, one per input that has this layer."""
    out = []
    for p in layer.parts:
        f = p.adapter.low_rank()
        if f is None:
            t = p.adapter.delta(torch.Size(layer.shape2d), device, DENSE_DTYPE) * p.weight
        else:
            up, down, scale = f
            factors = stack_factors([(up, down, p.weight * scale)], device, DENSE_DTYPE)
            t = factors.up @ factors.down
        out.append(_finite(t, layer, p.source))
    return out


def _factored_svd(U: torch.Tensor, D: torch.Tensor):
    """(left, s, right) with U @ D == left @ diag(s) @ right, from two thin QRs and an R x R SVD."""
    Qu, Ru = torch.linalg.qr(U)
    Qd, Rd = torch.linalg.qr(D.T)
    P, s, Vh = torch.linalg.svd(Ru @ Rd.T, full_matrices=False)
    return Qu @ P, s, Vh @ Qd.T


def _choose_rank(s: torch.Tensor, opts: _Options) -> int:
    cap = min(opts.target_rank, s.numel())
    if opts.rank_mode == "fixed":
        return cap
    s2 = s.to(torch.float64) ** 2
    ratio = torch.cumsum(s2, 0) / s2.sum()
    # Smallest k with ratio[k-1] >= energy; the slack absorbs rounding at energy = 1.
    return min(int((ratio < opts.energy - 1e-12).sum()) + 1, cap)


def _cut(left, s, right, opts: _Options, layer: _Layer, rel_error_of=None):
    """Top-k of (left, s, right), split evenly as up = left S^1/2, down = S^1/2 right."""
    s2 = s.to(torch.float64) ** 2
    total = float(s2.sum())
    if total == 0.0:
        return None
    k = _choose_rank(s, opts)
    h = s[:k].sqrt()
    up, down = left[:, :k] * h, h[:, None] * right[:k]
    kept = float(s2[:k].sum())
    # Eckart-Young: the error of the cut is exactly the discarded singular values.
    rel = math.sqrt(max(total - kept, 0.0) / total) if rel_error_of is None else rel_error_of(up, down)
    report = LayerReport(layer.name, layer.shape, len(layer.sources), k, s.numel(), rel, kept, total)
    return up, down, report


def _merge_concat(layer: _Layer, opts: _Options):
    U, D, X = _stack(layer, opts.device)
    notes = []
    if X is not None:  # exact factors of the dense part: every singular value above rounding
        left, s, right = torch.linalg.svd(X.to(FACTOR_DTYPE), full_matrices=False)
        keep = int((s > s[0] * max(X.shape) * torch.finfo(DENSE_DTYPE).eps).sum()) if s.numel() else 0
        h = s[:keep].sqrt()
        U = left[:, :keep] * h if U is None else torch.cat([U, left[:, :keep] * h], dim=1)
        D = h[:, None] * right[:keep] if D is None else torch.cat([D, h[:, None] * right[:keep]], dim=0)
        notes.append(layer.name)
    if U is None or U.shape[1] == 0:
        return None
    up, down = U.to(DENSE_DTYPE), D.to(DENSE_DTYPE)
    if X is None:
        # ||A @ B||^2 = sum((A^T A) * (B B^T)) needs only R x R products. The error is written as
        # up @ down - U @ D = (up - U) @ down + U @ (down - D) so nothing large cancels.
        exact_sq = float(((U.T @ U) * (D @ D.T)).sum())
        A = torch.cat([up.to(FACTOR_DTYPE) - U, U], dim=1)
        B = torch.cat([down.to(FACTOR_DTYPE), down.to(FACTOR_DTYPE) - D], dim=0)
        err_sq = max(float(((A.T @ A) * (B @ B.T)).sum()), 0.0)
    else:
        exact = _dense_sum(layer, opts.device)
        exact_sq, err_sq = float(exact.norm() ** 2), float((up @ down - exact).norm() ** 2)
    if exact_sq == 0.0:
        return None
    rank = up.shape[1]
    report = LayerReport(layer.name, layer.shape, len(layer.sources), rank, rank, math.sqrt(err_sq / exact_sq),
                         exact_sq, exact_sq)
    return up, down, report, notes


def _dense_sum(layer: _Layer, device) -> torch.Tensor:
    return torch.stack(_tasks(layer, device)).sum(0)


def _merge_svd(layer: _Layer, opts: _Options):
    U, D, X = _stack(layer, opts.device)
    if X is None:
        out = _cut(*_factored_svd(U, D), opts, layer)
    else:
        M = X if U is None else X + (U @ D).to(DENSE_DTYPE)
        out = _cut(*torch.linalg.svd(M, full_matrices=False), opts, layer)
    return None if out is None else (*out, [])


def _keep_top(t: torch.Tensor, density: float) -> torch.Tensor:
    """t with all but its round(density * n) largest-magnitude entries set to 0."""
    k = max(1, round(density * t.numel()))
    if k >= t.numel():
        return t
    idx = torch.topk(t.abs().flatten(), k, sorted=False).indices
    out = torch.zeros_like(t).flatten()
    out[idx] = t.flatten()[idx]
    return out.view_as(t)


def _ties(tasks: list[torch.Tensor], density: float) -> tuple[torch.Tensor, int, int]:
    """TIES: trim, elect sign = sign(sum of trimmed), disjoint mean. (merged, trimmed, sign conflicts)."""
    trimmed = torch.stack([_keep_top(t, density) for t in tasks])
    elected = torch.sign(trimmed.sum(0))
    nonzero = trimmed != 0
    agree = nonzero & (torch.sign(trimmed) == elected)
    merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
    n_trimmed = sum(int((t != 0).sum()) for t in tasks) - int(nonzero.sum())
    return merged, n_trimmed, int(nonzero.sum() - agree.sum())


def _dare(tasks: list[torch.Tensor], density: float, generator: torch.Generator) -> tuple[torch.Tensor, int]:
    """DARE: keep each entry with probability density (CPU generator: same masks on any device)."""
    merged, dropped = torch.zeros_like(tasks[0]), 0
    for t in tasks:
        keep = (torch.rand(t.shape, generator=generator) < density).to(t.device)
        merged += t * keep / density
        dropped += t.numel() - int(keep.sum())
    return merged, dropped


def _merge_sparse(layer: _Layer, opts: _Options):
    tasks = _tasks(layer, opts.device)
    exact = torch.stack(tasks).sum(0)
    conflicts = 0
    if opts.method == "ties":
        merged, removed, conflicts = _ties(tasks, opts.density)
    else:
        merged, removed = _dare(tasks, opts.density, opts.generator)
    exact_norm = float(exact.norm())

    def rel_error(up, down):
        diff = float((up @ down - exact).norm())
        return diff / exact_norm if exact_norm > 0 else (0.0 if diff == 0 else math.inf)

    out = _cut(*torch.linalg.svd(merged, full_matrices=False), opts, layer, rel_error)
    if out is None:
        return None
    up, down, report = out
    report.entries = sum(t.numel() for t in tasks)
    report.removed, report.sign_conflicts = removed, conflicts
    return up, down, report, []


_MERGERS = {"concat": _merge_concat, "svd": _merge_svd, "ties": _merge_sparse, "dare": _merge_sparse}


def _to_adapter(up: torch.Tensor, down: torch.Tensor, shape: tuple[int, ...], layer: _Layer) -> LowRankAdapter:
    k = up.shape[1]
    up = up.to("cpu", torch.float32).reshape(shape[0], k, *[1] * (len(shape) - 2)).contiguous()
    down = down.to("cpu", torch.float32).reshape(k, *shape[1:]).contiguous()
    if not (bool(torch.isfinite(up).all()) and bool(torch.isfinite(down).all())):
        raise LoRAError(f"layer '{layer.name}': the merged factors overflow float32; lower the merge weights.")
    return LowRankAdapter({"up": up, "down": down, "alpha": torch.tensor(float(k))})


# ---------------------------------------------------------------- entry point

def _check_options(method, target_rank, rank_mode, energy, density) -> None:
    if method not in METHODS:
        raise LoRAError(f"unknown merge method '{method}'; use one of {', '.join(METHODS)}.")
    if rank_mode not in RANK_MODES:
        raise LoRAError(f"unknown rank mode '{rank_mode}'; use one of {', '.join(RANK_MODES)}.")
    if int(target_rank) != target_rank or target_rank < 1:
        raise LoRAError(f"target rank must be a whole number of at least 1, got {target_rank}.")
    if not 0.0 < energy <= 1.0:
        raise LoRAError(f"energy threshold must be in (0, 1], got {energy}.")
    if not 0.0 < density <= 1.0:
        raise LoRAError(f"density must be in (0, 1] (the fraction of entries kept), got {density}.")


def merge_loras(inputs: Sequence[MergeInput | tuple | LoRA], *, method: str = "svd", target_rank: int = 64,
                rank_mode: str = "fixed", energy: float = 0.95, density: float = 0.5, seed: int = 0,
                name: str = "merged", device: str | torch.device = "cpu",
                names: dict[str, str] | None = None) -> tuple[LoRA, MergeReport]:
    """Merge (LoRA, weight[, clip_weight]) inputs into one kohya LoRA; see the module doc for the methods.

    target_rank, rank_mode and energy apply to svd/ties/dare; density to ties (kept fraction) and
    dare (1 - drop probability); seed to dare. `names`: kohya name -> the family's standard name
    (from the host), so inputs naming one layer both ways merge into one. The merged LoRA has metadata {}.
    """
    items = _normalise(inputs)
    _check_options(method, target_rank, rank_mode, energy, density)
    family = _common_family(items)
    layers, notes = _collect(items, family, names)
    generator = torch.Generator().manual_seed(int(seed)) if method == "dare" else None
    opts = _Options(method, int(target_rank), rank_mode, float(energy), float(density), torch.device(device),
                    generator)
    report = MergeReport(method, int(target_rank), rank_mode, [i.lora.name for i in items], notes=notes)
    adapters: dict[str, LowRankAdapter] = {}
    empty, densified = [], []
    for layer in layers:  # sorted by name: DARE's random stream depends on this order
        out = _MERGERS[method](layer, opts) if layer.parts else None
        if out is None:
            empty.append(layer.name)
            continue
        up, down, layer_report, dense_notes = out
        densified += dense_notes
        adapters[layer.name] = _to_adapter(up, down, layer.shape, layer)
        report.layers.append(layer_report)
    report.notes += _rank_notes(report, method, int(target_rank))
    if densified:
        report.notes.append(f"{len(densified)} layers hold LoHa/LoKr parts; concat factors their dense delta "
                            f"exactly, which can take a high rank (e.g. '{densified[0]}').")
    if empty:
        report.notes.append(f"{len(empty)} layers come out as zero (weight 0 or cancelling) and are left out, "
                            f"e.g. '{empty[0]}'.")
    if not adapters:
        raise LoRAError("the merge is empty: every layer comes out as zero (all weights 0, or inputs cancel).")
    return LoRA(name=name, adapters=adapters, metadata={}), report


def _rank_notes(report: MergeReport, method: str, target_rank: int) -> list[str]:
    if method == "concat":
        return [f"concat is exact: each layer keeps the sum of its inputs' ranks (up to {report.max_rank}); "
                "target rank does not apply."]
    small = [r for r in report.layers if r.max_rank < target_rank]
    if not small:
        return []
    r = small[0]
    return [f"{len(small)} layers allow less than rank {target_rank} (their size or the inputs' total rank) and "
            f"keep what they allow, e.g. '{r.name}' rank {r.max_rank}."]
