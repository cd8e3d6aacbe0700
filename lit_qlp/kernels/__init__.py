"""Loss kernels: token-summed cross-entropy, a Triton cross-entropy with fused gradient, and a fused LM head + loss.

Triton is imported only when its implementation runs, so everything here imports on a CPU box.
"""

from lit_qlp.kernels.cross_entropy import TokenWeightedLoss
from lit_qlp.kernels.fused_loss import Implementation, cross_entropy, fused_head_loss

__all__ = ["Implementation", "TokenWeightedLoss", "cross_entropy", "fused_head_loss"]
