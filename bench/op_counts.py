"""Benchmark: operators dispatched per training step, and the ones that make a GPU wait (issue 7, the fast path).

On a GPU a step whose kernels are small is bound by the host: each dispatched operator costs a few microseconds to
launch whatever the batch, and each sync stops the host from running ahead. On one H100 the joint step had ~105 ms
per step that did not grow with the batch (bench/RESULTS.md). Both counts are the same on every device, so this
measures them on a CPU, with the RoI pooling a GPU uses (roi_head.multilevel_roi_align(sync_free=True)):
    joint      one pre-training step by phase: forward, backward, lars.LARS, byol.ema_update
    bare       the convnet work of the same views (bench/pretrain_step.py's bare_step)
    compiled   --compiled: the joint forward + backward with compile_step.compile_model (train.py --compile model): the
               operators still dispatched and the kernels Inductor generated (C++ here, Triton on a GPU)
    color      color_device.color_batch on one batch of one view (train.py --color-on device: 3 per step)
    finetune   one Mask R-CNN train step, ours against torchvision's (bench/finetune_step.py's matched settings)
Counted with a TorchDispatchMode: the aten operators below autograd, forward and backward (a composite operator
counts as the ones it runs). Syncs: tests/sync_ops.py.

    python bench/op_counts.py              # ResNet-50 pre-training at 64 px, ResNet-18 Mask R-CNN at 160 px
    python bench/op_counts.py --compiled --finetune-size 0     # + the compiled joint step (~10 min on one core)

Public: count_ops(fn) -> (ops, sync ops), counted(fn) -> counter, sync_detail, pretrain_rows, compiled_rows,
color_rows, finetune_rows, main(argv).
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

sys.path.insert(0, str(report.repo_root()))
sys.path.insert(0, str(report.repo_root() / "tests"))
import byol  # noqa: E402
import compile_step  # noqa: E402
import lars  # noqa: E402
import model as model_lib  # noqa: E402
import roi_head  # noqa: E402
from sync_ops import SyncOpCounter  # noqa: E402


class CompiledOpCounter(SyncOpCounter):
    """SyncOpCounter that lets torch.compile'd code run compiled: it sees the operators a compiled artifact still
    dispatches (extern kernels), not the fused ones. (A plain dispatch mode makes torch.compile fall back to eager.)"""

    @classmethod
    def ignore_compile_internals(cls) -> bool:
        return True


def count_ops(fn, counter_type=SyncOpCounter) -> tuple[int, int]:
    """(aten operators dispatched, ops that make a GPU wait) in one call of fn (run twice: the first warms up)."""
    counter = counted(fn, counter_type)
    return counter.ops, counter.total


def counted(fn, counter_type=SyncOpCounter) -> SyncOpCounter:
    """The counter of one call of fn after a warm-up call (anchors and other caches built): .ops, .counts."""
    fn()
    with counter_type() as counter:
        fn()
    return counter


def sync_detail(counter: SyncOpCounter) -> str:
    """'name count, ...' of the sync ops, the most frequent first (aten:: dropped)."""
    by_count = sorted(counter.counts.items(), key=lambda kv: -kv[1])
    return ", ".join(f"{k.removeprefix('aten::')} {v}" for k, v in by_count)


def views_and_boxes(B: int, K: int, size: int) -> tuple[list, list]:
    """Random views V1, V2 (B, 3, size, size), V3 (B, 3, size/2, size/2) and K boxes each (B, K, 4) xyxy, sized so
    that every FPN level gets boxes."""
    views = [torch.randn(B, 3, size, size), torch.randn(B, 3, size, size), torch.randn(B, 3, size // 2, size // 2)]
    side = torch.tensor([0.15, 0.3, 0.6, 0.95])[torch.arange(K) % 4]  # (K,) box sides as fractions of the view
    boxes = [torch.cat([torch.zeros(B, K, 2), (side * s)[None, :, None].expand(B, K, 2)], -1)
             for s in (size, size, size // 2)]
    return views, boxes


def pretrain_rows(depth: int, size: int, B: int = 2, K: int = 4) -> list[dict]:
    torch.manual_seed(0)
    net = model_lib.ADePT("joint", depth=depth)
    net.pool_sync_free(True)  # the RoI pooling a GPU runs
    opt = lars.LARS(lars.param_groups(net), lr=0.01)
    views, boxes = views_and_boxes(B, K, size)
    state = {}

    def forward():
        state["loss"] = net(views, boxes)["loss"]

    def backward():
        forward()
        opt.zero_grad(set_to_none=True)
        state["loss"].backward()

    rows = []
    for phase, fn in [("forward", forward), ("backward", backward), ("LARS step", opt.step),
                      ("EMA", lambda: byol.ema_update(net.online, net.target, 0.99))]:
        ops, syncs = count_ops(fn)
        rows.append({"step": "joint", "phase": phase, "ops": ops, "sync_ops": syncs})
    rows[1]["ops"] -= rows[0]["ops"]  # backward() ran a forward too
    rows[1]["sync_ops"] -= rows[0]["sync_ops"]
    rows.append({"step": "joint", "phase": "total", "ops": sum(r["ops"] for r in rows),
                 "sync_ops": sum(r["sync_ops"] for r in rows)})

    def bare():
        feats = [net.online.extractor(v) for v in views]
        loss = sum(f.float().mean() for fs in feats for f in fs)
        with torch.no_grad():
            for v in views:
                net.target.extractor(v)
        net.online.zero_grad(set_to_none=True)
        loss.backward()

    ops, syncs = count_ops(bare)
    rows.append({"step": "bare convnet", "phase": "total", "ops": ops, "sync_ops": syncs})
    return rows


def compiled_rows(depth: int, size: int, B: int = 2, K: int = 4) -> list[dict]:
    """The joint step's forward + backward with compile_step.compile_model (Inductor): the aten operators still
    dispatched (extern kernels: convolutions, matmuls, roi_align, ...) and the kernels Inductor generated for the step
    (each run once per step). On a CPU those are C++ loops, on a GPU Triton kernels; the fusion differs, the order of
    magnitude is what this shows. Compiling takes minutes on a CPU."""
    from torch._inductor import metrics

    torch.manual_seed(0)
    net = model_lib.ADePT("joint", depth=depth)
    compile_step.compile_model(net)
    views, boxes = views_and_boxes(B, K, size)

    def step():
        net.zero_grad(set_to_none=True)
        net(views, boxes)["loss"].backward()

    metrics.reset()
    ops, syncs = count_ops(step, CompiledOpCounter)  # the first, uncounted call compiles
    return [{"step": "joint, --compile model", "phase": "forward + backward", "ops": ops, "sync_ops": syncs,
             "generated_kernels": metrics.generated_kernel_count}]


def color_rows(B: int = 4, size: int = 64) -> list[dict]:
    """color_device.color_batch on one batch of views (train.py --color-on device), random parameters."""
    import augment
    import color_device

    g = augment.Draws(torch.Generator().manual_seed(0))
    x = torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, generator=g.g)
    params = torch.tensor([augment.draw_color(g, 0.5, 0.2) for _ in range(B)])
    ops, syncs = count_ops(lambda: color_device.color_batch(x, params))
    return [{"step": "color_batch, one batch of one view", "phase": "total", "ops": ops, "sync_ops": syncs}]


def finetune_rows(size: int) -> list[dict]:
    import finetune_step

    args = finetune_step.parse_args(["--size", str(size), "--device", "cpu", "--depth", "18"])
    torch.manual_seed(0)
    ours, theirs = finetune_step.build_ours(args).train(), finetune_step.build_torchvision(args).train()
    images, targets = finetune_step.make_inputs(2, size, args.objects, torch.device("cpu"))
    rows = []
    for name, net, loss_of in (("ours", ours, ours.losses), ("torchvision", theirs, theirs)):
        c = counted(finetune_step.train_fn(net, loss_of, images, targets, args))
        rows.append({"step": f"Mask R-CNN train, {name}", "phase": "total", "ops": c.ops, "sync_ops": c.total,
                     "sync_detail": sync_detail(c)})
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=50, help="ResNet depth of the pre-training step")
    p.add_argument("--size", type=int, default=64,
                   help="V1/V2 side of the pre-training step (the counts do not depend on it)")
    p.add_argument("--finetune-size", type=int, default=160, help="short side of the Mask R-CNN images; 0 skips")
    p.add_argument("--compiled", action="store_true", help="add the joint step compiled (train.py --compile model;\n"
                   "minutes of compilation on a CPU)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    print(report.header("operators per training step (bench/op_counts.py)", torch.device("cpu")))
    original = roi_head.multilevel_roi_align
    # detector.py's pooling: the path a GPU takes (ADePT passes its own sync_free, set by pool_sync_free above)
    roi_head.multilevel_roi_align = functools.partial(original, sync_free=True)
    try:
        rows = pretrain_rows(a.depth, a.size) + (compiled_rows(a.depth, a.size) if a.compiled else []) + \
            color_rows() + (finetune_rows(a.finetune_size) if a.finetune_size else [])
    finally:
        roi_head.multilevel_roi_align = original
    if a.compiled:  # a compiled step that fell back to eager would dispatch as many operators as the eager one
        compiled = next(r for r in rows if r["step"] == "joint, --compile model")
        eager = sum(r["ops"] for r in rows if r["step"] == "joint" and r["phase"] in ("forward", "backward"))
        assert compiled["ops"] < eager and compiled["generated_kernels"] > 0, f"did not run compiled: {compiled}"
    print(f"settings: pre-training ResNet-{a.depth}, batch 2, {a.size} px, K = 4; Mask R-CNN ResNet-18, 2 images, "
          f"short side {a.finetune_size}; RoI pooling sync_free=True (the GPU path)\n")
    print(report.table(rows, ["step", "phase", "ops", "sync_ops"] + (["generated_kernels"] if a.compiled else []) +
                       (["sync_detail"] if a.finetune_size else [])))
    return rows


if __name__ == "__main__":
    main()
