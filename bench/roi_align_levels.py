"""Benchmark: roi_head.multilevel_roi_align (no host sync) against the grouped variants it replaced (issue 7, the
fast path; Eqs. 2-4, section 3.4: one FPN level per box).

All variants pool each box on its own level only with torchvision.ops.roi_align(aligned=True) and return the boxes in
input order; the script reports the largest difference of outputs and input gradients against `grouped` (0 on a
CPU; on CUDA roi_align's backward adds with atomics, so the gradients may differ in the last bits), counts the
operations that make a GPU wait for the host (tests/sync_ops.py, on any device; on CUDA also the synchronisations
themselves), then times forward + backward.
    masked    roi_head.multilevel_roi_align(sync_free=True), its default on an accelerator: each level's RoIAlign
              gets all N boxes, the other levels' boxes parked off the map (they pool exact zeros at no memory
              traffic), the L results added. No host sync.
    grouped   roi_head.multilevel_roi_align(sync_free=False), its default on the CPU: one stable argsort by level,
              one read of the per-level counts, one gather back. On one H100 (bench/RESULTS.md) 3 host syncs per call
              (torch.bincount and the read of its counts); a whole joint step made 18 there (gpu_check.py stage 1).
    counted   `grouped` with the counts from a comparison sum, not torch.bincount: 1 sync per call.
    gather    no sync either: every box pooled on every level for real (4x the RoIAlign work), the own level's
              result picked by advanced indexing. On one H100: 0 syncs but 2.5x the time of `grouped`.
The grouped candidates build the RoIs with rois_from_boxes (no per-image launches) and the levels with
assign_levels_scalar (comparisons with Python numbers: no host -> device copy).

Symbols: B images, K boxes per image (N = B K RoIs), C = 256 channels, S view side; P2..P5 of S/4..S/32.

    python bench/roi_align_levels.py --threads 1      # CPU: B = 8, 32 at S = 224, K = 4
    python bench/roi_align_levels.py --device cuda     # B = 64, 128; also counts CUDA syncs per call

Public: multilevel_roi_align_counted, multilevel_roi_align_gather, rois_from_boxes, assign_levels_scalar (rejected
candidates), main(argv).
"""
from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
from torchvision.ops import roi_align

sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402

sys.path.insert(0, str(report.repo_root()))
sys.path.insert(0, str(report.repo_root() / "tests"))
import roi_head  # noqa: E402
from sync_ops import SyncOpCounter  # noqa: E402

STRIDES = (4, 8, 16, 32)  # P2..P5


def rois_from_boxes(boxes: list) -> torch.Tensor:
    """B tensors (K_i, 4) -> (sum K_i, 5) (image index, x1, y1, x2, y2), equal to roi_head._boxes_to_rois.

    Equal K_i (pre-training: K per image): arange + repeat_interleave by a Python int, no per-image launches and
    no host -> device copy. Unequal K_i: the per-image way."""
    ks = {b.shape[0] for b in boxes}
    if len(ks) != 1:
        return roi_head._boxes_to_rois(boxes)
    index = torch.arange(len(boxes), device=boxes[0].device, dtype=boxes[0].dtype).repeat_interleave(ks.pop())
    return torch.cat([index[:, None], torch.cat(boxes)], dim=1)


def assign_levels_scalar(boxes, num_levels=4, thresholds=roi_head.SOCO_THRESHOLDS):
    """roi_head.assign_levels(mode="soco") as a sum of comparisons with Python numbers: s <= t0 -> 0,
    t0 < s <= t1 -> 1, ... (inclusive upper bounds, as bucketize(right=False)); no thresholds tensor to copy."""
    s = roi_head.box_scale(boxes.float())  # (N,)
    levels = torch.zeros_like(s, dtype=torch.int64)
    for t in thresholds:
        levels += s > t
    return levels.clamp(max=num_levels - 1)


def _prepare(features, boxes):
    ref = features[0]
    box_dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    boxes = [b.to(device=ref.device, dtype=box_dtype) for b in boxes]
    rois = rois_from_boxes(boxes)  # (N, 5)
    return ref, box_dtype, rois, assign_levels_scalar(rois[:, 1:], num_levels=len(features))


def _pool_grouped(features, boxes, strides, output_size, sampling_ratio, level_counts):
    """`counted`: RoIs grouped by level with one stable argsort, each group pooled on its level, then
    gathered back; level_counts(levels (N,), L) -> L ints is where the two differ (its read is the host sync)."""
    ref, box_dtype, rois, levels = _prepare(features, boxes)
    n = rois.shape[0]
    if n == 0:
        return ref.new_zeros((0, ref.shape[1], output_size, output_size))
    order = torch.argsort(levels, stable=True)  # (N,) level-major, input order inside a level
    counts = level_counts(levels, len(features))
    pooled = [roi_align(feat.to(box_dtype), r, output_size, spatial_scale=1.0 / stride,
                        sampling_ratio=sampling_ratio, aligned=True)
              for feat, stride, r, k in zip(features, strides, rois[order].split(counts), counts) if k]
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(n, device=order.device)
    return torch.cat(pooled).index_select(0, inverse).to(ref.dtype)  # (N, C, 7, 7) input order


def multilevel_roi_align_counted(features, boxes, strides, output_size=7, sampling_ratio=0):
    """`grouped` with the per-level counts from a comparison sum instead of torch.bincount (which on CUDA reads the
    input's min and max on the host before it counts): one host sync per call, the read of the counts."""
    return _pool_grouped(features, boxes, strides, output_size, sampling_ratio,
                         lambda levels, L: (levels[:, None] == torch.arange(L, device=levels.device)).sum(0).tolist())


def multilevel_roi_align_gather(features, boxes, strides, output_size=7, sampling_ratio=0):
    """Same contract; every box pooled on every level, its own level picked by indexing: no host sync."""
    ref, box_dtype, rois, levels = _prepare(features, boxes)
    n = rois.shape[0]
    if n == 0:
        return ref.new_zeros((0, ref.shape[1], output_size, output_size))
    pooled = torch.stack([roi_align(feat.to(box_dtype), rois, output_size, spatial_scale=1.0 / stride,
                                    sampling_ratio=sampling_ratio, aligned=True)
                          for feat, stride in zip(features, strides)])  # (L, N, C, 7, 7)
    return pooled[levels, torch.arange(n, device=levels.device)].to(ref.dtype)  # (N, C, 7, 7)


VARIANTS = {"grouped": functools.partial(roi_head.multilevel_roi_align, sync_free=False),
            "masked": functools.partial(roi_head.multilevel_roi_align, sync_free=True),
            "counted": multilevel_roi_align_counted, "gather": multilevel_roi_align_gather}


def make_case(B: int, K: int, S: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(B, 256, S // s, S // s, generator=g).to(device).requires_grad_() for s in STRIDES]
    wh = S * (0.15 + 0.8 * torch.rand(B, K, 2, generator=g))  # sides 15-95 % of the view: every level used
    wh[0, 0] = torch.tensor([48.0, 48.0])  # exact boundaries: sqrt(wh) = 48 and 96 (inclusive upper bounds)
    wh[0, 1] = torch.tensor([96.0, 96.0])
    xy = (S - wh) * torch.rand(B, K, 2, generator=g)
    boxes = list(torch.cat([xy, xy + wh], dim=-1).to(device))  # B x (K, 4)
    return feats, boxes


def fwd_bwd(fn, feats, boxes, sampling_ratio=0):
    def step():
        for f in feats:
            f.grad = None
        out = fn(feats, boxes, STRIDES, sampling_ratio=sampling_ratio)
        out.backward(torch.ones_like(out))
        return out
    return step


def _grads(feats):
    # a level that no box uses gets no gradient from `grouped`/`counted` and zeros from `masked`/`gather`: same meaning
    return [torch.zeros_like(f) if f.grad is None else f.grad.clone() for f in feats]


def count_sync_ops(fn) -> int:
    """Operations in fn that make a GPU wait for the host (tests/sync_ops.py), counted on any device."""
    with SyncOpCounter() as counter:
        fn()
    return counter.total


def check_same(feats, boxes, sampling_ratio=0) -> float:
    """Largest |difference| of the outputs and input gradients of the other variants against `grouped` (inf if
    the level assignment or the RoIs differ)."""
    rois = torch.cat(boxes)
    if not torch.equal(roi_head.assign_levels(rois), assign_levels_scalar(rois)):
        return float("inf")
    if not torch.equal(roi_head._boxes_to_rois(boxes), rois_from_boxes(boxes)):
        return float("inf")
    out_ref, grads_ref = fwd_bwd(VARIANTS["grouped"], feats, boxes, sampling_ratio)(), _grads(feats)
    diff = 0.0
    for name in ("masked", "counted", "gather"):
        out = fwd_bwd(VARIANTS[name], feats, boxes, sampling_ratio)()
        diff = max([diff, float((out - out_ref).detach().abs().max())] +
                   [float((a - b).abs().max()) for a, b in zip(grads_ref, _grads(feats))])
    return diff


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", default=None, help="comma list (default 8,32 on CPU, 64,128 on CUDA)")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--boxes", type=int, default=4, help="K per image")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--sampling-ratio", type=int, default=0,
                   help="RoIAlign samples per bin side; 0 = adaptive (pre-training's and detector.py's default)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 on a shared machine)")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    sizes = [int(b) for b in (a.batch_size or ("64,128" if device.type == "cuda" else "8,32")).split(",")]
    print(report.header("multi-level RoIAlign: sync-free masked levels vs sort / gather (bench/roi_align_levels.py)",
                        device))
    rows = []
    for B in sizes:
        feats, boxes = make_case(B, a.boxes, a.size, device)
        fns = {k: fwd_bwd(fn, feats, boxes, a.sampling_ratio) for k, fn in VARIANTS.items()}
        t = report.time_rounds(fns, a.steps, 2, 2, device)
        row = {"batch": B, "rois": B * a.boxes, "max_diff": check_same(feats, boxes, a.sampling_ratio),
               **{f"{k}_ms": 1e3 * v for k, v in t.items()},
               **{f"{k}_sync_ops": count_sync_ops(fn) for k, fn in fns.items()}}
        if device.type == "cuda":
            import pretrain_step

            row.update({f"{k}_syncs": pretrain_step.count_syncs(fn) for k, fn in fns.items()})
        rows.append(row)
    print(f"settings: S = {a.size}, K = {a.boxes}, C = 256, sampling_ratio {a.sampling_ratio}, forward + backward, "
          f"{a.steps} calls in 2 rounds\n")
    cols = (["batch", "rois", "max_diff"] + [f"{k}_ms" for k in VARIANTS] + [f"{k}_sync_ops" for k in VARIANTS]
            + [f"{k}_syncs" for k in VARIANTS])
    print(report.table(rows, [c for c in cols if c in rows[0]]))
    print(f"\nload average at end: {report.load_average()}")
    return rows


if __name__ == "__main__":
    main()
