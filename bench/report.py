"""Shared by the bench/ scripts: the machine a benchmark ran on, its load, and plain-text tables.

Not a test helper: benchmarks print what they measured and where (issue 7: each table carries its date, commit and
machine). Nothing here changes what is measured.

Public
    repo_root() -> Path                      the repository root (bench/..), put on sys.path by the scripts
    machine_info(device=None) -> dict        cpu, cores, torch, cuda device, date, commit, load average
    header(title, device=None) -> str        a block naming the machine, to print above a table
    table(rows, columns) -> str              a Markdown table of dict rows (floats rounded to 3 significant digits)
    sync(device); time_rounds(fns, steps, rounds, warmup, device, per_round=None) -> {name: median s per call}
                                             interleaved timing
    load_average() -> str                    os.getloadavg() as "1m/5m/15m"
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from pathlib import Path


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _cpu_model() -> str:
    """'model name' of /proc/cpuinfo (Linux); platform.processor() elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _commit() -> str:
    """Short HEAD commit, '+dirty' when the work tree differs from it; 'unknown' without git (e.g. a device copy)."""
    try:
        root = str(repo_root())
        head = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain"], capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> str:
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info(device=None) -> dict:
    import torch

    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "cuda_device": "none",
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": _commit(), "load_average": load_average()}
    if torch.cuda.is_available():
        idx = torch.device(device).index if device is not None and torch.device(device).type == "cuda" else None
        info["cuda_device"] = f"{torch.cuda.get_device_name(idx)} (CUDA {torch.version.cuda})"
    return info


def header(title: str, device=None) -> str:
    m = machine_info(device)
    return (f"## {title}\n\n"
            f"- date: {m['date']}; commit: {m['commit']}\n"
            f"- CPU: {m['cpu']}, {m['cores']} cores (torch threads {m['torch_threads']}); "
            f"torch {m['torch']}; CUDA device: {m['cuda_device']}\n"
            f"- load average at start (1m/5m/15m): {m['load_average']}\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v:  # NaN
            return "-"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


def table(rows: list[dict], columns: list[str]) -> str:
    """Markdown table; a missing key prints '-'."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c, "-")) for c in columns) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# Timing (shared by the step benchmarks)
# ----------------------------------------------------------------------------------------------------------------
def sync(device) -> None:
    """torch.cuda.synchronize on a CUDA device (only around timed regions); nothing on CPU."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(fns: dict, steps: int, rounds: int, warmup: int, device, per_round: dict | None = None) -> dict:
    """Interleaved timing of several callables: `warmup` untimed calls of each, then per round ceil(steps / rounds)
    calls of each fn in turn (load from other processes hits all alike) -> {name: median seconds per call}.
    per_round, if given, receives {name: [seconds per call in each round]} (the spread behind the median)."""
    import math
    import statistics
    import time

    per = max(1, math.ceil(steps / rounds))
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            for _ in range(per):
                fn()
            sync(device)
            times[name].append((time.perf_counter() - t0) / per)
    if per_round is not None:
        per_round.update(times)
    return {k: statistics.median(v) for k, v in times.items()}
