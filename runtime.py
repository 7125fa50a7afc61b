"""What a torchrun training script needs besides its model (train.py, finetune.py): the process group from torchrun's
environment, checks across processes, checkpoint writes that a crash or power loss cannot corrupt, log.jsonl lines,
and what both command lines share (presets, --anchor-sizes).

Public
    setup_distributed() -> (rank, world, device)     from RANK / WORLD_SIZE / LOCAL_RANK; one process when RANK is unset
    exit_distributed()                                destroy the group and exit without the interpreter's teardown
    replicas_identical(net, world) -> bool            every process holds the same parameters (DDP's contract)
    check_same_data(dataset, world)                   every process lists the same images (RuntimeError if not)
    all_processes_sum(counts, device, world) -> list  integer counts summed over the processes
    check_finite(bad, step, last_good, out, world, tensors)   stop every process on a non-finite loss or weight
    write_atomic(path, write)                         write(f) to a temp file, fsync, rename, fsync the folder
    save_atomic(obj, path)                            torch.save through write_atomic
    read_checkpoint(path, keys, what) -> dict         torch.load(weights_only) with errors naming the file
    refuse_other_run(path, saved, now, keys)          SystemExit naming the keys whose values differ (auto-resume)
    trim_log(path, step)                              drop log.jsonl lines after a resumed step, atomically
    log_line(path, bar, rec)                          append rec to log.jsonl (path None: not rank 0), show it on bar
    plot_curves(log_path, log)                        curves.png beside log.jsonl at the end of a run (figures.py)
    apply_preset(args, preset)                        fill the flags left unset (None) from a PAPER / CPU preset
    anchor_sizes(spec, levels) -> tuple               --anchor-sizes '24,48,96,192' -> (24, 48, 96, 192)
    in_range(lo, hi, kind), positive_int               argparse types: a number in [lo, hi]; an integer >= 1
    bad_input_exits()                                 context: a bad input file ends the run with one line
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def setup_distributed() -> tuple[int, int, torch.device]:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); one process when RANK is unset."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def save_atomic(obj, path: Path) -> None:
    """torch.save(obj) to path through write_atomic."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_atomic(path: Path, write) -> None:
    """write(f) into a temp file beside path (binary), fsync it, then rename (and fsync the folder): a crash or a
    power loss leaves the previous file or the new one, never a half-written one. A failed write (a full disk) keeps
    the previous file, removes the partial temp file and raises an OSError naming the file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # the data on disk before the rename: a power loss leaves the old file or the new
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except (OSError, RuntimeError) as e:  # torch.save reports a short write as RuntimeError
        tmp.unlink(missing_ok=True)
        kept = "the previous one is kept" if path.exists() else "no earlier one exists"
        raise OSError(f"could not write {path} ({e}); {kept}") from e


def _fsync_dir(folder: Path) -> None:
    """Make a rename in `folder` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def replicas_identical(net: torch.nn.Module, world: int) -> bool:
    """DDP's contract, checked once at the end: every process holds the same parameters (a float64 checksum each).

    BN running statistics are left out: with plain BN (CPU) each process updates them from its own batch, and DDP
    re-broadcasts rank 0's at the next forward; with SyncBN (GPU) they agree anyway.
    """
    sums = torch.stack([p.detach().double().sum() for p in net.parameters()])
    gathered = [torch.zeros_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums)
    return all(torch.equal(gathered[0], g) for g in gathered[1:])


def all_processes_sum(counts: torch.Tensor, device, world: int) -> list[int]:
    """(n,) int64 counts of this process -> their sums over all processes (an all_reduce on the device if world > 1)."""
    if world > 1:
        counts = counts.to(device)
        dist.all_reduce(counts)
    return counts.tolist()


def check_same_data(dataset, world: int) -> None:
    """Every process walks its own file system: they must list the same images (a node missing files would make the
    DistributedSampler split another list, or the epochs end at different steps and DDP hang)."""
    mine = (len(dataset), hashlib.sha1(b"\0".join(dataset.files.tolist())).hexdigest())
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if any(x != everyone[0] for x in everyone):
        raise RuntimeError(f"{dataset.root}: the processes list different images (count, hash of the list per rank: "
                           f"{everyone}); every node needs the same files")


def check_finite(bad: torch.Tensor, step: int, last_good: int, out: Path, world: int = 1,
                 tensors: list[torch.Tensor] | None = None) -> None:
    """Stop, on every process, before anything is written when any process saw a non-finite loss (DDP has averaged
    its gradients into every replica, so rank 0's own loss may look fine) or, with `tensors` (the checkpoint's), one
    of them holds a non-finite value: the last good checkpoint stays intact. One host sync (and all_reduce)."""
    flag = bad.to(torch.int32)  # () on the device
    if tensors:
        flag |= (~torch.stack(torch._foreach_norm(tensors)).isfinite().all()).to(torch.int32)
    if world > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if flag.item():
        kept = (f"the last good checkpoint ({out / 'checkpoint.pth'}, step {last_good}) is left intact" if last_good
                else "no checkpoint was written yet")
        raise FloatingPointError(f"non-finite loss or weights at or before step {step}; {kept}. Lower --base-lr or "
                                 "check the data.")


def exit_distributed() -> None:
    """End a torchrun process cleanly: destroy the group, flush, and skip the interpreter's teardown
    (reference.md trap: gloo workers can SIGABRT at interpreter exit). No-op in a single process."""
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    if "RANK" in os.environ:
        os._exit(0)


def read_checkpoint(path: Path, keys=(), what: str = "checkpoint") -> dict:
    """torch.load(weights_only: a file never runs code) with a SystemExit naming the file when it is missing,
    unreadable (a truncated or corrupt zip) or lacks `keys`."""
    from model import load_weights  # torch.load(weights_only=True) with messages naming the file
    try:
        ck = load_weights(path, what)
    except ValueError as e:  # missing, truncated zip, not plain tensors...
        raise SystemExit(f"{e}; if truncated or corrupt, delete it or pass another --out") from None
    missing = [k for k in keys if k not in ck]
    if missing:
        raise SystemExit(f"{path}: not a {what} (no {missing})")
    return ck


def refuse_other_run(path: Path, saved: dict, now: dict, keys) -> None:
    """Auto-resume only the run that wrote `path`: SystemExit naming each of `keys` whose saved value differs from
    now's (keys the checkpoint predates are not compared)."""
    diffs = [f"{k}: {saved[k]!r} -> {now.get(k)!r}" for k in keys if k in saved and saved[k] != now.get(k)]
    if diffs:
        raise SystemExit(f"{path}: written by a different run ({'; '.join(diffs)}); rerun with its flags to resume it, "
                         "or pass another --out for a new run")


def trim_log(path: Path, step: int) -> None:
    """Drop log.jsonl lines after `step` (written between the last checkpoint and a crash: the resumed run redoes
    them) and a line cut short by the crash, atomically."""
    if path.exists():  # one flat JSON object a line: complete when it ends with "}"
        lines = [ln for ln in path.read_text().splitlines() if ln.endswith("}") and json.loads(ln)["step"] <= step]
        write_atomic(path, lambda f: f.write("".join(ln + "\n" for ln in lines).encode()))


def log_line(path: Path | None, bar, rec: dict) -> None:
    """Append rec (one flat JSON object) to log.jsonl at path (None: not rank 0) and show its loss and images/s on
    the tqdm progress bar."""
    bar.set_postfix(loss=rec["loss"], img_s=rec["images_per_s"])
    if path is not None:
        with open(path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def plot_curves(log_path: Path, log=print) -> None:
    """curves.png beside a finished run's log.jsonl (figures.plot_training_log). A plot that cannot be made (no
    matplotlib, a log removed or with no record) is reported, not raised: the run's weights are already written."""
    try:
        import figures  # matplotlib, only here

        log(f"training curves {figures.plot_training_log(log_path)}")
    except (ImportError, OSError, ValueError) as e:
        log(f"no training curves: {e}")


def apply_preset(args, preset: dict) -> None:
    """Fill the flags left unset (None) from a preset (train.py's and finetune.py's PAPER / CPU)."""
    for k, v in preset.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)


def anchor_sizes(spec: str, levels: int | None = None) -> tuple:
    """--anchor-sizes of train.py (levels = 4: P2-P5) and finetune.py (5: P2-P6): '24,48,96,192' -> (24, 48, 96,
    192), one positive side per level."""
    try:
        sizes = tuple(int(v) for v in str(spec).split(","))
    except ValueError:
        raise SystemExit(f"--anchor-sizes {spec!r}: expected comma-separated integers, e.g. 24,48,96,192") from None
    if not sizes or min(sizes) <= 0:
        raise SystemExit(f"--anchor-sizes {spec!r}: sides must be positive")
    if levels is not None and len(sizes) != levels:
        raise SystemExit(f"--anchor-sizes {spec!r}: {len(sizes)} sides for {levels} FPN levels")
    return sizes


def in_range(lo=None, hi=None, kind=int):
    """argparse type: a `kind` number in [lo, hi] (None: unbounded), refused with argparse's usage line otherwise."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        ok = value is not None and value == value and (lo is None or value >= lo) and (hi is None or value <= hi)
        if not ok:  # value == value is False for NaN
            bounds = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'} {bounds}, "
                                             f"got {text!r}")
        return value
    return parse


positive_int = in_range(1)  # sizes, batches, intervals


@contextlib.contextmanager
def bad_input_exits():
    """Wrap the reading of input files (annotations, images, proposals): the ValueError / FileNotFoundError that the
    data code raises, whose message names the file and what is wrong, ends the run as that one line instead of a
    traceback. Wrap nothing else: a bug in the model or the training must keep its traceback."""
    try:
        yield
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None
