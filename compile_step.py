"""torch.compile of the pre-training step, train.py --compile (issue 7's fast path, an option off by default).

Two scopes, both in place (nn.Module.compile: the module tree, its parameters and its state_dict keys are unchanged, so
checkpoints load with or without compiling): the feature extractors f alone, or the whole ADePT.forward as one graph
(and its backward as one more). What they measured: bench/RESULTS.md sections 8 (CPU), 9 (the whole step), and the
GPU stages of bench/gpu_check.py.

Public
    COMPILE_SCOPES, COMPILE_MODES, CUDA_GRAPH_MODES, COMPILE_HELP   train.py's --compile / --compile-mode choices, help
    check_compile_flags(parser, args)            --compile-mode needs --compile; CUDA-graph modes need --compile model
    compile_extractors(net, dynamic, mode)       f of both branches (the backbone alone in byol mode)
    compile_model(net, dynamic, mode)            the whole forward of every mode, RoI pooling without host reads

Project-local dependencies: none at import (net is a model.ADePT).
"""
from __future__ import annotations

import argparse

COMPILE_SCOPES = ("extractors", "model")  # --compile: compile_extractors, compile_model
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # the modes that replay the step as CUDA graphs
COMPILE_HELP = ("issue 7: torch.compile in place, off by default. 'extractors' (plain --compile): the online\n"
                "and target feature extractors f (backbone + FPN, 3; the backbone alone in byol mode), the\n"
                "rest of the step eager; no measured gain on CPU beyond the noise (ResNet-18; ~5 min to\n"
                "compile on 2 cores with a cold cache; bench/RESULTS.md section 8). 'model': the whole\n"
                "forward, both branches, RPN + Eq. 1, RoIAlign, heads, Eq. 7 (one graph, and its backward),\n"
                "for GPUs whose step is bound by launching small kernels (bench/RESULTS.md section 9).\n"
                "With --color-on device it also compiles color_device.color_batch (1.5-1.7x on CPU,\n"
                "bench/RESULTS.md 4e)")


def check_compile_flags(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """--compile-mode needs --compile; the CUDA-graph modes need --compile model: with f compiled apart a step
    replays several graphs, and a replay may overwrite the outputs of the one before (separate mode: the frozen
    extractor's three views). One graph per step is what CUDA graphs suit."""
    if a.compile_mode and not a.compile:
        p.error(f"--compile-mode {a.compile_mode} needs --compile [extractors|model]")
    if a.compile_mode in CUDA_GRAPH_MODES and a.compile != "model":
        p.error(f"--compile-mode {a.compile_mode} (CUDA graphs) needs --compile model")


def compile_extractors(net, dynamic: bool | None = False, mode: str | None = None) -> None:
    """train.py --compile (issue 7): torch.compile, in place (nn.Module.compile), the feature extractor f of both
    branches (the backbone alone in byol mode), the part of the step with static shapes; the rest stays eager.
    In place: parameters (shared with LARS and byol.ema_update) and state_dict keys unchanged, so checkpoints load
    with or without --compile. dynamic=False: 4 graphs (V1/V2 and V3 sides x grad / no_grad), shared by the
    branches; None (symbolic V3) compiles slower on CPU and runs no faster (bench/RESULTS.md section 8).
    mode: torch.compile's (--compile-mode)."""
    for branch in (net.online, net.target):
        f = branch.extractor.backbone if net.mode == "byol" else branch.extractor
        f.compile(dynamic=dynamic, mode=mode)


def compile_model(net, dynamic: bool | None = False, mode: str | None = None) -> None:
    """train.py --compile model (issue 7): torch.compile, in place, the whole ADePT.forward: f, the RPN and Eq. 1,
    RoIAlign, g, p, q, the target branch and Eq. 7.

    RoI pooling switches to the masked, host-read-free one (ADePT.pool_sync_free: the same values), so every mode's
    step is one forward graph and one backward graph (tests/test_train.py); bench/op_counts.py --compiled counts
    what remains. Outside the graphs: the backward call, lars.LARS and byol.ema_update. --rpn-proposals (NMS) splits
    the step. Under torchrun DDP wraps the compiled module (its all-reduce then follows the backward instead of
    overlapping it). Checkpoint keys are unchanged. mode (--compile-mode): "reduce-overhead" replays forward and
    backward as CUDA graphs (LARS and the EMA update the parameters in place, outside them)."""
    net.pool_sync_free(True)
    net.compile(dynamic=dynamic, mode=mode)
