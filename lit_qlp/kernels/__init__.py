"""Loss kernels: token-summed cross-entropy (torch now; Triton and a fused head+loss later)."""

from lit_qlp.kernels.cross_entropy import TokenWeightedLoss, cross_entropy_sum

__all__ = ["TokenWeightedLoss", "cross_entropy_sum"]
