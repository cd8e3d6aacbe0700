"""The summed cross-entropy and the token-weighted loss (lit_qlp/kernels/cross_entropy.py) against torch."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lit_qlp.kernels import cross_entropy
from lit_qlp.kernels.cross_entropy import TokenWeightedLoss
from lit_qlp.kernels.fused_loss import IGNORE_INDEX


def random_logits_labels(shape, vocab, ignore_fraction, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, vocab, generator=g) * 3
    labels = torch.randint(0, vocab, shape, generator=g)
    labels[torch.rand(shape, generator=g) < ignore_fraction] = IGNORE_INDEX
    return logits, labels


@pytest.mark.parametrize("shape", [(5,), (2, 7), (3, 4, 5)])
@pytest.mark.parametrize("ignore_fraction", [0.0, 0.3, 1.0])
def test_cross_entropy_sum_matches_torch(shape, ignore_fraction):
    logits, labels = random_logits_labels(shape, 11, ignore_fraction, seed=len(shape))
    expected = F.cross_entropy(logits.reshape(-1, 11), labels.reshape(-1), reduction="sum", ignore_index=-100)
    torch.testing.assert_close(cross_entropy(logits, labels), expected)
    by_hand = -torch.log_softmax(logits, -1).reshape(-1, 11)
    keep = labels.reshape(-1) != -100
    hand = by_hand[keep].gather(1, labels.reshape(-1)[keep].unsqueeze(1)).sum()
    torch.testing.assert_close(cross_entropy(logits, labels), hand)


def test_cross_entropy_sum_rows_fully_ignored():
    logits, labels = random_logits_labels((3, 6), 9, 0.2, seed=5)
    labels[1] = IGNORE_INDEX  # a whole row without labels
    expected = F.cross_entropy(logits.reshape(-1, 9), labels.reshape(-1), reduction="sum", ignore_index=-100)
    torch.testing.assert_close(cross_entropy(logits, labels), expected)
    all_ignored = torch.full_like(labels, IGNORE_INDEX)
    assert cross_entropy(logits, all_ignored).item() == 0.0


def test_cross_entropy_sum_low_precision_in_float32():
    logits, labels = random_logits_labels((2, 8), 13, 0.2, seed=9)
    low = logits.to(torch.bfloat16)
    result = cross_entropy(low, labels)
    assert result.dtype == torch.float32
    expected = F.cross_entropy(low.float().reshape(-1, 13), labels.reshape(-1), reduction="sum", ignore_index=-100)
    torch.testing.assert_close(result, expected)


def test_cross_entropy_sum_gradient_matches_torch():
    logits, labels = random_logits_labels((2, 5), 7, 0.3, seed=2)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    cross_entropy(a, labels).backward()
    F.cross_entropy(b.reshape(-1, 7), labels.reshape(-1), reduction="sum", ignore_index=-100).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_token_weighted_loss_is_the_fused_head_loss_divided_by_normalizer():
    from lit_qlp.models.pipeline import OutputPipe

    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 6, 8, generator=generator)
    weight = torch.randn(10, 8, generator=generator)
    labels = torch.randint(0, 10, (2, 6), generator=generator)
    labels[0, :3] = -100
    head = OutputPipe.__new__(OutputPipe)
    nn.Module.__init__(head)
    head.lm_head = nn.Linear(8, 10, bias=False)
    head.lm_head.weight.data.copy_(weight)
    head.logit_scale, head.softcap = None, None
    loss_fn = TokenWeightedLoss(chunk_size=5)
    with pytest.raises(RuntimeError, match="no head"):
        loss_fn(hidden, labels)
    loss_fn.bind(head)
    assert loss_fn.normalizer == 1.0
    reference = F.cross_entropy((hidden @ weight.T).reshape(-1, 10), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(loss_fn(hidden, labels), reference)
    loss_fn.normalize_by(3.5)
    torch.testing.assert_close(loss_fn(hidden, labels), reference / 3.5)
    # With the normalizer at the label-token count it is the usual mean loss.
    loss_fn.normalize_by(float((labels != -100).sum()))
    mean = F.cross_entropy((hidden @ weight.T).reshape(-1, 10), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss_fn(hidden, labels), mean)
