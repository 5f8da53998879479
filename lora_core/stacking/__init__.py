"""Several LoRAs on one model: norms and inner products from the factors, the clamps and caps,
overlaps and decorrelation, the heatmap, and `analyse_stack`, the one entry point of the analysis."""
from . import clamping, frobenius, heatmap, interference, spectral, stack_analysis
from .stack_analysis import StackAnalysis, analyse_stack

__all__ = [
    "clamping", "frobenius", "heatmap", "interference", "spectral", "stack_analysis",
    "StackAnalysis", "analyse_stack",
]
