"""Benchmark: padding of fine-tuning batches with and without aspect-ratio grouping (finetune.py --aspect-grouping,
detectron2's ASPECT_RATIO_GROUPING; paper section 4.3 fine-tunes on COCO, whose photos are landscape or portrait).

Pixels only, no model: each image of the split is resized as detector.Detector.preprocess does in training (short
side drawn from --min-size, long side at most --max-size) and a batch is padded to its largest height and width,
rounded up to a multiple of 32. The batches are built as finetune_loop.make_loader builds them (InfiniteSampler,
then coco_data.AspectRatioBatches or plain batches of --batch-size per process). The backbone's work grows with the
padded canvas, so canvas pixels per image is the cost that grouping changes.

    python bench/batch_padding.py          # the embedded train split at the CPU preset's sizes, 4 images per batch
    python bench/batch_padding.py --json /data/coco/annotations/instances_train2017.json --batch-size 2 \\
        --min-size 640,672,704,736,768,800 --max-size 1333               # COCO 1x: 16 images over 8 GPUs

Public: canvas_stats(sizes, batches, min_sizes, max_size, seed), main(argv).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

sys.path.insert(0, str(report.repo_root()))
import coco_data  # noqa: E402
import finetune  # noqa: E402

DIVISIBLE = 32  # DetectorConfig.size_divisible


def canvas_stats(sizes: list[tuple[int, int]], batches, min_sizes, max_size: int, seed: int = 0) -> dict:
    """sizes[i] = (width, height) of item i; batches: lists of InfiniteSampler keys (index, pass). -> mean image
    and canvas pixels per image after the training resize, and the padded share of the canvas."""
    rng, image_px, canvas_px, n = random.Random(seed), 0, 0, 0
    for batch in batches:
        resized = []
        for i, _ in batch:
            w, h = sizes[i]
            s = min(rng.choice(min_sizes) / min(h, w), max_size / max(h, w))  # detector.preprocess's rule
            resized.append((max(1, round(h * s)), max(1, round(w * s))))
        H = math.ceil(max(r[0] for r in resized) / DIVISIBLE) * DIVISIBLE
        W = math.ceil(max(r[1] for r in resized) / DIVISIBLE) * DIVISIBLE
        image_px += sum(r[0] * r[1] for r in resized)
        canvas_px += H * W * len(batch)
        n += len(batch)
    return {"image_kpx": image_px / n / 1e3, "canvas_kpx": canvas_px / n / 1e3,
            "padded_pct": 100 * (1 - image_px / canvas_px)}


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", help="a COCO-format JSON (default: the embedded train split)")
    p.add_argument("--batch-size", type=int, default=finetune.CPU["batch_size"], help="images per process")
    p.add_argument("--min-size", default=finetune.CPU["min_size"], help="training short sides, comma list")
    p.add_argument("--max-size", type=int, default=finetune.CPU["max_size"])
    p.add_argument("--steps", type=int, default=5000, help="batches counted per mode")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.json is None:
        import synthetic
        args.json = str(synthetic.ensure_synthetic_dataset() / "annotations" / "train.json")
    images = sorted(json.loads(Path(args.json).read_text())["images"], key=lambda im: im["id"])  # DetectionDataset
    sizes = [(im["width"], im["height"]) for im in images]
    groups = [int(h > w) for w, h in sizes]  # DetectionDataset.orientations
    min_sizes = [int(v) for v in args.min_size.split(",")]
    print(report.header("batch padding: aspect-ratio grouping (bench/batch_padding.py)"))
    print(f"settings: {args.json}, {len(sizes)} images ({sum(groups)} portrait), {args.batch_size} per batch, "
          f"short side {args.min_size}, max {args.max_size}, {args.steps} batches per mode\n")
    rows = []
    for name, grouped in (("mixed (--no-aspect-grouping)", False), ("grouped (default)", True)):
        sampler = finetune.InfiniteSampler(len(sizes), 0, 1, args.seed)
        batches = (coco_data.AspectRatioBatches(sampler, groups, args.batch_size) if grouped else
                   torch.utils.data.BatchSampler(sampler, args.batch_size, drop_last=True))
        it = iter(batches)
        rows.append({"batches": name, **canvas_stats(sizes, (next(it) for _ in range(args.steps)), min_sizes,
                                                     args.max_size, args.seed)})
    for r in rows:
        r["canvas_vs_grouped"] = r["canvas_kpx"] / rows[-1]["canvas_kpx"]
    print(report.table(rows, ["batches", "image_kpx", "canvas_kpx", "padded_pct", "canvas_vs_grouped"]))
    return rows


if __name__ == "__main__":
    main()
