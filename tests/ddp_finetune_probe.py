"""torchrun target of tests/test_finetune.py::test_torchrun_two_processes_finetune: finetune.py's main with probes
that write, per rank, under $PROBE_OUT: probe<rank>.jsonl (each batch of keys a coco_data.AspectRatioBatches yields,
with its sampler's seed; the number of precise-BN batches) and weights<rank>.pt (the parameters after training)."""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import coco_data  # noqa: E402
import finetune  # noqa: E402
import finetune_loop  # noqa: E402

OUT, RANK = Path(os.environ["PROBE_OUT"]), os.environ["RANK"]


def record(entry: dict) -> None:
    with open(OUT / f"probe{RANK}.jsonl", "a") as f:
        f.write(json.dumps(entry) + "\n")


batches_of = coco_data.AspectRatioBatches.__iter__
coco_data.AspectRatioBatches.__iter__ = lambda self: (
    record({"seed": self.sampler.seed, "keys": [list(k) for k in b]}) or b for b in batches_of(self))
update = finetune_loop.update_bn_stats
finetune_loop.update_bn_stats = lambda model, batches, forward: (
    lambda n: record({"precise_bn_batches": n}) or n)(update(model, batches, forward))
precise = finetune_loop.precise_bn_pass


def precise_bn_pass(det, *a, **k):
    torch.save({n: p.detach().clone() for n, p in det.named_parameters()}, OUT / f"weights{RANK}.pt")
    return precise(det, *a, **k)


finetune_loop.precise_bn_pass = precise_bn_pass
finetune.main(sys.argv[1:])
finetune.exit_distributed()
