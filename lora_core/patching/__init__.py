"""From a parsed LoRA to changed weights: matching it to a model, strengths per layer (block
weights included), the one builder of low-rank factors, the merge-mode weight patch and the bypass
forward."""
from . import block_weights, bypass, factors, matching, plan, weight_patch
from .bypass import BypassForward, supports_bypass
from .factors import Factors, stack_factors
from .matching import ForeignModule, MatchResult, format_report, match_lora
from .plan import plan_layers
from .weight_patch import apply_terms, dense_delta

__all__ = [
    "block_weights", "bypass", "factors", "matching", "plan", "weight_patch",
    "BypassForward", "supports_bypass",
    "Factors", "stack_factors",
    "ForeignModule", "MatchResult", "format_report", "match_lora",
    "plan_layers",
    "apply_terms", "dense_delta",
]
