"""The training of selfattn's small models, behind ``selfattn train`` and the examples
(``examples/train_gpt.py``, ``examples/train_vit.py``).

The rooms: :mod:`.config` (:class:`TrainConfig`), :mod:`.data` (the corpora, ids, windows, image
shifts), :mod:`.tasks` (:class:`GptTask`, :class:`VitTask`), :mod:`.checkpoint` (safetensors
checkpoints), :mod:`.loop` (:func:`fit`, :func:`train`, :class:`Run`) and :mod:`.plots` (the loss
curve, the trained model's attention maps). :func:`fit` is the loop (it returns the trained
model); :func:`train` is what the command runs: :func:`fit` with a checkpoint at every evaluation,
then ``results.json``, ``loss.png`` and the pictures. The optimiser state and the batch generator
are saved with the weights, so ``resume`` continues exactly where the run stopped.
"""

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
