"""ADePT pre-training under torchrun (paper sections 3.5, 4.2; Table 4 switches; Eq. 8).

    torchrun --nproc_per_node 8 train.py --mode joint --data /imagenet/train --proposals ss.npz   # the paper
    python train.py                          # embedded synthetic data, CPU preset, joint mode, one process

Modes (4.2): joint (L_RPN + L_det from random init), separate (only the RPN, on a frozen extractor and head from a
soco run: --init), soco (L_det only: the SoCo baseline), byol (image-level BYOL baseline, on V1 and V2: 4.1.2's views,
not BYOL's own random crops).

Optimisation (4.2, reference.md): LARS (lars.py: momentum 0.9, trust coefficient 0.001, weight decay 1e-5; biases and
norm parameters excluded from weight decay and trust ratio), lr = base_lr x global batch / 256 with linear warm-up from
lr/100 then cosine to 0; EMA momentum tau from byol.tau_schedule (0.99 -> 1). The paper gives "a learning rate of 0.1
annealed to 0 with a cosine scheduler" (4.2) and no batch size or warm-up.
# DEVIATION (SoCo's code; flags --base-lr, --warmup-epochs 0): 0.1 read as the base of SoCo's linear scaling rule,
# and SoCo's 10 warm-up epochs (reference.md). log.jsonl records the lr of every logged step.

Outputs (rank 0 only) in --out: checkpoint.pth (atomic and fsynced, every --ckpt-every steps and at the end, never
with a non-finite weight; auto-resumed, only by the same run: check_same_run), log.jsonl (losses, lr, tau, images/s,
images replaced and samples without a visible box so far; plotted into curves.png at the end), pretrained.pth (the
target branch, keys backbone.* fpn.* box_head.* rpn.*; model.export_pretrained; its meta holds the run's args).

Public: lr_at, parse_args, resolve_args, rpn_views, v2_ratio, build_data (the dataset),
build_model (the ADePT model, SyncBN'd, compiled), load_init (separate mode's --init), color_fn, save_checkpoint,
check_same_run, load_checkpoint, train_step (one step of Eq. 8), log_step (a log.jsonl line), train_loop, main. From
runtime.py (process group, atomic writes, log lines, the non-finite stop), re-exported here: setup_distributed,
save_atomic, exit_distributed, anchor_sizes, check_finite. --compile and its flags: compile_step.py.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from fractions import Fraction
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

import augment
import byol
import color_device
import compile_step
import data
import model as model_lib
import ss_proposals
from lars import LARS, param_groups
from compile_step import COMPILE_HELP, COMPILE_MODES, COMPILE_SCOPES, check_compile_flags  # --compile (issue 7)
from runtime import (all_processes_sum, anchor_sizes, apply_preset, bad_input_exits, check_finite, check_same_data,
                     exit_distributed, in_range, log_line, plot_curves, positive_int, read_checkpoint, refuse_other_run,
                     replicas_identical, save_atomic, setup_distributed, trim_log)

# One source of defaults. PAPER applies when --data is given; CPU when the embedded dataset is used.
# DEVIATION (flag --batch-size): the paper gives no batch size; SoCo's 128 per process (1024 on 8 GPUs).
PAPER = dict(anchor_sizes="24,48,96,192", depth=50, epochs=100, batch_size=128, base_lr=0.1, warmup_epochs=10,
             size=224, small_size=112, workers=8, ckpt_every=1000, log_every=50, max_steps=None)
# CPU: the README's main job within ~10 minutes on 2 cores (~30 GFLOP per sample at 96 px: 60 steps of 16 samples).
# DEVIATION (scale): anchors the paper's / 4 (6..48 px), keeping the paper's pre-training : fine-tuning anchor ratio
# (24 : 32) with finetune.py's CPU anchors (COCO's / 4, 8..128 px, for this data's 8-96 px objects).
CPU = dict(anchor_sizes="6,12,24,48", depth=18, epochs=1, batch_size=16, base_lr=0.1, warmup_epochs=0.1, size=96,
           small_size=48, workers=1, ckpt_every=20, log_every=5, max_steps=60)
# What fixes a run's model, data stream and schedule: a checkpoint resumes only a run that agrees on these and on
# SAME_RUN_SCHEDULE. --max-steps and --epochs may change (extend or cut a run; the lr and tau cosines are laid over
# the new total)
RESUME_KEYS = ("mode", "depth", "fpn_norm", "head", "fpn_channels", "anchor_sizes", "num_boxes", "size", "small_size",
               "v3_independent", "v2_ratio", "no_box_jitter", "min_visible", "rpn_views", "ignore_border_anchors",
               "rpn_grad_to_backbone", "rpn_proposals", "base_lr", "warmup_epochs", "weight_decay", "tau_base", "seed")
SAME_RUN_SCHEDULE = ("global_batch", "steps_per_epoch")  # where a step lands in the data stream


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--mode", default="joint", choices=model_lib.MODES,
                   help="4.2: joint / separate; baselines soco, byol")
    p.add_argument("--data", help="image folder tree (ImageNet train layout); default: the embedded synthetic pool")
    p.add_argument("--proposals", help="selective-search proposals file (selective_search.py, 4.1.1)")
    p.add_argument("--max-missing", type=int, default=0,
                   help="images under --data without proposals to skip with a warning (default: refuse to start)")
    p.add_argument("--out", default="runs/pretrain", help="output folder (checkpoint.pth, log.jsonl, pretrained.pth)")
    p.add_argument("--init", help="separate mode (4.2): a soco run's pretrained.pth or checkpoint.pth")
    p.add_argument("--depth", type=int, help="ResNet depth (paper: 50; CPU preset: 18)")
    p.add_argument("--fpn-norm", default="bn", choices=("bn", "gn", "none"), help="FPN norm (SoCo: BN)")
    p.add_argument("--head", default="4conv1fc", choices=("4conv1fc", "2fc"), help="box head g (3.3; SoCo: 4conv1fc)")
    p.add_argument("--fpn-channels", type=positive_int, default=model_lib.FPN_CHANNELS,
                   help="d of the FPN, RPN and head (3: FPN's 256; DEVIATION, the CPU study: 128 for speed)")
    p.add_argument("--epochs", type=positive_int, help="4.2: 100")
    p.add_argument("--batch-size", type=positive_int, help="images per process (SoCo: 128 per GPU)")
    p.add_argument("--base-lr", type=float, help="4.2: 0.1; DEVIATION (SoCo): scaled by global batch / 256")
    p.add_argument("--warmup-epochs", type=float,
                   help="linear warm-up from lr/100; DEVIATION (SoCo: 10; the paper names none: 0)")
    p.add_argument("--weight-decay", type=float, default=1e-5, help="LARS weight decay (SoCo: 1e-5)")
    p.add_argument("--tau-base", type=float, default=0.99, help="3.3: EMA momentum at step 0 (-> 1 by cosine)")
    p.add_argument("--anchor-sizes", help="4.1.3: anchor side per level P2..P5 (24,48,96,192 for 224 px views; "
                                          "DEVIATION, CPU preset: 6,12,24,48, the paper's / 4 like its objects)")
    p.add_argument("--num-boxes", type=positive_int, default=4, help="3.4: K boxes per image")
    p.add_argument("--size", type=positive_int, help="4.1.2: V1/V2 side (224)")
    p.add_argument("--small-size", type=positive_int, help="4.1.2: V3 side (112)")
    p.add_argument("--v3-independent", action="store_true",
                   help="DEVIATION (SoCo): V3 an independent 112 crop instead of V2 downsampled (4.1.2); V2 stays\n"
                        "the paper's crop of V1 (SoCo crops it from the image)")
    p.add_argument("--v2-ratio", type=v2_ratio, default="3/4,4/3", help="4.1.2: V2's crop aspect range, log-uniform "
                   "(also V3's\nwith --v3-independent). DEVIATION (SoCo): the paper names only the scale; 1,1: square")
    p.add_argument("--no-box-jitter", action="store_true", help="turn off SoCo's jitter of V1's L_det boxes (p 0.5, "
                   "+-10%% of the\nside, augment.jitter_boxes). DEVIATION (SoCo): on by default; 4.1.2 names none")
    p.add_argument("--min-visible", type=in_range(0.0, 1.0, float), default=augment.MIN_VISIBLE,
                   help="a box is drawn only if each view shows this share of it (reference.md: 'visible in all\n"
                        "views'). DEVIATION: SoCo takes any overlap (~0); 0.5 keeps the views on the same region")
    p.add_argument("--rpn-views", default="1,2,3",
                   help="views whose features Eq. 1 trains on, averaged (3: 'these views are ... fed to the RPN').\n"
                        "DEVIATION (interpretation): the paper names neither the views nor how they combine")
    p.add_argument("--ignore-border-anchors", action="store_true",
                   help="Eq. 1 ignores anchors crossing the view's border, as [19] trained. DEVIATION\n"
                        "(interpretation): by default they are labelled like the others (torchvision, detectron2)")
    p.add_argument("--rpn-grad-to-backbone", action="store_true", help="Table 4: let L_RPN reach the backbone")
    p.add_argument("--rpn-proposals", action="store_true", help="Table 4: SS + RPN proposals for the head")
    p.add_argument("--export-online", action="store_true",
                   help="DEVIATION (SoCo): export the online branch instead of the target branch (3)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format on CUDA")
    p.add_argument("--color-on", default="loader", choices=augment.COLOR_ON,
                   help="4.1.2's colour jitter, grayscale, blur, solarize: in the loader workers (OpenCV, uint8) or "
                        "on the device on each batch (color_device.py: the same parameters; pixels < 0.5 level apart "
                        "on average, up to ~12 after a hue shift; ~1/3 less CPU per sample in the workers, "
                        "bench/RESULTS.md 4e)")
    p.add_argument("--compile", nargs="?", const="extractors", choices=COMPILE_SCOPES, help=COMPILE_HELP)
    p.add_argument("--compile-mode", choices=COMPILE_MODES,
                   help="torch.compile's mode, with --compile (default: torch's). reduce-overhead (and max-autotune)\n"
                        "replay the step as CUDA graphs, with --compile model only (GPUs: no kernel launches from\n"
                        "the host; not yet measured)")
    p.add_argument("--workers", type=int, help="data-loader workers per process")
    p.add_argument("--ckpt-every", type=positive_int, help="steps between checkpoints")
    p.add_argument("--log-every", type=positive_int, help="steps between log lines (the only host-device syncs)")
    p.add_argument("--max-steps", type=in_range(0), help="stop after this many steps (CPU preset: 60; 0 = no cap)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    check_compile_flags(p, a)
    return a


def resolve_args(args: argparse.Namespace) -> tuple[argparse.Namespace, str]:
    """Fill unset flags from the preset (PAPER with --data, CPU without); returns the args and the preset name."""
    name, preset = ("paper", PAPER) if args.data else ("cpu", CPU)
    apply_preset(args, preset)
    return args, name


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up from peak/100 over `warmup` steps, then cosine to 0 at `total`."""
    if step < warmup:
        return peak * (0.01 + 0.99 * step / warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def rpn_views(spec: str) -> tuple:
    """--rpn-views '1,2,3' -> (1, 2, 3): distinct views among 1 (V1), 2 (V2), 3 (V3)."""
    try:
        views = tuple(int(v) for v in str(spec).split(","))
    except ValueError:
        views = ()
    if not views or not set(views) <= {1, 2, 3} or len(set(views)) != len(views):
        raise SystemExit(f"--rpn-views {spec!r}: expected distinct views among 1, 2, 3, e.g. 1,2,3 or 1")
    return views


def v2_ratio(spec: str) -> tuple[float, float]:
    """argparse type of --v2-ratio: '3/4,4/3' -> (0.75, 1.333...), V2's crop aspect range (fractions or decimals)."""
    try:
        lo, hi = (float(Fraction(v)) for v in spec.split(","))
    except (ValueError, ZeroDivisionError):
        lo = hi = 0.0
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 < LO <= HI, e.g. 3/4,4/3 or 1,1; got {spec!r}")
    return lo, hi


def build_data(args):
    """The dataset: --data/--proposals, or the embedded pool with its cached selective search."""
    if args.data:
        if not args.proposals:
            raise SystemExit(f"--data {args.data} needs --proposals: run `python selective_search.py {args.data} "
                             "proposals.npz` first (section 4.1.1)")
        root, proposals = Path(args.data), Path(args.proposals)
    else:
        root, proposals = data.embedded_pool()
    try:
        missing = [p for p in ss_proposals.proposal_files(proposals) if not p.exists()]
    except FileNotFoundError:  # a glob that matches nothing
        missing = [proposals]
    if missing:
        raise SystemExit(f"{missing[0]}: proposals file not found (a glob such as 'ss.shard*of4.npz' takes the shards "
                         "of selective_search.py --shard i/n)")
    with bad_input_exits():  # a foreign proposals file, no readable image...: one line naming it
        return data.PretrainDataset(root, proposals, K=args.num_boxes, seed=args.seed, size=args.size,
                                    small_size=args.small_size, color_on=args.color_on, min_visible=args.min_visible,
                                    max_missing=args.max_missing, jitter=not args.no_box_jitter, ratio=args.v2_ratio,
                                    v3_mode="independent" if args.v3_independent else "downsample")


def build_model(args, device) -> model_lib.ADePT:
    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts them)
    net = model_lib.ADePT(args.mode, args.depth, args.fpn_norm, args.head, args.rpn_grad_to_backbone,
                          args.rpn_proposals, args.num_boxes, args.fpn_channels, anchor_sizes(args.anchor_sizes, 4),
                          rpn_views=rpn_views(args.rpn_views), ignore_border_anchors=args.ignore_border_anchors)
    if args.mode == "separate":
        if not args.init:
            raise SystemExit("--mode separate needs --init PATH: the pretrained.pth of a --mode soco run (4.2)")
        load_init(net, args.init)
    net = model_lib.maybe_sync_bn(net, device).to(device)
    if args.channels_last and device.type == "cuda":
        net = net.to(memory_format=torch.channels_last)
    if args.compile:  # after SyncBN conversion and .to(device), before DDP wraps the model (train_loop)
        compile_fn = compile_step.compile_model if args.compile == "model" else compile_step.compile_extractors
        compile_fn(net, mode=args.compile_mode)
    return net


def load_init(net: model_lib.ADePT, path: str) -> None:
    """Separate mode: the extractor and head of both branches from a soco run (weights_only: no code runs)."""
    try:
        state = model_lib.load_weights(path, "soco run's pretrained.pth or checkpoint.pth")
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if "model" in state:  # a checkpoint.pth: its target branch, the one pretrained.pth exports (3)
        enc = {k.removeprefix("target."): v for k, v in state["model"].items() if k.startswith("target.")}
    else:
        state = state.get("state_dict", state)
        enc = {("extractor." + k if k.startswith(("backbone.", "fpn.")) else k): v for k, v in state.items()
               if not k.startswith("rpn.")}
    for branch in (net.online, net.target):
        try:
            missing, unexpected = branch.load_state_dict(enc, strict=False)
        except RuntimeError as e:  # shapes: another depth, --fpn-channels or head
            raise SystemExit(f"{path}: does not match the model built from the flags: {str(e)[:300]}") from None
        missing = [k for k in missing if not k.startswith("projector.")]
        if missing or unexpected:
            raise SystemExit(f"{path}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def color_fn(args):
    """--color-on device: the function that colours a batch of views on the device, color_device.color_batch, or
    with --compile that function torch.compile'd (its ~130 elementwise passes fuse into fewer kernels; 1.5-1.7x on
    one CPU core, bench/RESULTS.md 4e). None with --color-on loader: the views arrive coloured."""
    if args.color_on != "device":
        return None
    return torch.compile(color_device.color_batch, dynamic=False) if args.compile else color_device.color_batch


def save_checkpoint(path: Path, net, opt, step: int, args, schedule: dict) -> None:
    """What auto-resume needs (weights of both branches, LARS state, step) and what check_same_run compares (the
    args, the schedule: global batch, steps per epoch, total steps), atomically."""
    save_atomic({"model": net.state_dict(), "optimizer": opt.state_dict(), "step": step, "args": vars(args),
                 "schedule": schedule}, path)


def check_same_run(path: Path, ck: dict, args, schedule: dict) -> None:
    """Refuse to resume a checkpoint of another run: the step would land elsewhere in the data, lr and tau schedules
    (another global batch or dataset size) or continue another experiment (RESUME_KEYS). The world size may change
    when the global batch does not: a DistributedSampler then hands out the same indices in the same order."""
    refuse_other_run(path, {**ck.get("args", {}), **ck.get("schedule", {})}, {**vars(args), **schedule},
                     (*RESUME_KEYS, *SAME_RUN_SCHEDULE))


def load_checkpoint(path: Path, net, opt, args=None, schedule: dict | None = None) -> int:
    """Auto-resume: check it is the same run (if args are given), restore weights and optimizer state; returns the
    step."""
    ck = read_checkpoint(path, ("model", "optimizer", "step"), "train.py checkpoint")
    if args is not None:
        check_same_run(path, ck, args, schedule or {})
    net.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    return ck["step"]


def main(argv=None) -> None:
    args, preset = resolve_args(parse_args(argv))
    rank, world, device = setup_distributed()
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    log(f"preset: {preset} ({'--data given' if args.data else 'embedded synthetic data'}); flags override it")
    log(json.dumps({**vars(args), "world_size": world, "device": str(device)}))
    if args.color_on == "device" and device.type == "cpu":
        log("note: --color-on device on a CPU runs the colour in this process with torch, 12-23x the loader's "
            "OpenCV CPU time (bench/RESULTS.md 4e); it pays off on a GPU")
    net = build_model(args, device)  # first: a bad --init fails before a long listing of --data
    dataset = build_data(args) if rank == 0 else None
    if world > 1:  # rank 0 generates data/proposals once; the others wait, then open them
        dist.barrier()
        dataset = dataset or build_data(args)
        check_same_data(dataset, world)
    step = train_loop(args, dataset, net, rank, world, device, log)
    if world > 1:
        same = replicas_identical(net, world)
        log(f"weights identical on {world} processes: {same}")
        if not same:
            raise RuntimeError("DDP replicas diverged: the weights differ between processes")
    if rank == 0:
        out = Path(args.out)
        meta = {"mode": args.mode, "depth": args.depth, "fpn_norm": args.fpn_norm, "head": args.head,
                "fpn_channels": args.fpn_channels, "anchor_sizes": list(anchor_sizes(args.anchor_sizes)),
                "branch": "online" if args.export_online else "target", "steps": step, "args": vars(args)}
        save_atomic({"state_dict": model_lib.export_pretrained(net, args.export_online), "meta": meta},
                    out / "pretrained.pth")
        plot_curves(out / "log.jsonl", log)
        log(f"done: {step} steps; checkpoint {out / 'checkpoint.pth'}; "
            f"weights for fine-tuning {out / 'pretrained.pth'}")


def train_step(ddp, net, opt, batch: dict, args, device, tau: float, color=None) -> dict:
    """One optimisation step of Eq. 8 (or its baseline's loss): the views' colour if `color` (color_fn), forward under
    bf16 autocast on CUDA if --amp, backward, LARS, then the target's EMA xi <- tau xi + (1 - tau) theta (3.3). No
    host sync. Returns the losses."""
    views, boxes, transforms, rpn_boxes = data.to_device(batch, device, args.channels_last, color)
    with torch.autocast(device.type, torch.bfloat16, enabled=args.amp and device.type == "cuda"):
        losses = ddp(views, boxes, transforms, rpn_boxes)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    opt.step()
    if args.mode != "separate":
        byol.ema_update(net.online, net.target, tau)
    return losses


def log_step(path: Path | None, bar, losses: dict, step: int, epoch: int, **fields) -> None:
    """One log.jsonl line (path None: not rank 0) and the progress bar: step, epoch, the losses (read from the device
    here: the .item() calls are the run's only host syncs, every --log-every steps), then fields."""
    log_line(path, bar, {"step": step, "epoch": epoch, **{k: round(v.item(), 5) for k, v in losses.items()}, **fields})


def train_loop(args, dataset, net, rank: int, world: int, device, log) -> int:
    """Steps until the end (or --max-steps); checkpoints and logs on rank 0. Returns the last step."""
    out = Path(args.out)
    opt = LARS(param_groups(net), lr=0.0, weight_decay=args.weight_decay)
    sampler = data.SkipSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    steps_per_epoch = len(sampler) // args.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"{len(dataset)} images are fewer than one batch of {args.batch_size} x {world} processes")
    total = min(args.epochs * steps_per_epoch, args.max_steps or math.inf)
    schedule = {"global_batch": args.batch_size * world, "steps_per_epoch": steps_per_epoch, "total_steps": total}
    step = 0
    if (out / "checkpoint.pth").exists():
        step = load_checkpoint(out / "checkpoint.pth", net, opt, args, schedule)
        if rank == 0:
            trim_log(out / "log.jsonl", step)
        log(f"resumed from {out / 'checkpoint.pth'} at step {step}")
    out.mkdir(parents=True, exist_ok=True)
    # find_unused_parameters: with the CPU's grouped RoI pooling (roi_head.multilevel_roi_align), a batch whose boxes
    # all fall on some FPN levels leaves those levels' output convs without gradient (the RPN trains on detached
    # features by default); byol mode never uses the FPN.
    net.train()  # separate mode: the frozen extractor's BN stays in eval (ADePT.train)
    ddp = torch.nn.parallel.DistributedDataParallel(net, find_unused_parameters=True) if world > 1 else net
    peak_lr, warmup = args.base_lr * args.batch_size * world / 256, int(args.warmup_epochs * steps_per_epoch)
    bar = tqdm(total=total, initial=step, disable=rank != 0, dynamic_ncols=True)
    t0, seen, last_good = time.perf_counter(), 0, step
    bad = torch.zeros((), dtype=torch.bool, device=device)  # non-finite flag, read only when logging (no sync)
    counts = torch.zeros(2, dtype=torch.int64)  # CPU: images replaced (unreadable), samples with no visible box
    # One loader for the whole run: its workers persist across epochs (a fresh loader per epoch restarted them,
    # which cost a batch's latency every epoch); EpochSampler hands each index to them with its epoch.
    epochs = data.EpochSampler(sampler)
    loader = data.make_loader(dataset, epochs, args.batch_size, args.workers, device)
    color = color_fn(args)  # None: coloured in the loader
    while step < total:
        epoch = step // steps_per_epoch
        epochs.set_epoch(epoch)  # also the DistributedSampler's shuffle; each item carries it, in or out of process
        sampler.skip = (step % steps_per_epoch) * args.batch_size  # mid-epoch resume: read when the epoch starts
        for batch in loader:
            lr, tau = lr_at(step, total, warmup, peak_lr), byol.tau_schedule(step, total, args.tau_base)
            for g in opt.param_groups:
                g["lr"] = lr
            torch.manual_seed(args.seed * 1_000_003 + step * 101 + rank)  # anchor sampling: resume-exact
            losses = train_step(ddp, net, opt, batch, args, device, tau, color)
            bad |= ~torch.isfinite(losses["loss"].detach())
            counts += torch.stack([batch["replaced"].sum(), batch["fallback"].sum()])
            step, seen = step + 1, seen + args.batch_size * world
            bar.update(1)
            last = step == total
            log_now, save_now = last or step % args.log_every == 0, last or step % args.ckpt_every == 0
            if log_now or save_now:  # one sync: the loss flag of every process, and the weights before a checkpoint
                check_finite(bad, step, last_good, out, world,
                             [t for t in net.state_dict().values() if t.is_floating_point()] if save_now else None)
            if log_now:
                replaced, fallback = all_processes_sum(counts, device, world)
                log_step(out / "log.jsonl" if rank == 0 else None, bar, losses, step=step, epoch=epoch, lr=lr,
                         tau=tau, images_per_s=round(seen / (time.perf_counter() - t0), 2), replaced=replaced,
                         fallback=fallback)
            if save_now:
                if rank == 0:
                    save_checkpoint(out / "checkpoint.pth", net, opt, step, args, schedule)
                last_good = step
            if step >= total:
                break
    bar.close()
    return step


if __name__ == "__main__":
    main()
    exit_distributed()
