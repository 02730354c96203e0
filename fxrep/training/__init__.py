"""Training branched ViTs with progressive joining."""

from .data import load_mnist_idx, synthetic_shapes
from .loop import TrainConfig, TrainResult, evaluate, train
from .schedule import JoinSchedule

__all__ = ["JoinSchedule", "TrainConfig", "TrainResult", "evaluate", "load_mnist_idx", "synthetic_shapes",
           "train"]
