"""BYOL-style heads, the target network and the detector loss (paper section 3.3, Eqs. 5-7).

Sections
--------
- 3.3, Eq. 5: v = q(p(h)) online, v' = p_xi(h') target -- ``latent``, ``Projector`` (p) and ``Predictor`` (q).
- 3.3: the target ("momentum") network xi, an exponential moving average of theta -- ``make_target``,
  ``ema_update``, ``tau_schedule`` (BYOL's / SoCo's cosine schedule, reference.md).
- 3.3, Eq. 6: L_sim, Eq. 7: L_det = L_sim + its symmetric form -- ``similarity_loss``, ``detector_loss``.
- The image-level BYOL loss for the baseline mode -- ``byol_loss``.

Symbols
-------
=========  ============================================================================================
theta      online parameters (f, g, p, q and the RPN); trained by SGD/LARS
xi         target parameters (f, g, p; no q, no RPN); xi <- tau xi + (1 - tau) theta, never a gradient
tau        EMA momentum, tau_k = 1 - (1 - tau_base)(cos(pi k / K_steps) + 1) / 2, 0.99 -> 1
f          feature extractor (backbone + FPN), model.FeatureExtractor
g          Fast R-CNN box head, roi_head.BoxHead: RoI features -> h (1024-d)
p          projector: h (1024) -> 4096 (BN, ReLU) -> 256
q          predictor: 256 -> 4096 (BN, ReLU) -> 256, online branch only
h          box-level representation g(RoIAlign(f(V), b_i)) (Eqs. 2-4)
v          latent vector of a box: v = q_theta(p_theta(h)) online, v' = p_xi(h') target (Eq. 5); Eq. 7 uses
           both branches on every view: v_online = [v_theta, v'_theta, v''_theta], v_target = [v_xi, v'_xi, v''_xi]
q1, z1     byol_loss only (BYOL's notation): online prediction q(p(h)) and target projection p_xi(h) of a view
V1..V3     the three augmented views (224, 224, 112 px), section 4.1.2
K          boxes per image (4); ``total_steps`` is the EMA schedule's K, the number of iterations
=========  ============================================================================================

Shapes: the losses take (B, K, D) tensors, D = 256; the heads take (..., in_dim) and flatten the leading dims
for BatchNorm1d. Nothing here assumes a GPU or a process group (SyncBN conversion is model.py's business).

Public functions
----------------
- ``class Projector(in_dim=1024, hidden_dim=4096, out_dim=256)``: p.
- ``class Predictor(in_dim=256, hidden_dim=4096, out_dim=256)``: q.
- ``latent(h, p, q=None) -> (..., D)``: Eq. 5, v = q(p(h)) (online) or p(h) (target, q None).
- ``make_target(online) -> nn.Module``: xi, a frozen deep copy.
- ``ema_update(online, target, tau)``: xi <- tau xi + (1 - tau) theta, parameters only.
- ``cosine_term(step, total_steps) -> float``, ``tau_schedule(step, total_steps, tau_base=0.99) -> float``.
- ``negative_cosine(a, b) -> (...)``: -2 cos(a, b) along the last dim.
- ``similarity_loss(v_online, v_target_views) -> scalar``: Eq. 6.
- ``detector_loss(v_online, v_target) -> scalar``: Eq. 7.
- ``byol_loss(q1, q2, z1, z2) -> scalar``: image-level BYOL.
"""
import copy
import math

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------------------------------------------
# Projector p and predictor q (Eq. 5)
# ----------------------------------------------------------------------------------------------------------------
class Projector(nn.Module):
    """p (Eq. 5): Linear(in, 4096) -> BatchNorm1d -> ReLU -> Linear(4096, out), as SoCo / BYOL.

    forward(x (..., in_dim)) -> (..., out_dim); leading dims are flattened into one batch for BatchNorm1d,
    so (B, K, 1024) box features are normalised over all B * K boxes.
    """

    def __init__(self, in_dim=1024, hidden_dim=4096, out_dim=256):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.bn = nn.BatchNorm1d(hidden_dim)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])  # (N, in_dim), N = prod(lead)
        x = self.fc2(self.relu(self.bn(self.fc1(x))))  # (N, out_dim)
        return x.reshape(*lead, x.shape[-1])


class Predictor(Projector):
    """q (Eq. 5): the same MLP shape as p, 256 -> 4096 -> 256; online branch only."""

    def __init__(self, in_dim=256, hidden_dim=4096, out_dim=256):
        super().__init__(in_dim, hidden_dim, out_dim)


def latent(h, p, q=None):
    # Eq. 5: v = q_theta(p_theta(h)) on the online branch, v' = p_xi(h') on the target branch (no q)
    """h (..., 1024) box representations g(RoIAlign(f(V), b)) (Eqs. 2-4); p a Projector, q a Predictor or None
    -> v (..., D)."""
    v = p(h)
    return q(v) if q is not None else v


# ----------------------------------------------------------------------------------------------------------------
# Target network xi (section 3.3)
# ----------------------------------------------------------------------------------------------------------------
def make_target(online):
    """xi (section 3.3): a deep copy of the online module with requires_grad False everywhere.

    The copy keeps the online module's train/eval mode; the trainer keeps the target in train mode, so its
    BatchNorm layers normalise with batch statistics and update their own running buffers (as SoCo does).
    """
    target = copy.deepcopy(online)
    for prm in target.parameters():
        prm.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update(online, target, tau):
    # Section 3.3: xi <- tau xi + (1 - tau) theta
    """Exponential moving average of the online parameters into the target, in place.

    Parameters only, matched by position (the target is a deep copy of the online module). The BatchNorm
    running buffers of the target are NOT averaged: they are the target's own running statistics, computed on
    the views the target sees (its BN layers stay in train mode), as SoCo does. tau = 1 keeps xi, tau = 0 copies
    theta. Uses torch._foreach_mul_ / _foreach_add_ (one fused kernel per group instead of one per tensor).
    """
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must be in [0, 1], got {tau}")
    online_params = list(online.parameters())
    target_params = list(target.parameters())
    if len(online_params) != len(target_params):
        raise ValueError(f"online has {len(online_params)} parameters, target {len(target_params)}")
    if not target_params:
        return
    torch._foreach_mul_(target_params, tau)
    torch._foreach_add_(target_params, online_params, alpha=1.0 - tau)


def cosine_term(step, total_steps):
    # BYOL / SoCo momentum schedule: (cos(pi k / K) + 1) / 2, 1 at k = 0 and 0 at k = K
    """Cosine decay factor at iteration ``step`` of ``total_steps`` (step clamped to [0, total_steps])."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    k = min(max(step, 0), total_steps)
    return (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


def tau_schedule(step, total_steps, tau_base=0.99):
    # tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 (BYOL; SoCo's schedule, reference.md)
    """EMA momentum at iteration ``step``: tau_base at step 0, rising to 1.0 at ``total_steps``."""
    return 1.0 - (1.0 - tau_base) * cosine_term(step, total_steps)


# ----------------------------------------------------------------------------------------------------------------
# Losses (Eqs. 6-7)
# ----------------------------------------------------------------------------------------------------------------
def negative_cosine(a, b):
    # The summand of Eq. 6: -2 <a, b> / (||a|| ||b||)
    """a (..., D), b (..., D) -> (...): -2 cos(a, b), computed in float32 (safe under autocast)."""
    a = F.normalize(a.float(), dim=-1)  # (..., D), eps 1e-12 guards a zero vector
    b = F.normalize(b.float(), dim=-1)
    return -2.0 * (a * b).sum(dim=-1)


def similarity_loss(v_online, v_target_views):
    # Eq. 6: L_sim = 1/K sum_i sum_{v' in targets} -2 cos(v_i, v'_i), then the mean over images
    """v_online (B, K, D) online vectors; v_target_views: list of (B, K, D), one per target view.

    Box i of the online view is paired with box i of each target view. Target vectors are detached here, so
    gradients reach only v_online. Returns a scalar: per image, the mean over the K boxes of the sum over the
    target views, then the mean over the B images (minimum -2 * len(v_target_views)).
    """
    B, K, D = v_online.shape
    per_box = v_online.new_zeros((B, K), dtype=torch.float32)  # (B, K)
    for v_t in v_target_views:
        if v_t.shape != v_online.shape:
            raise ValueError(f"target view shape {tuple(v_t.shape)} != online shape {tuple(v_online.shape)}")
        per_box = per_box + negative_cosine(v_online, v_t.detach())  # (B, K)
    return per_box.mean(dim=1).mean(dim=0)  # 1/K sum over boxes, mean over images


def detector_loss(v_online, v_target):
    # Eq. 7: L_det = L_sim(v_theta; v'_xi, v''_xi) + Lbar_sim(v_xi; v'_theta, v''_theta)
    """v_online: Eq. 5's online vectors q(p(h)) of V1, V2, V3, each (B, K, D); v_target: the target's p_xi(h) of the
    same views. L_sim pairs v_theta (V1) with v'_xi, v''_xi; the symmetric Lbar_sim pairs v_xi (V1) with v'_theta,
    v''_theta (the cosine is symmetric, so Lbar_sim = L_sim(v'_theta; v_xi) + L_sim(v''_theta; v_xi)). The target
    vectors are detached. Scalar, minimum -8.
    """
    v_theta, v1_theta, v2_theta = v_online  # V1, V2, V3 online (v, v', v'')
    v_xi, v1_xi, v2_xi = v_target  # V1, V2, V3 through the target
    loss_sim = similarity_loss(v_theta, [v1_xi, v2_xi])
    loss_sim_bar = similarity_loss(v1_theta, [v_xi]) + similarity_loss(v2_theta, [v_xi])
    return loss_sim + loss_sim_bar


def byol_loss(q1, q2, z1, z2):
    # BYOL's symmetric image-level loss (Grill et al. 2020, the 2 - 2 cos form without the constant)
    """q1, q2 (B, D) online predictions of views 1 and 2; z1, z2 (B, D) target projections.

    Returns mean over images of -2 cos(q1, z2) - 2 cos(q2, z1) (scalar, minimum -4); the z's are detached.
    """
    return (negative_cosine(q1, z2.detach()) + negative_cosine(q2, z1.detach())).mean()
