"""Count the operations that make a CUDA device wait for the host ("host syncs"), on any device (issue 7, fast path).

On CUDA, torch.cuda.set_sync_debug_mode counts synchronisations (bench/gpu_check.py uses it). CPU tests cannot, so
this counts the operations that synchronise on CUDA because the host needs a value or an output size that only the
device knows: a scalar read (.item(), float(t), bool(t), .tolist()), nonzero / torch.where(cond), boolean-mask
indexing, masked_select, unique, bincount and repeat_interleave with a tensor of repeats; and a tensor made from
Python data (torch.tensor, new_tensor, as_tensor of a list: aten::lift_fresh), which on CUDA is a copy from pageable
host memory that waits for the device's queue. That last count is conservative: a Python scalar assigned through an
index (x[i] = 1) also makes one, and CUDA fills it without a copy. Each counts once per call, whatever the device,
so a CPU test can assert that a training step has none.

Calibration: on one H100 the joint step made 18 CUDA syncs with two such operations per RoI-pooling call
(torch.bincount, whose CUDA kernel reads its maximum, then .tolist() of the counts; bench/RESULTS.md).

Public: ``SyncOpCounter`` (a TorchDispatchMode; ``counts`` maps sync op name -> calls, ``total`` sums them,
``ops`` counts every dispatched aten op: a kernel launch each on a GPU).
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Operators whose output (a Python value, or a tensor whose size depends on the data) needs the device's result.
SYNC_OPS = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::bincount",
            "aten::_unique", "aten::_unique2", "aten::unique_dim", "aten::unique_consecutive", "aten::equal",
            "aten::is_nonzero", "torchvision::nms",
            # a tensor made from Python data (torch.tensor, new_tensor, as_tensor of a list): on CUDA a copy from
            # pageable host memory that waits for the device's queue (cudaStreamSynchronize); also a Python scalar
            # assigned through an index, which CUDA fills without a copy (an over-count)
            "aten::lift_fresh"}


def _has_bool_index(args) -> bool:
    """aten::index / index_put with a boolean mask among the indices (x[mask]): a nonzero inside."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ())


class SyncOpCounter(TorchDispatchMode):
    """with SyncOpCounter() as c: step(); c.total == 0 means the step never waits for the device."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}
        self.ops = 0  # every operator dispatched (forward and backward, below autograd)

    def _add(self, name: str) -> None:
        self.counts[name] = self.counts.get(name, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.ops += 1
        if name in SYNC_OPS:
            self._add(name)
        elif name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_") \
                and _has_bool_index(args):
            self._add(name + "(bool mask)")
        elif name == "aten::repeat_interleave" and isinstance(args[0], torch.Tensor) and \
                (kwargs or {}).get("output_size") is None and len(args) == 1:
            self._add(name + "(tensor repeats)")
        return func(*args, **(kwargs or {}))

    # Tensor.tolist reads the data without dispatching an operator: wrapped while the mode is active.
    def __enter__(self):
        self._tolist = torch.Tensor.tolist
        counter = self

        def tolist(t):
            counter._add("Tensor.tolist")
            return counter._tolist(t)

        torch.Tensor.tolist = tolist
        return super().__enter__()

    def __exit__(self, *exc):
        torch.Tensor.tolist = self._tolist
        return super().__exit__(*exc)
