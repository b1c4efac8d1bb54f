"""Training (SGD loop, checkpoints, exact resume, torchrun/DDP) and evaluation of detection models."""
from .checkpoint import CheckpointError, load_weights, save_weights
from .inference import evaluate, inference, summary_line
from .solver import LRSchedule, build_optimizer, lr_factor
from .trainer import Trainer, adapt_config_to_dataset, seed_everything, train

__all__ = [
    "CheckpointError",
    "LRSchedule",
    "Trainer",
    "adapt_config_to_dataset",
    "build_optimizer",
    "evaluate",
    "inference",
    "load_weights",
    "lr_factor",
    "save_weights",
    "seed_everything",
    "summary_line",
    "train",
]
