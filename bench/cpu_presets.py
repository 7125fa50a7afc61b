"""Benchmark: one fine-tuning step of the CPU presets, paper-width heads against the study's narrow models (issue 6's
budget, issue 7's fast path; paper section 4.3 fine-tunes Mask R-CNN).

Same embedded train images (the first --batch-size of finetune.py's CPU preset data), same sizes and RoI counts,
interleaved rounds, one process. Configurations:
    paper width   finetune.py's CPU preset: 4conv1fc box head (SoCo's g), FPN d = 256, mask head 256 wide
    narrow        study.py's FT_CPU: 2fc box head, FPN d = 128, mask head 64 wide (its DEVIATION, for the CPU budget)
Each step is forward + backward + SGD step; the table gives seconds per step and images per second.

    OMP_NUM_THREADS=1 python bench/cpu_presets.py            # Mask R-CNN, batch 4, 3 timed steps x 2 rounds
    OMP_NUM_THREADS=1 python bench/cpu_presets.py --profile  # + the paper-width step's time by operator and shape

Public: main(argv).
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import coco_data  # noqa: E402
import finetune  # noqa: E402
import study  # noqa: E402

CONFIGS = {
    "paper width": ["--head", "4conv1fc", "--fpn-channels", "256", "--mask-dim", "256"],
    "narrow (study)": ["--head", study.FT_CPU["head"], "--fpn-channels", str(study.FT_CPU["fpn_channels"]),
                       "--mask-dim", str(study.FT_CPU["mask_dim"])],
}


def _batch(args, detector: str, n: int):
    """The first n train images of the CPU preset's data, as the training loader yields them (float in [0, 1])."""
    train, _, keep, _, _ = finetune.build_datasets(args, log=lambda *a: None)
    ds = coco_data.DetectionDataset(train, train=True, with_masks=detector == "mask", keep=keep, seed=0)
    images, targets = coco_data.collate([ds[i] for i in range(n)])
    return [im.float() / 255 for im in images], targets  # (3, H_i, W_i) each


def _step_seconds(det, opt, images, targets, steps: int) -> float:
    t = time.perf_counter()
    for _ in range(steps):
        loss = det.losses(images, targets)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t) / steps


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--detector", default="mask", choices=("faster", "mask"))
    p.add_argument("--batch-size", type=int, default=4, help="images per step (the CPU presets: 4)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration and round")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also print where one paper-width step spends its time")
    a = p.parse_args(argv)
    models = {}
    for name, flags in CONFIGS.items():
        args, _ = finetune.resolve(finetune.parse_args(["--init", "none", "--detector", a.detector, *flags]))
        torch.manual_seed(0)
        images, targets = _batch(args, a.detector, a.batch_size)
        det = finetune.build_detector(args, 6, log=lambda *x: None).train()
        opt = torch.optim.SGD(det.parameters(), lr=1e-3, momentum=0.9)
        _step_seconds(det, opt, images, targets, 1)  # warm-up: allocator, oneDNN kernels
        models[name] = (det, opt, images, targets, [])
    for _ in range(a.rounds):  # interleaved: drift on a shared machine hits both
        for det, opt, images, targets, times in models.values():
            times.append(_step_seconds(det, opt, images, targets, a.steps))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cpu = platform.processor() or platform.machine()
    print(f"{a.detector} R-CNN R18 train step, batch {a.batch_size}, CPU preset sizes; {cpu}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}, commit {commit}")
    print("| configuration | s / step (best round) | images / s | parameters (M) |\n| --- | --- | --- | --- |")
    out = {}
    for name, (det, _, _, _, times) in models.items():
        best = min(times)
        out[name] = best
        params = sum(p.numel() for p in det.parameters()) / 1e6
        print(f"| {name} | {best:.2f} | {a.batch_size / best:.2f} | {params:.1f} |")
    print(f"speed-up narrow / paper width: {out['paper width'] / out['narrow (study)']:.2f}x")
    if a.profile:  # the convolutions by input shape: which layer (head, mask head, P2) costs what
        det, opt, images, targets, _ = models["paper width"]
        with torch.profiler.profile(record_shapes=True) as prof:
            _step_seconds(det, opt, images, targets, 1)
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="cpu_time_total", row_limit=12))
    return out


if __name__ == "__main__":
    main()
