"""Training, evaluation and checkpoints for moekit language models."""

from moekit.train.evaluate import evaluate
from moekit.train.trainer import TrainConfig, load_trained, save_trained, train

__all__ = ["TrainConfig", "evaluate", "load_trained", "save_trained", "train"]
