"""Training new LoRAs: layers, targets, objective, schedules and the loop (no ComfyUI import)."""
from . import buckets, layers, loop, objective, schedule, targets
from .buckets import bucket_sizes, fit_image, nearest_bucket
from .layers import CheckpointedForward, CloneInputForward, LoRATrainLayer, TrainForward, base_outputs
from .loop import Sample, TrainHooks, TrainingDiverged, TrainResult, TrainSettings, collate_conds, train
from .objective import EPS, FLOW, V_PRED, NoiseModel, simple_noise_model
from .schedule import (
    OPTIMIZERS,
    SCHEDULES,
    available_optimizers,
    lr_factor,
    make_optimizer,
    optimizer_support,
    optimizer_tooltip,
)
from .targets import ATTENTION, ATTENTION_FF, CROSS_ATTENTION, PRESETS, select_targets

__all__ = [
    "buckets", "layers", "loop", "objective", "schedule", "targets",
    "bucket_sizes", "fit_image", "nearest_bucket",
    "CheckpointedForward", "CloneInputForward", "LoRATrainLayer", "TrainForward", "base_outputs",
    "Sample", "TrainHooks", "TrainingDiverged", "TrainResult", "TrainSettings", "collate_conds", "train",
    "EPS", "FLOW", "V_PRED", "NoiseModel", "simple_noise_model",
    "OPTIMIZERS", "SCHEDULES", "available_optimizers", "lr_factor", "make_optimizer", "optimizer_support",
    "optimizer_tooltip",
    "ATTENTION", "ATTENTION_FF", "CROSS_ATTENTION", "PRESETS", "select_targets",
]
