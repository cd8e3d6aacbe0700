"""The pipeline's token-weighted loss: the fused LM head + cross-entropy of one micro-batch, normalised."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lit_qlp.kernels.fused_loss import fused_head_loss


class TokenWeightedLoss:
    """The pipeline's ``loss_fn``: one micro-batch's summed token loss divided by ``normalizer``.

    The last pipeline layer (``OutputPipe``) binds itself as ``head`` when it is built; the loss then computes the
    LM head projection and the cross-entropy together, chunk by chunk (``fused_head_loss``), so the
    [tokens, vocab] logits are never held. Its one writer, the strategy, calls ``normalize_by`` before each batch
    with (label tokens of the whole step across all data-parallel replicas) / (micro-batches × replicas), so that
    DeepSpeed's mean over micro-batches and replicas is exactly ``sum of token losses / number of label tokens``.

    Args:
        implementation: "auto" (Triton on CUDA when installed, torch otherwise), "triton" or "torch".
        chunk_size: Tokens per chunk of the fused head+loss; the peak holds chunk_size × vocab logits.
    """

    def __init__(self, implementation: str = "auto", chunk_size: int = 1024) -> None:
        self._normalizer = 1.0
        self.implementation = implementation
        self.chunk_size = chunk_size
        self.head = None
        self.tied_weight: Callable[[], torch.Tensor] | None = None

    @property
    def normalizer(self) -> float:
        """What each micro-batch's summed token loss is divided by (1 until ``normalize_by`` sets it)."""
        return self._normalizer

    def normalize_by(self, normalizer: float) -> None:
        """Sets the divisor of the next batch's micro-batch losses (``strategies.engine.token_normalizer``)."""
        if not normalizer > 0:
            raise ValueError(f"the loss normaliser must be positive, got {normalizer}")
        self._normalizer = float(normalizer)

    def bind(self, head) -> None:
        """Called by the last pipeline layer: ``head.lm_head.weight``, ``logit_scale`` and ``softcap`` are used."""
        self.head = head

    def tie(self, weight: Callable[[], torch.Tensor]) -> None:
        """Makes ``weight()`` (the embedding matrix of tied embeddings, on the stage that holds the head) the head's
        weight."""
        self.tied_weight = weight

    def head_weight(self) -> torch.Tensor:
        """The LM head's weight: the tied embedding matrix if one was tied, else ``head.lm_head.weight``."""
        if self.tied_weight is not None:
            return self.tied_weight()
        if self.head is None:
            raise RuntimeError("TokenWeightedLoss has no head: the pipeline's last layer must be an OutputPipe")
        return self.head.lm_head.weight

    def __call__(self, hidden_states: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("TokenWeightedLoss has no head: the pipeline's last layer must be an OutputPipe")
        loss_sum, _ = fused_head_loss(
            hidden_states,
            self.head_weight(),
            labels,
            logit_scale=self.head.logit_scale,
            softcap=self.head.softcap,
            chunk_size=self.chunk_size,
            implementation=self.implementation,
        )
        return loss_sum / self._normalizer
