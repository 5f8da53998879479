"""Several LoRAs into one: concat, svd, ties and dare, with a report per layer."""
from . import merge
from .merge import METHODS, RANK_MODES, LayerReport, MergeInput, MergeReport, merge_loras

__all__ = ["merge", "METHODS", "RANK_MODES", "LayerReport", "MergeInput", "MergeReport", "merge_loras"]
