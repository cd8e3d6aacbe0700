"""Cross-entropy summed over tokens, and the pipeline's token-weighted loss built on it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``sum_t -log softmax(logits_t)[labels_t]`` over tokens whose label is not ``ignore_index``, in float32.

    Args:
        logits: [..., vocab] logits, already aligned with ``labels`` (no shift here).
        labels: [...] target token ids.
        ignore_index: Label of tokens that carry no loss.
    """
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )


class TokenWeightedLoss:
    """The pipeline's ``loss_fn``: the summed token loss of one micro-batch divided by ``normalizer``.

    The strategy sets ``normalizer`` before each batch to (label tokens of the whole step across all
    data-parallel replicas) / (micro-batches × replicas), so that DeepSpeed's mean over micro-batches and
    replicas is exactly ``sum of token losses / number of label tokens``.
    """

    def __init__(self) -> None:
        self.normalizer = 1.0

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return cross_entropy_sum(logits, labels) / self.normalizer
