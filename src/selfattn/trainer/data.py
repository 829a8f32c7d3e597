"""The trainer's data room: the two tasks' corpora (Python's help texts, scikit-learn's digits),
character ids, random windows, image shifts and the unigram baseline. Nothing is downloaded."""

from __future__ import annotations

import math
from collections import Counter

import torch
import torch.nn.functional as F

__all__ = [
    "char_ids",
    "load_corpus",
    "load_digits",
    "random_windows",
    "shift_images",
    "unigram_loss",
]


def load_corpus() -> str:
    """Every ``pydoc_data.topics`` help text (about 465k characters that ship with Python, so
    nothing is downloaded), in sorted topic order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[name] for name in sorted(topics))


def unigram_loss(train_text: str, val_text: str) -> float:
    """Cross-entropy (nats/char) of ``val_text`` under the character frequencies of
    ``train_text`` (add-one smoothed over the characters of both): the baseline a character
    model has to beat."""
    counts = Counter(train_text)
    alphabet = set(train_text) | set(val_text)
    total = len(train_text) + len(alphabet)
    nll = -sum(c * math.log((counts[ch] + 1) / total) for ch, c in Counter(val_text).items())
    return nll / len(val_text)


def char_ids(text: str) -> tuple[torch.Tensor, list[str]]:
    """A character-level vocabulary: ``text`` as ids (T,) int64, and the sorted characters
    (id i stands for ``chars[i]``)."""
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return torch.tensor([lookup[c] for c in text], dtype=torch.long), chars


def random_windows(
    data: torch.Tensor, batch_size: int, seq_len: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` windows of ``seq_len`` ids at random places of ``data`` (T,), and the ids
    one place later (the next-token targets): two (B, N) tensors."""
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    x = torch.stack([data[s : s + seq_len] for s in starts.tolist()])  # (B, N)
    y = torch.stack([data[s + 1 : s + seq_len + 1] for s in starts.tolist()])  # (B, N)
    return x, y


def load_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 bundled 8x8 digits, split 80/20 (stratified, ``random_state=seed``).

    Returns:
        ``(x_train, y_train, x_test, y_test)``: float images (N, 1, 8, 8) in [0, 1] and int64
        labels (N,).
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    digits = sk_load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(digits.target, dtype=torch.long)
    tr, te = train_test_split(
        list(range(len(y))), test_size=0.2, random_state=seed, stratify=digits.target
    )
    return x[tr], y[tr], x[te], y[te]


def shift_images(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Augmentation: each image (B, C, H, W) moved by up to one pixel each way (zero fill)."""
    h, w = x.shape[-2:]
    padded = F.pad(x, (1, 1, 1, 1))  # (B, C, H + 2, W + 2)
    dy, dx = torch.randint(0, 3, (2, x.shape[0]), generator=generator).tolist()
    return torch.stack([padded[i, :, a : a + h, b : b + w] for i, (a, b) in enumerate(zip(dy, dx))])
