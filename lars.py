"""LARS, the optimiser of pre-training (paper section 4.2; You et al. 2017, as SoCo and BYOL use it).

Per parameter p with gradient g (one group's settings):
    d     = g + wd p                                       weight decay wd (1e-5)
    trust = eta ||p|| / (||d|| + eps)  if ||p|| > 0 and ||d|| > 0, else 1     trust coefficient eta (0.001)
    buf   = m buf + trust d                                momentum m (0.9)
    p     = p - lr buf
Biases and norm parameters (param_groups: every 1-D tensor) get neither weight decay nor the trust ratio (d = g).

Public
    LARS(params, lr, momentum=0.9, weight_decay=1e-5, trust_coefficient=0.001, eps=1e-8)   torch.optim.Optimizer
    param_groups(module) -> [weights (LARS), 1-D tensors (lars=False, weight_decay=0)]
"""
from __future__ import annotations

import torch


class LARS(torch.optim.Optimizer):
    """SGD + momentum with layer-wise trust ratio (You et al. 2017), as SoCo/BYOL use it. Per parameter p:
    d = g + wd p; trust = eta ||p|| / (||d|| + eps) where both norms > 0, else 1; buf = m buf + trust d; p -= lr buf.

    Groups with lars=False (biases, norm parameters) get neither weight decay nor the trust ratio (d = g).
    The step runs over all parameters of a group at once with torch._foreach_* ops: on one H100 (ResNet-50 joint,
    batch 128) 5.8 ms against 22.4 ms for a per-parameter loop (bench/RESULTS.md, GPU section); the loop is kept as
    bench/pretrain_step.py's LoopLARS, which checks this against it.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-5,
                 trust_coefficient: float = 0.001, eps: float = 1e-8):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps, lars=True))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            d = [p.grad for p in params]
            if group["lars"]:
                d = torch._foreach_add(d, params, alpha=group["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(params))  # (P,) one norm per parameter tensor
                d_norm = torch.stack(torch._foreach_norm(d))
                trust = group["trust_coefficient"] * p_norm / (d_norm + group["eps"])
                trust = torch.where((p_norm > 0) & (d_norm > 0), trust, torch.ones_like(trust))
                torch._foreach_mul_(d, list(trust.unbind()))  # no .item(): no host sync
            for p in params:  # created once (setdefault would build, and throw away, a zeros_like every step)
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, d)
            torch._foreach_add_(params, bufs, alpha=-group["lr"])


def param_groups(module: torch.nn.Module) -> list[dict]:
    """Weights get LARS; biases and norm parameters (all 1-D tensors) are excluded (reference.md)."""
    trainable = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in trainable if p.ndim > 1]},
            {"params": [p for p in trainable if p.ndim <= 1], "lars": False, "weight_decay": 0.0}]
