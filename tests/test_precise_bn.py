"""precise_bn.py: BN statistics recomputed as the plain mean over batches (detectron2's precise BN, SoCo's config),
checked against hand computations; empty inputs, repeated calls, eval-mode layers, interruptions."""
import os
import sys

import pytest
import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from precise_bn import bn_layers, update_bn_stats  # noqa: E402


class TwoCalls(nn.Module):
    """bn_a sees each input twice (x and 2x), bn_b once, bn_frozen is in eval mode, bn_unused is never called."""

    def __init__(self):
        super().__init__()
        self.bn_a, self.bn_b, self.bn_frozen, self.bn_unused = (nn.BatchNorm1d(2) for _ in range(4))

    def forward(self, x):
        self.bn_a(x), self.bn_a(2 * x)
        return self.bn_b(x) + self.bn_frozen(x)


def test_mean_of_batch_statistics_by_hand():
    net = TwoCalls().train()
    net.bn_frozen.eval()
    net.bn_a.momentum = 0.3
    for m in (net.bn_frozen, net.bn_unused):
        m.running_mean.fill_(5.0)
        m.running_var.fill_(7.0)
    batches = [torch.tensor([[0.0, 1], [2, 3]]), torch.tensor([[4.0, 0], [4, 0], [4, 3]]), torch.zeros(0, 2)]
    assert set(bn_layers(net)) == {net.bn_a, net.bn_b, net.bn_unused}
    assert update_bn_stats(net, batches, net) == 3
    # bn_b, per channel: batch means (1, 2) and (4, 1), unbiased variances (2, 2) and (0, 3); the empty batch: none
    assert net.bn_b.running_mean.tolist() == pytest.approx([2.5, 1.5])
    assert net.bn_b.running_var.tolist() == pytest.approx([1.0, 2.5])
    # bn_a: the calls on x and 2x both count: means (1, 2), (2, 4), (4, 1), (8, 2); variances x1 and x4
    assert net.bn_a.running_mean.tolist() == pytest.approx([15 / 4, 9 / 4])
    assert net.bn_a.running_var.tolist() == pytest.approx([(2 + 8 + 0 + 0) / 4, (2 + 8 + 3 + 12) / 4])
    assert net.bn_a.momentum == 0.3 and net.bn_b.momentum == 0.1  # restored
    for m in (net.bn_frozen, net.bn_unused):  # eval mode / never called: unchanged
        assert m.running_mean.tolist() == [5.0, 5.0] and m.running_var.tolist() == [7.0, 7.0]


def test_batches_replace_the_running_average_and_an_interruption_changes_nothing():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    batches = [torch.randn(2, 3, 8, 8) * (i + 1) + i for i in range(4)]
    for b in batches[:2]:  # an exponential average over other data first
        net(b * 3)
    update_bn_stats(net, batches, net)
    with torch.no_grad():
        feats = [net[0](b) for b in batches]
    want_mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
    want_var = torch.stack([f.transpose(0, 1).reshape(4, -1).var(dim=1) for f in feats]).mean(0)  # unbiased
    assert torch.allclose(net[1].running_mean, want_mean, atol=1e-5)
    assert torch.allclose(net[1].running_var, want_var, atol=1e-4)
    before = net[1].running_mean.clone(), net[1].running_var.clone()

    def broken(b):
        if b is batches[2]:
            raise RuntimeError("loader died")
        net(b * 5)

    with pytest.raises(RuntimeError, match="loader died"):
        update_bn_stats(net, batches, broken)
    assert torch.equal(net[1].running_mean, before[0]) and torch.equal(net[1].running_var, before[1])
    assert net[1].momentum == 0.1 and not net[1]._forward_hooks
