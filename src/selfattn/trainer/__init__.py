"""The training room of selfattn's small models, behind ``selfattn train`` and the examples: one
file each for the config, the data, the two tasks, checkpoints, the loop (:func:`fit`,
:func:`train`) and the plots."""

from ..testing import torch_threads
from .config import TASKS, TrainConfig
from .data import char_ids, load_corpus, load_digits, random_windows, shift_images, unigram_loss
from .loop import Run, fit, train
from .plots import attention_maps, plot_loss
from .tasks import GptTask, VitTask

__all__ = [
    "TASKS",
    "GptTask",
    "Run",
    "TrainConfig",
    "VitTask",
    "attention_maps",
    "char_ids",
    "fit",
    "load_corpus",
    "load_digits",
    "plot_loss",
    "random_windows",
    "shift_images",
    "torch_threads",
    "train",
    "unigram_loss",
]
