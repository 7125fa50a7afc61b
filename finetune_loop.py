"""The fine-tuning loop of finetune.py (paper 4.3, 4.4): COCO 1x schedule, loader, SGD steps, checkpoints, precise BN.

Schedule (detectron2's COCO 1x): SGD momentum 0.9, linear warm-up from lr / 1000, lr x 0.1 at each of args.steps;
weight decay on every parameter except the norm layers'. One iteration: the per-process batch through the detector's
losses (DistributedDataParallel under torchrun), skipped on every process when some process's loss is not finite
(20 in a row stop the run, naming the last checkpoint). The loader yields endless seeded batches of one orientation
(coco_data.AspectRatioBatches, --aspect-grouping), resume-exact: a resumed run sees the batches an uninterrupted one
would. checkpoint.pth is written atomically every args.ckpt_every iterations and at the end; model_final.pth after
precise BN (precise_bn.py) on batches drawn from the start with seed + 1 (the training images and their flips, in
another order), so that it does not depend on whether or where the run was resumed.

Public
    lr_at(step, peak, warmup, steps) -> lr;  param_groups(net, weight_decay) -> SGD groups (no decay on norm layers)
    TrainStep(detector): forward = detector.losses (what DDP wraps)
    make_loader(dataset, args, rank, world, per, seed, start, device) -> DataLoader of (images, targets) batches
    train_loop(args, det, train, keep, rank, world, device, out, log, ck=None): the whole run, model_final.pth
    resume(path, ck, det, opt, log) -> step;  to_device(images, targets, device) -> (images, targets)
    train_step(ddp, opt, images, targets, device, amp, world) -> (losses, finite)
    precise_bn_pass(det, loader, args, rank, device, log)
"""
from __future__ import annotations

import itertools
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import coco_data
import model as model_lib
from coco_data import InfiniteSampler
from detector import Detector
from precise_bn import bn_layers, update_bn_stats
from runtime import log_line, save_atomic, trim_log


def lr_at(step: int, peak: float, warmup: int, steps) -> float:
    """Linear warm-up from peak / 1000 (detectron2's factor 0.001), then x 0.1 at each of `steps`."""
    factor = 0.1 ** sum(step >= s for s in steps)
    if step < warmup:
        factor *= 0.001 + (1 - 0.001) * step / warmup
    return peak * factor


def param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on every parameter except normalisation layers' (detectron2's WEIGHT_DECAY_NORM = 0)."""
    norm_types = (torch.nn.modules.batchnorm._NormBase, torch.nn.GroupNorm)
    norm = {id(p) for m in net.modules() if isinstance(m, norm_types) for p in m.parameters(recurse=False)}
    params = [p for p in net.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in norm], "weight_decay": weight_decay},
            {"params": [p for p in params if id(p) in norm], "weight_decay": 0.0}]


class TrainStep(torch.nn.Module):
    """forward = detector.losses, so that DistributedDataParallel wraps the loss computation."""

    def __init__(self, detector: Detector):
        super().__init__()
        self.detector = detector

    def forward(self, images, targets):
        return self.detector.losses(images, targets)


def make_loader(dataset, args, rank: int, world: int, per: int, seed: int, start: int, device):
    """The training loader: endless batches of `per` items for this rank, seeded, after the first `start` batches
    (resume-exact); of one orientation each with args.aspect_grouping (the stream is built from its beginning and
    the skipped batches cost keys only)."""
    if args.aspect_grouping:
        batches = coco_data.AspectRatioBatches(InfiniteSampler(len(dataset), rank, world, seed),
                                               dataset.orientations(), per, start=start)
    else:
        batches = torch.utils.data.BatchSampler(InfiniteSampler(len(dataset), rank, world, seed, start=start * per),
                                                per, drop_last=True)
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=args.workers,
                                       collate_fn=coco_data.collate, pin_memory=device.type == "cuda")


def train_loop(args, det, train, keep, rank, world, device, out: Path, log, ck: dict | None = None) -> None:
    """SGD iterations args.iters (resumed from ck, out/checkpoint.pth's content); writes log.jsonl, checkpoints,
    model_final.pth."""
    if args.batch_size % world:
        raise SystemExit(f"--batch-size {args.batch_size} is not a multiple of {world} processes")
    per = args.batch_size // world
    dataset = coco_data.DetectionDataset(train, train=True, with_masks=args.detector == "mask", keep=keep,
                                         seed=args.seed)
    det = model_lib.maybe_sync_bn(det, device).to(device)
    opt = torch.optim.SGD(param_groups(det, args.weight_decay), lr=args.lr, momentum=0.9)
    step = resume(out / "checkpoint.pth", ck, det, opt, log)
    if rank == 0:
        trim_log(out / "log.jsonl", step)
    ddp = torch.nn.parallel.DistributedDataParallel(TrainStep(det)) if world > 1 else TrainStep(det)
    loader = make_loader(dataset, args, rank, world, per, args.seed, step, device)
    bar = tqdm(total=args.iters, initial=step, disable=rank != 0, dynamic_ncols=True)
    t0, seen, skipped = time.perf_counter(), 0, 0
    det.train()
    for images, targets in loader:
        if step >= args.iters:
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.lr, args.warmup, args.steps)
        torch.manual_seed(args.seed * 1_000_003 + step * 101 + rank)  # RoI sampling / scales: resume-exact
        losses, finite = train_step(ddp, opt, images, targets, device, args.amp, world)
        skipped = 0 if finite else skipped + 1
        if skipped >= 20:  # 20 in a row: diverged, not one odd batch
            raise FloatingPointError(f"non-finite loss for 20 iterations up to {step}; lower --lr. Last good "
                                     f"checkpoint: {out / 'checkpoint.pth'}")
        step, seen = step + 1, seen + args.batch_size
        bar.update(1)
        if step % args.log_every == 0 or step == args.iters:
            log_line(out / "log.jsonl" if rank == 0 else None, bar,
                     {"step": step, **{k: round(v.item(), 4) for k, v in losses.items()},
                      "lr": opt.param_groups[0]["lr"], "images_per_s": round(seen / (time.perf_counter() - t0), 2)})
        if rank == 0 and (step % args.ckpt_every == 0 or step == args.iters):
            save_atomic({"model": det.state_dict(), "optimizer": opt.state_dict(), "step": step,
                         "config": asdict(det.cfg), "args": vars(args)}, out / "checkpoint.pth")
    bar.close()
    if args.precise_bn:  # its own batches (seed + 1, from the start): the same whether or where the run resumed
        precise_bn_pass(det, make_loader(dataset, args, rank, world, per, args.seed + 1, 0, device), args, rank,
                        device, log)
    if rank == 0:
        save_atomic({"state_dict": det.state_dict(), "config": asdict(det.cfg), "cat_ids": train.cat_ids,
                     "names": train.names, "args": vars(args)}, out / "model_final.pth")
        log(f"done: {step} iterations, {seen / (time.perf_counter() - t0):.2f} images/s; {out / 'model_final.pth'}")


def resume(path: Path, ck: dict | None, det, opt, log) -> int:
    """Weights and optimizer from ck (path's content, read_checkpoint + check_same_run); its step, 0 without ck."""
    if ck is None:
        return 0
    try:
        det.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
    except (RuntimeError, ValueError, KeyError) as e:  # a checkpoint without saved args, of another model
        raise SystemExit(f"{path}: does not fit the model built from the flags ({str(e)[:300]}); pass another --out "
                         "for a new run") from e
    log(f"resumed from {path} at step {ck['step']}")
    return ck["step"]


def to_device(images, targets, device) -> tuple[list, list]:
    """A loader batch on the device: uint8 (3, H, W) images -> float in [0, 1]; the targets' tensors. non_blocking:
    pinned by the loader on CUDA, where a blocking copy would wait for the GPU."""
    images = [im.to(device, non_blocking=True).float() / 255 for im in images]
    targets = [{k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
               for t in targets]
    return images, targets


def train_step(ddp, opt, images, targets, device, amp: bool, world: int):
    """One SGD step on uint8 images; skipped (no update) when the loss is not finite on some rank.
    Returns (losses, finite)."""
    images, targets = to_device(images, targets, device)
    with torch.autocast(device.type, torch.bfloat16, enabled=amp and device.type == "cuda"):
        losses = ddp(images, targets)
    opt.zero_grad(set_to_none=True)
    finite = torch.isfinite(losses["loss"].detach()).float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)  # every rank skips together
    if finite.item():
        losses["loss"].backward()
        opt.step()
    return losses, bool(finite.item())


def precise_bn_pass(det, loader, args, rank, device, log) -> None:
    """Precise BN (precise_bn.py): the BN layers' running statistics recomputed with the final weights over
    args.precise_bn batches of `loader` (training augmentation; detectron2's hook draws them from a fresh train
    loader after the last iteration); under SyncBN every process runs the same number of batches."""
    det.train()
    torch.manual_seed(args.seed * 1_000_003 + 7 + rank)  # RoI sampling inside the losses: reproducible

    def forward(batch):
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp and device.type == "cuda"):
            det.losses(*to_device(*batch, device))

    n = update_bn_stats(det, itertools.islice(loader, args.precise_bn), forward)
    log(f"precise BN: running statistics of {len(bn_layers(det))} BN layers recomputed over {n} batches")
