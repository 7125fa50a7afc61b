"""Benchmark: the ADePT pre-training step against the bare convnet work it contains (issue 7, items 1 and 5).

Paper sections 3.3-3.5 (Eq. 8): one joint step = ADePT forward on the three views (online f on V1..V3, RPN Eq. 1 on
detached features, RoIAlign + g + p + q on K boxes per view, target f, g, p on V1..V3 under no_grad, Eq. 7) +
backward + lars.LARS step + byol.ema_update. The "bare" step is the convnet work inside it: FeatureExtractor
forward + backward of the online views and forward of the target views under no_grad, nothing else. ratio = joint
step time / bare step time (= bare images/s / joint images/s); the goal is <= 1.25.

Symbols
    B          images per step (--batch-size, several values allowed: 64,128)
    S, s       V1/V2 side (--size, 224) and V3 side (--small-size, default S/2 = 112)
    K          boxes per image (4)
    GFLOP/img  torch.utils.flop_counter.FlopCounterMode total of one step (forward + backward; 2 FLOP per
               multiply-add; convolutions and matmuls only, the ops that dominate), divided by B
    MFU        GFLOP/img x images/s / --peak-tflops (CUDA; default 790 = H100 bf16 dense as measured, reference.md)

Timing: --warmup steps, then --rounds rounds; each round times --steps/--rounds joint steps, then as many bare
steps (interleaved, so that load from other processes hits both alike); the median round is reported. CUDA is
synchronised only around timed regions. Peak memory: torch.cuda.max_memory_allocated per mode (CUDA), peak RSS of
the process so far (CPU, resource.getrusage).

--compare-compile [extractors,model] (issue 7, --compile of train.py): models from the same seed, one eager and one
per scope (compile_step.compile_extractors: f alone; compile_step.compile_model: the whole forward), timed
interleaved in one run.
Reported per model: the first step alone (compile_s = it minus the eager first step: Dynamo + Inductor for every
graph, forward and backward; a second, untimed step follows, in which CUDA graphs are recorded), the graphs Dynamo
compiled in them, |loss difference| to eager on that step (same
weights, batch and anchor-sampling seed; Inductor draws its own random numbers, so with the model compiled the
RPN's anchor sample differs), then the median step (and the bare step where the scope compiles f alone, unless
--no-bare).

Also reported: the LARS step (lars.LARS, torch._foreach_* ops) and the EMA update timed alone, and `LoopLARS`, the
same update as a per-parameter loop (what lars.LARS was before the H100 run), checked against lars.LARS.

    python bench/pretrain_step.py                                  # CPU defaults: ResNet-18, 224/112, batch 4
    python bench/pretrain_step.py --device cuda --batch-size 64,128 --amp --channels-last   # ResNet-50 on a GPU
    python bench/pretrain_step.py --threads 1 --size 128 --batch-size 8 --compare-compile extractors,model

Public: LoopLARS, make_batch, joint_step, bare_step, count_flops, compare_compile, main(argv).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import resource
import sys
import time
import warnings

import torch

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
import report  # noqa: E402

sys.path.insert(0, str(report.repo_root()))
import byol  # noqa: E402
import compile_step  # noqa: E402
import data  # noqa: E402
import lars  # noqa: E402
import model as model_lib  # noqa: E402
import train  # noqa: E402

H100_BF16_TFLOPS = 790.0  # reference.md: dense bf16 matmul measured on one H100


class LoopLARS(lars.LARS):
    """lars.LARS as a per-parameter Python loop: the reference that lars.LARS's torch._foreach_* step replaced
    (adopted after the H100 run: 5.8 ms against 22.4 ms per step at ResNet-50, batch 128). Same update."""

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if g["lars"]:
                    d = d.add(p, alpha=g["weight_decay"])
                    p_norm, d_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(d)
                    trust = g["trust_coefficient"] * p_norm / (d_norm + g["eps"])
                    d = d * torch.where((p_norm > 0) & (d_norm > 0), trust, torch.ones_like(trust))
                if "momentum_buffer" not in self.state[p]:  # once (the H100 timing built one every step)
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = self.state[p]["momentum_buffer"]
                buf.mul_(g["momentum"]).add_(d)
                p.add_(buf, alpha=-g["lr"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--depth", type=int, help="ResNet depth (default: 50 on CUDA, 18 on CPU)")
    p.add_argument("--mode", default="joint", choices=("joint", "soco"), help="ADePT mode of the full step")
    p.add_argument("--batch-size", default=None, help="comma list (default: 64,128 on CUDA, 8 on CPU)")
    p.add_argument("--size", type=int, default=224, help="V1/V2 side (4.1.2: 224)")
    p.add_argument("--small-size", type=int, help="V3 side (default size // 2)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast (CUDA)")
    p.add_argument("--channels-last", action="store_true", help="channels_last model and inputs")
    p.add_argument("--compile", nargs="?", const="extractors", choices=train.COMPILE_SCOPES,
                   help="as train.py --compile: the two feature extractors (plain --compile) or the whole model")
    p.add_argument("--compile-mode", choices=train.COMPILE_MODES, help="as train.py --compile-mode")
    p.add_argument("--compare-compile", nargs="?", const="extractors",
                   help="comma list of SCOPE[:MODE] (scopes extractors, model; modes as --compile-mode; plain flag:\n"
                        "extractors), e.g. model,model:reduce-overhead: eager and each in one run, interleaved\n"
                        "(one model each); replaces the joint/bare table")
    p.add_argument("--dynamic", default="false", choices=("false", "auto"),
                   help="torch.compile dynamic=: false (train.py's: one static graph per view size and grad mode)\n"
                        "or auto (None: the V3 size recompiles once with symbolic sizes)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per mode, split into --rounds rounds")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode first (CPU: the first 2 steps are\n"
                   "several times slower: oneDNN primitives, first touch of gradients and momentum buffers)")
    p.add_argument("--peak-tflops", type=float, help=f"for MFU (default {H100_BF16_TFLOPS:g} on CUDA, none on CPU)")
    p.add_argument("--count-syncs", action="store_true", help="CUDA: count host syncs in one joint step")
    p.add_argument("--no-bare", action="store_true", help="skip the bare convnet timing")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's). On a shared machine use 1: with\n"
                   "2 threads on 2 busy cores one step varied 1.4-13 s, with 1 thread 2.3-2.9 s")
    a = p.parse_args(argv)
    cuda = a.device.startswith("cuda")
    a.depth = a.depth or (50 if cuda else 18)
    a.batch_size = [int(b) for b in (a.batch_size or ("64,128" if cuda else "4")).split(",")]
    a.small_size = a.small_size or a.size // 2
    a.peak_tflops = a.peak_tflops or (H100_BF16_TFLOPS if cuda else None)
    a.dynamic = None if a.dynamic == "auto" else False
    a.compare_compile = a.compare_compile.split(",") if a.compare_compile else []
    if a.compile_mode and not a.compile:
        p.error("--compile-mode needs --compile (--compare-compile takes SCOPE:MODE items)")
    for item in a.compare_compile:
        scope, _, mode = item.partition(":")
        if scope not in train.COMPILE_SCOPES or (mode and mode not in train.COMPILE_MODES):
            p.error(f"--compare-compile {item}: expected SCOPE[:MODE], scopes {', '.join(train.COMPILE_SCOPES)}, "
                    f"modes {', '.join(train.COMPILE_MODES)}")
    return a


def _paper_like_boxes(B: int, K: int, side: int, zoom: torch.Tensor, g) -> torch.Tensor:
    """(B, K, 4) xyxy boxes as the 4.1.1 filter leaves them: sqrt(wh) = U(0.3, 0.8) x side x zoom, w/h log-uniform
    in [1/3, 3], clipped to the view."""
    scale = side * (0.3 + 0.5 * torch.rand(B, K, generator=g)) * zoom  # sqrt(wh)
    ratio = torch.exp((torch.rand(B, K, generator=g) * 2 - 1) * torch.log(torch.tensor(3.0)))  # w / h
    wh = torch.stack([scale * ratio.sqrt(), scale / ratio.sqrt()], dim=-1).clamp(max=side)  # (B, K, 2)
    xy = (side - wh) * torch.rand(B, K, 2, generator=g)
    return torch.cat([xy, xy + wh], dim=-1)


def make_batch(B: int, size: int, small: int, K: int, device, channels_last: bool, seed: int = 0):
    """Random uint8 views normalised on the device (as data.to_device) and K boxes per view sized like real ones.

    Returns views [V1 (B,3,S,S), V2 (B,3,S,S), V3 (B,3,s,s)] float and boxes 3 x (B,K,4) xyxy view pixels. Box
    sizes follow 4.1.1/4.1.2: V1 is the whole image resized, so sqrt(wh) = 0.3-0.8 S; V2 is a crop of area
    scale 0.5-1 resized to S, so its boxes are zoomed 1-1.41x; V3 = V2 downsampled (boxes halved). The sizes
    matter: they decide the FPN level of each box (3.4) and so which levels receive gradient.
    """
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    views = []
    for side in (size, size, small):
        u8 = torch.randint(0, 256, (B, 3, side, side), dtype=torch.uint8, generator=g)
        views.append(data.normalize(u8.to(device)).contiguous(memory_format=fmt))
    b1 = _paper_like_boxes(B, K, size, torch.ones(B, 1), g)
    b2 = _paper_like_boxes(B, K, size, 1 + (2 ** 0.5 - 1) * torch.rand(B, 1, generator=g), g)
    b3 = b2 * (small / size)
    return views, [b.to(device) for b in (b1, b2, b3)]


def _autocast(args):
    return torch.autocast("cuda", torch.bfloat16) if args.amp and args.device.startswith("cuda") \
        else contextlib.nullcontext()


def joint_step(net, opt, views, boxes, args, tau: float = 0.99):
    """One pre-training step as train.train_loop does it (without data loading and logging)."""
    with _autocast(args):
        losses = net(views, boxes)
    opt.zero_grad(set_to_none=True)
    losses["loss"].backward()
    opt.step()
    byol.ema_update(net.online, net.target, tau)
    return losses["loss"]


def bare_step(net, views, args):
    """Convnet work only: online f forward + backward on V1..V3, target f forward on V1..V3 under no_grad."""
    online, target = net.online.extractor, net.target.extractor
    with _autocast(args):
        feats = [online(v) for v in views]  # 3 x [P2..P5]
        loss = sum(f.float().mean() for fs in feats for f in fs)
        with torch.no_grad():
            for v in views:
                target(v)
    online.zero_grad(set_to_none=True)
    loss.backward()
    return loss


def count_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def time_call(fn, n: int, device) -> float:
    """Seconds per call of fn, after one untimed call."""
    fn()
    report.sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    report.sync(device)
    return (time.perf_counter() - t0) / n


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def count_syncs(fn) -> int:
    """CUDA: number of synchronising calls in fn (torch.cuda.set_sync_debug_mode warnings)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fn()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def build(args, device, scope: str | None = None):
    """ADePT from seed 0 and its LARS, compiled as train.py --compile SCOPE --compile-mode MODE does: scope "" =
    eager, "extractors" (compile_step.compile_extractors), "model" (compile_step.compile_model), optionally ":MODE";
    None = --compile's and --compile-mode's."""
    torch.manual_seed(0)
    net = model_lib.ADePT(args.mode, args.depth).to(device)
    if args.channels_last:
        net = net.to(memory_format=torch.channels_last)
    scope, _, mode = (args.compile or "", None, args.compile_mode) if scope is None else scope.partition(":")
    if scope:
        compile_fn = compile_step.compile_model if scope == "model" else compile_step.compile_extractors
        compile_fn(net, args.dynamic, mode or None)
    opt = lars.LARS(lars.param_groups(net), lr=0.1 / 100, weight_decay=1e-5)  # warm-up start lr (4.2)
    return net.train(), opt


def optimizer_costs(net, opt, device) -> dict:
    """LARS step (foreach), LoopLARS step and EMA update timed alone on the current gradients; the two checked."""
    state = copy.deepcopy(opt.state_dict())
    params = [p for g in opt.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    out = {"lars_ms": 1e3 * time_call(opt.step, 3, device)}
    fopt = LoopLARS(lars.param_groups(net), lr=opt.param_groups[0]["lr"], weight_decay=1e-5)
    out["lars_loop_ms"] = 1e3 * time_call(fopt.step, 3, device)
    # equality check: one step of each from the same weights and momentum state
    for p, b in zip(params, before):
        p.data.copy_(b)
    opt.load_state_dict(copy.deepcopy(state))  # load_state_dict keeps the tensors: never share momentum buffers
    opt.step()
    after_ref = [p.detach().clone() for p in params]
    for p, b in zip(params, before):
        p.data.copy_(b)
    fopt.load_state_dict(copy.deepcopy(state))
    fopt.step()
    out["loop_max_diff"] = max(float((p.detach() - r).abs().max()) for p, r in zip(params, after_ref))
    out["ema_ms"] = 1e3 * time_call(lambda: byol.ema_update(net.online, net.target, 0.99), 3, device)
    return out


def run_batch(args, net, opt, B: int, device) -> dict:
    views, boxes = make_batch(B, args.size, args.small_size, net.num_boxes, device, args.channels_last)
    fns = {"joint": lambda: joint_step(net, opt, views, boxes, args)}
    if not args.no_bare:  # with --compile model the bare step stays eager (it calls the extractors directly)
        fns["bare"] = lambda: bare_step(net, views, args)
    flops = {k: count_flops(fn) / B for k, fn in fns.items()}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t = report.time_rounds(fns, args.steps, args.rounds, args.warmup, device)
    row = {"batch": B, "joint_img_s": B / t["joint"], "joint_step_ms": 1e3 * t["joint"],
           "GFLOP_img": flops["joint"] / 1e9, "peak_mem_GiB": peak_memory_gib(device)}
    if "bare" in t:
        row.update(bare_img_s=B / t["bare"], ratio=t["joint"] / t["bare"], bare_GFLOP_img=flops["bare"] / 1e9)
    row["TFLOP_s"] = flops["joint"] * B / t["joint"] / 1e12
    if args.peak_tflops:
        row["MFU_pct"] = 100 * row["TFLOP_s"] / args.peak_tflops
    if args.count_syncs and device.type == "cuda":
        row["syncs_step"] = count_syncs(fns["joint"])
    row.update(optimizer_costs(net, opt, device))
    return row


def _dynamo_graphs() -> int:
    """Graphs Dynamo has compiled in this process so far (forward graphs; their backward is compiled with them)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compare_compile(args, B: int, device) -> list[dict]:
    """Eager vs each --compare-compile scope on the same batch: the first step of each alone (compilation, graphs,
    loss), then interleaved median steps. One row per model; bare steps where the scope compiles f alone."""
    names = ["eager"] + args.compare_compile
    runs = {name: build(args, device, scope=name if name != "eager" else "") for name in names}
    views, boxes = make_batch(B, args.size, args.small_size, runs["eager"][0].num_boxes, device, args.channels_last)
    rows = {name: {"batch": B, "compiled": name, "dynamic": "auto" if args.dynamic is None else "false"}
            for name in names}
    for name, (net, opt) in list(runs.items()):
        graphs0 = _dynamo_graphs()
        torch.manual_seed(1)  # the RPN's anchor sampling: the same draw for every model
        report.sync(device)
        t0 = time.perf_counter()
        try:
            loss = float(joint_step(net, opt, views, boxes, args).detach())
            report.sync(device)
            first_s = time.perf_counter() - t0
            joint_step(net, opt, views, boxes, args)  # untimed: CUDA graphs (reduce-overhead) record on call 2
            report.sync(device)
        except Exception as e:  # a mode this machine cannot run: reported, the other models are still timed
            if name == "eager":
                raise
            print(f"  first step {name}: FAILED, {type(e).__name__}: {str(e)[:300]}", flush=True)
            del runs[name], rows[name], net, opt
            continue
        rows[name].update(first_s=first_s, loss=loss, graphs=_dynamo_graphs() - graphs0)
        print(f"  first step {name}: {rows[name]['first_s']:.1f} s, loss {loss:.6f}", flush=True)
    fns = {name: (lambda n=net, o=opt: joint_step(n, o, views, boxes, args)) for name, (net, opt) in runs.items()}
    bare = [name for name in runs if name in ("eager", "extractors")] if not args.no_bare else []
    fns.update({f"bare_{name}": (lambda n=runs[name][0]: bare_step(n, views, args)) for name in bare})
    per_round: dict = {}
    graphs0 = _dynamo_graphs()
    t = report.time_rounds(fns, args.steps, args.rounds, args.warmup, device, per_round)
    graphs_in_rounds = _dynamo_graphs() - graphs0  # recompiles after the first step, all models (0 expected)
    print("  s per step in each round: " + "; ".join(f"{k} " + " ".join(f"{v:.2f}" for v in ts)
                                                     for k, ts in per_round.items()), flush=True)
    for name, row in rows.items():
        row.update(img_s=B / t[name], step_ms=1e3 * t[name], speedup=t["eager"] / t[name],
                   graphs_in_rounds=graphs_in_rounds, compile_s=row["first_s"] - rows["eager"]["first_s"],
                   loss_abs_diff=abs(row["loss"] - rows["eager"]["loss"]))
        if name in bare:
            row.update(bare_ms=1e3 * t[f"bare_{name}"], bare_speedup=t["bare_eager"] / t[f"bare_{name}"])
    rows["eager"]["peak_mem_GiB"] = peak_memory_gib(device)  # the process so far, all models (CPU: RSS)
    return list(rows.values())


COMPARE_COLUMNS = ["batch", "compiled", "dynamic", "img_s", "speedup", "step_ms", "bare_ms", "bare_speedup", "first_s",
                   "compile_s", "loss_abs_diff", "graphs", "graphs_in_rounds", "peak_mem_GiB"]
COLUMNS = ["batch", "joint_img_s", "bare_img_s", "ratio", "joint_step_ms", "GFLOP_img", "bare_GFLOP_img", "TFLOP_s",
           "MFU_pct", "peak_mem_GiB", "lars_ms", "lars_loop_ms", "loop_max_diff", "ema_ms", "syncs_step"]


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(report.header("pre-training step: full joint step vs bare convnet (bench/pretrain_step.py)", device))
    print(f"settings: mode {args.mode}, ResNet-{args.depth}, views {args.size}/{args.size}/{args.small_size}, K=4, "
          f"amp(bf16)={args.amp and device.type == 'cuda'}, channels_last={args.channels_last}, "
          f"compile={'eager vs ' + ', '.join(args.compare_compile) if args.compare_compile else args.compile}"
          f"{' mode ' + args.compile_mode if args.compile_mode and not args.compare_compile else ''}, "
          f"dynamic={args.dynamic}{' (bare step eager)' if args.compile == 'model' else ''}, "
          f"steps {args.steps} in {args.rounds} rounds after {args.warmup} warm-up; "
          f"peak memory = {'max_memory_allocated per batch size' if device.type == 'cuda' else 'peak RSS so far'}",
          flush=True)
    if args.compare_compile:
        rows = []
        for B in args.batch_size:
            batch_rows = compare_compile(args, B, device)
            rows += batch_rows
            print(f"  batch {B}: speedup " + ", ".join(f"{r['compiled']} {r['speedup']:.3f}" for r in batch_rows)
                  + f"; load {report.load_average()}", flush=True)
        print()
        print(report.table(rows, [c for c in COMPARE_COLUMNS if any(c in r for r in rows)]))
        print(f"\nload average at end: {report.load_average()}")
        return rows
    net, opt = build(args, device)
    rows = []
    for B in args.batch_size:
        rows.append(run_batch(args, net, opt, B, device))
        print(f"  batch {B}: {rows[-1]['joint_img_s']:.2f} img/s joint, load {report.load_average()}", flush=True)
    print()
    print(report.table(rows, [c for c in COLUMNS if any(c in r for r in rows)]))
    print(f"\nload average at end: {report.load_average()}; goal: ratio <= 1.25"
          + ("; >= 1000 img/s on one H100 (issue 7)" if device.type == "cuda" else ""))
    return rows


if __name__ == "__main__":
    main()
