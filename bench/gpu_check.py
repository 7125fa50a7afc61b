"""The ONE prepared script for a lent GPU (issue 7, "GPU"): checks the CUDA path, then measures the joint step.

Run on the device machine (python3 there holds torch; ~5 min on one H100, each stage guarded by --budget-s):
    PYTHONUNBUFFERED=1 python3 bench/gpu_check.py            # tables on stdout and in $OUT/gpu_check.md
Check the script itself on a CPU with tiny settings (ResNet-18, 64 px, a few steps):
    python bench/gpu_check.py --smoke

Stages (each one's failure is printed and the next stage still runs; exit status 1 if any failed):
    1. CUDA path: device; a ResNet-50 joint step (model.ADePT, lars.LARS, byol.ema_update) in fp32 and under bf16
       autocast + channels_last from the same weights and inputs: finite losses, bf16 loss within 0.05 + 2 % of fp32,
       weights moved, the model's 4-D weights really channels_last; host syncs per step
       (torch.cuda.set_sync_debug_mode); SyncBN: a 1-process process group (nccl; gloo in --smoke), model
       .maybe_sync_bn (converts only with > 1 process: reported) and nn.SyncBatchNorm.convert_sync_batchnorm run
       through one step (CUDA only: SyncBN does not run on CPU, reference.md traps; with one process SyncBatchNorm
       falls back to batch_norm, so this checks the conversion and the step, not the all-reduce).
    1b. colour on the device (color_device.color_batch, train.py --color-on device): the CPU's pixels (max and mean
       difference), host syncs, ms per batch of 128 x three views; with --compile also torch.compile'd.
    2. joint step, the issue's table: bench/pretrain_step.py, ResNet-50, 224/112, batch 64 and 128, bf16 +
       channels_last: images/s, ratio to the bare convnet, GFLOP/image, MFU against 790 TFLOP/s, peak memory.
    2b. with --compile, if 240 s of budget are left (it runs right after stage 2): the joint step eager vs the
       whole forward torch.compile'd (compile_step.compile_model, train.py --compile model: one graph, its backward one
       more), batch 128, interleaved in one run (--compare-compile model): does compiling remove the ~105 ms per
       step that did not grow with the batch? (The old stage 6 compiled the extractors alone; never reached.)
    2c. the same with CUDA graphs (--compile-mode reduce-overhead; --compare-compile model:reduce-overhead), if
       120 s are left (Inductor compiles again, the mode is part of its cache key, but reuses 2b's Triton
       binaries); a model whose first two steps fail is reported and left out.
    3. fast-path ablations at batch 64: bf16 without channels_last; fp32 (TF32 convolutions, cuDNN's default).
    4. bench/roi_align_levels.py: sync-free (masked) vs grouped RoI pooling (syncs, time), batch 64 and 128.
    5. bench/finetune_step.py: Mask R-CNN R50-FPN, 2 images of 800 x 1067, bf16, ours vs torchvision; --profile:
       each train step by operator and its host syncs (the H100 run found ours at 0.77x torchvision's speed).
    5b. bench/data_pipeline.py on this machine's CPU cores: three-view samples/s with 0, 1 and 4 loader workers (the
       2-core development VM measured 240-270 in-process but 130-190 through a worker, goal 250 per worker).


Public: main(argv).
"""
from __future__ import annotations

import argparse
import copy
import os
import socket
import sys
import time
import traceback
from pathlib import Path

import torch



def placeholder_pycocotools() -> bool:
    """The device image has no pycocotools (KINDS.md's package list). synthetic.py, imported by data.py, imports it at
    module level but only its dataset writer uses it, and no GPU benchmark writes the dataset: register placeholder
    modules that raise ImportError when used. Returns True if it did."""
    import importlib.util
    import types

    if importlib.util.find_spec("pycocotools") is not None:
        return False

    class Missing(types.ModuleType):
        def __getattr__(self, name):
            if name.startswith("__"):
                raise AttributeError(name)
            raise ImportError(f"pycocotools is not installed here (placeholder from bench/gpu_check.py): {name}")

    pkg, sub = Missing("pycocotools"), Missing("pycocotools.mask")
    pkg.__path__, pkg.mask = [], sub
    sys.modules.update({"pycocotools": pkg, "pycocotools.mask": sub})
    return True


PLACEHOLDER = placeholder_pycocotools()
sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

sys.path.insert(0, str(report.repo_root()))
import byol  # noqa: E402
import lars  # noqa: E402
import model as model_lib  # noqa: E402


class Tee:
    """stdout copy into a file (the device tool returns only the tail of stdout)."""

    def __init__(self, path: Path):
        self.file, self.stdout = open(path, "w"), sys.stdout

    def write(self, s):
        self.stdout.write(s)
        self.file.write(s)
        self.file.flush()

    def flush(self):
        self.stdout.flush()


def _step(net, opt, views, boxes, amp: bool):
    with torch.autocast("cuda", torch.bfloat16, enabled=amp):
        losses = net(views, boxes)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    opt.step()
    byol.ema_update(net.online, net.target, 0.99)
    return losses["loss"].detach().float()


def check_cuda_path(a, device) -> None:
    """Stage 1 (see the module docstring). Raises AssertionError on a failed check."""
    import pretrain_step as ps

    B, depth, size = (2, 18, 64) if a.smoke else (16, 50, 224)
    print(f"device: {report.machine_info(device)['cuda_device']}; bf16 supported: "
          f"{device.type == 'cuda' and torch.cuda.is_bf16_supported()}")
    torch.manual_seed(0)
    base = model_lib.ADePT("joint", depth).to(device)
    views, boxes = ps.make_batch(B, size, size // 2, 4, device, channels_last=False)
    results = {}
    for name, amp, cl in (("fp32", False, False), ("bf16+channels_last", device.type == "cuda", True)):
        net = copy.deepcopy(base)
        if cl:
            net = net.to(memory_format=torch.channels_last)
        v = [x.contiguous(memory_format=torch.channels_last) for x in views] if cl else views
        opt = lars.LARS(lars.param_groups(net), lr=1e-3)
        w0 = net.online.extractor.backbone.conv1.weight.detach().clone()
        torch.manual_seed(1)  # same anchor sampling in both runs
        loss = _step(net, opt, v, boxes, amp)
        moved = float((net.online.extractor.backbone.conv1.weight.detach() - w0).abs().max())
        results[name] = float(loss)
        print(f"  {name}: loss {float(loss):.5f}, conv1 weight moved by {moved:.2e}")
        assert torch.isfinite(loss), f"{name}: non-finite loss"
        assert moved > 0, f"{name}: the step did not change the weights"
        if cl:
            w = net.online.extractor.backbone.conv1.weight  # 7x7: a 1x1 kernel would pass trivially
            assert w.is_contiguous(memory_format=torch.channels_last), "weights are not channels_last"
        if device.type == "cuda":
            print(f"  {name}: host syncs in one step: {ps.count_syncs(lambda: _step(net, opt, v, boxes, amp))}")
    diff, tol = abs(results["bf16+channels_last"] - results["fp32"]), 0.05 + 0.02 * abs(results["fp32"])
    print(f"  bf16 vs fp32 loss: difference {diff:.4f} (tolerance {tol:.3f}; L_det is in [-8, 8])")
    assert diff < tol, f"bf16 loss differs from fp32 by {diff:.4f}"
    check_sync_bn(base, views, boxes, device)


def check_sync_bn(base, views, boxes, device) -> None:
    import torch.distributed as dist

    with socket.socket() as s:  # a free local port for the 1-process group
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        same = model_lib.maybe_sync_bn(base, device) is base
        print(f"  process group {backend}, world 1: maybe_sync_bn left the model unchanged: {same} "
              "(it converts only with > 1 process)")
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base))
        n = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in net.modules())
        print(f"  convert_sync_batchnorm: {n} SyncBatchNorm layers")
        assert n > 0, "no BatchNorm converted"
        if device.type == "cuda":
            loss = _step(net, lars.LARS(lars.param_groups(net), lr=1e-3), views, boxes, True)
            print(f"  SyncBN joint step under bf16: loss {float(loss):.5f}")
            assert torch.isfinite(loss), "SyncBN step: non-finite loss"
        else:
            print("  SyncBN step skipped on CPU (SyncBatchNorm runs only on GPUs)")
    finally:
        dist.destroy_process_group()


def check_color_device(a, device) -> None:
    """Stage 1b: color_device.color_batch (train.py --color-on device) on this device: the CPU's pixels (within a
    few levels, rarely), host syncs, and ms per batch of three views (224/224/112)."""
    import pretrain_step as ps

    import augment
    import color_device

    B, S = (4, 64) if a.smoke else (128, 224)
    g = augment.Draws(torch.Generator().manual_seed(0))
    batch = []
    for size, blur_p, solarize_p in ((S, 1.0, 0.0), (S, 0.1, 0.2), (S // 2, 0.1, 0.2)):  # V1, V2, V3 as render_views
        x = torch.randint(0, 256, (B, 3, size, size), dtype=torch.uint8, generator=g.g)
        batch.append((x, torch.tensor([augment.draw_color(g, blur_p, solarize_p) for _ in range(B)])))
    on_dev = [(x.to(device).contiguous(memory_format=torch.channels_last), c.to(device)) for x, c in batch]
    for (x, c), (xd, cd) in zip(batch, on_dev):
        diff = (color_device.color_batch(x, c).int() - color_device.color_batch(xd, cd).cpu().int()).abs()
        print(f"  {tuple(x.shape)}: difference to the CPU result: max {int(diff.max())}, "
              f"mean {diff.float().mean():.2e} grey levels")
        # a sum in another order (the contrast's mean, the matrix products, the blur) can round a value to the next
        # level; the jitter's later factors (up to 1.4) and the hue can carry that to 2-3 levels: bounded, and rare
        assert diff.max() <= 3 and diff.float().mean() < 0.01, "color_batch differs between the CPU and this device"

    fns = [("color_batch", color_device.color_batch)]
    if a.compile:  # train.py --compile --color-on device (train.color_fn)
        fns.append(("color_batch torch.compile'd", torch.compile(color_device.color_batch, dynamic=False)))
    for name, fn in fns:
        def run():
            for xd, cd in on_dev:
                fn(xd, cd)
        t0 = time.perf_counter()
        run()  # warm-up (and compilation)
        if device.type == "cuda":
            torch.cuda.synchronize()
            print(f"  {name}: first call {time.perf_counter() - t0:.1f} s; host syncs in one batch of 3 views: "
                  f"{ps.count_syncs(run)}")
            torch.cuda.synchronize()
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            run()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        best = min(times)
        print(f"  {name}, 3 views of a batch of {B}: {1e3 * best:.2f} ms per batch (best of 4 after one warm-up), "
              f"{1e6 * best / B:.1f} us per sample")


def stages(a, device) -> list:
    """(name, minimum seconds of budget it needs, callable) in order."""
    import data_pipeline
    import finetune_step
    import pretrain_step
    import roi_align_levels

    dev = [] if a.smoke else ["--device", "cuda"]
    if a.smoke:  # tiny CPU settings: only that every stage runs
        joint = ["--depth", "18", "--size", "64", "--batch-size", "2", "--steps", "1", "--rounds", "1",
                 "--warmup", "1", "--threads", "1"]
        return [("1. CUDA path", 0, lambda: check_cuda_path(a, device)),
                ("1b. colour on the device", 0, lambda: check_color_device(a, device)),
                ("2. joint step", 0, lambda: pretrain_step.main(joint)),
                ("4. RoI pooling", 0, lambda: roi_align_levels.main(["--batch-size", "2", "--steps", "2"])),
                ("5. fine-tuning", 0, lambda: finetune_step.main(["--depth", "18", "--size", "96", "--steps", "1",
                                                                  "--rounds", "1", "--warmup", "1", "--threads",
                                                                  "1", "--objects", "3"])),
                ("5b. data pipeline", 0, lambda: data_pipeline.main(["--workers", "0", "--samples", "16", "--images",
                                                                     "8", "--batch-size", "8", "--epochs", "0"]))]
    r50 = dev + ["--depth", "50", "--size", "224", "--steps", "12", "--rounds", "3", "--warmup", "3"]
    return [
        ("1. CUDA path", 0, lambda: check_cuda_path(a, device)),
        ("1b. colour on the device (train.py --color-on device)", 60, lambda: check_color_device(a, device)),
        ("2. joint step, bf16 + channels_last", 60,
         lambda: pretrain_step.main(r50 + ["--batch-size", "64,128", "--amp", "--channels-last", "--count-syncs"])),
        ("2b. torch.compile, the whole model", 240 if a.compile else 10**9,
         lambda: pretrain_step.main(r50 + ["--batch-size", "128", "--amp", "--channels-last", "--compare-compile",
                                           "model", "--no-bare"])),
        ("2c. torch.compile, the whole model as CUDA graphs", 120 if a.compile else 10**9,
         lambda: pretrain_step.main(r50 + ["--batch-size", "128", "--amp", "--channels-last", "--compare-compile",
                                           "model:reduce-overhead", "--no-bare"])),
        ("3a. ablation: bf16, no channels_last", 60,
         lambda: pretrain_step.main(r50 + ["--batch-size", "64", "--amp"])),
        ("3b. ablation: fp32 (TF32 convs)", 60, lambda: pretrain_step.main(r50 + ["--batch-size", "64"])),
        ("4. RoI pooling", 30, lambda: roi_align_levels.main(dev + ["--batch-size", "64,128"])),
        ("5. fine-tuning Mask R-CNN R50", 90,
         lambda: finetune_step.main(dev + ["--depth", "50", "--size", "800", "--batch-size", "2", "--amp",
                                           "--steps", "6", "--rounds", "2", "--warmup", "2", "--profile"])),
        ("5b. data pipeline (this machine's CPU)", 40,
         lambda: data_pipeline.main(["--workers", "0,1,4", "--samples", "640", "--epochs", "0"])),
    ]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny settings: check that the script runs")
    p.add_argument("--budget-s", type=float, default=480, help="skip a stage that would start past its budget")
    p.add_argument("--compile", action="store_true",
                   help="stages 2b and 2c (the whole model, without and with CUDA graphs) and 1b's color_batch\n"
                        "torch.compile'd (minutes of compilation)")
    a = p.parse_args(argv)
    out = Path(os.environ.get("OUT") or "/tmp")
    sys.stdout = Tee(out / "gpu_check.md")
    if not a.smoke and not torch.cuda.is_available():
        print("no CUDA device: run with --smoke on a CPU")
        return 1
    device = torch.device("cpu" if a.smoke else "cuda")
    if a.smoke:
        torch.set_num_threads(1)
    print(report.header("GPU check (bench/gpu_check.py" + (", --smoke on CPU)" if a.smoke else ")"), device))
    if PLACEHOLDER:
        print("note: pycocotools is missing here; placeholder modules let data.py import (not used by the checks)")
    t0, failed = time.perf_counter(), []
    for name, need, fn in stages(a, device):
        left = a.budget_s - (time.perf_counter() - t0)
        if left < need:
            print(f"\n# {name}: skipped ({left:.0f} s of budget left, needs {need if need < 10**9 else '--compile'})")
            continue
        print(f"\n# {name}\n", flush=True)
        s0 = time.perf_counter()
        try:
            fn()
            print(f"\n({name}: ok in {time.perf_counter() - s0:.0f} s)")
        except Exception:  # a failed stage is reported; the others still run
            failed.append(name)
            print(f"\n({name}: FAILED)\n{traceback.format_exc()}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"\ngpu_check done in {time.perf_counter() - t0:.0f} s; failed stages: {failed or 'none'}")
    sys.stdout.flush()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
