"""Precise BN: batch-norm statistics recomputed with the final weights before evaluation (fine-tuning, paper 4.3).

The paper's COCO fine-tuning follows SoCo [13], whose detectron2 config (R_50_FPN_1x.yaml) keeps BN trainable in
the backbone, FPN and heads and sets TEST.PRECISE_BN.ENABLED (detectron2: 200 iterations of training batches after
the last iteration, before the final checkpoint and evaluation). During training, BN normalises with the batch's
statistics and keeps an exponential average (momentum 0.1) over weights that kept changing; evaluation uses that
average. Precise BN replaces it by the plain mean over N batches of the frozen final model:

    mu = (1/n) sum_j mean_j,    var = (1/n) sum_j var_j      (var_j unbiased, as BN's running_var)

over the n forward calls in which the layer saw data. Unlike fvcore's update_bn_stats, a layer called several
times per batch contributes every call, and a call on an empty input (a mask head without a foreground RoI) is
not counted; a layer never called keeps its statistics. Under SyncBN (several processes) a call counts on the
processes whose own input was not empty; each counted call holds the statistics of all processes, so every process
gets a mean of valid batch statistics (only rank 0's is saved), possibly over fewer calls than the others.

Public
    bn_layers(model) -> list of the BatchNorm / SyncBatchNorm layers in training mode that track running stats
    update_bn_stats(model, batches, forward) -> number of batches used
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def bn_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """BatchNorm1d/2d/3d and SyncBatchNorm layers in training mode with running statistics (FrozenBN: none)."""
    return [m for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]


@torch.no_grad()
def update_bn_stats(model: nn.Module, batches: Iterable, forward: Callable) -> int:
    """Set every BN layer's running mean / var (bn_layers; put the model in training mode first) to the mean of
    its batch statistics over `batches`, each passed as forward(batch) under no_grad. The layers' momentum and
    everything but running_mean / running_var are left as they were. Returns the number of batches used."""
    layers = bn_layers(model)
    sums = {m: [torch.zeros_like(m.running_mean), torch.zeros_like(m.running_var), 0] for m in layers}
    momentum = {m: m.momentum for m in layers}

    def accumulate(m, inputs, output):
        if inputs[0].numel() == 0:  # no batch statistic (an empty RoI batch)
            return
        s = sums[m]  # with momentum 1 the running stats are this call's batch stats
        s[0] += m.running_mean
        s[1] += m.running_var
        s[2] += 1

    hooks = [m.register_forward_hook(accumulate) for m in layers]
    saved = {m: (m.running_mean.clone(), m.running_var.clone()) for m in layers}
    n, done = 0, False
    try:
        for m in layers:
            m.momentum = 1.0
        for batch in batches:
            forward(batch)
            n += 1
        done = True
    finally:  # an interrupted update leaves the statistics as they were
        for h in hooks:
            h.remove()
        for m in layers:
            m.momentum = momentum[m]
            total_mean, total_var, calls = sums[m]
            mean, var = (total_mean / calls, total_var / calls) if done and calls else saved[m]
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
    return n
