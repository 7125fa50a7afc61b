"""train.py end to end on a tiny pool (tests/conftest.py's pool fixture): one step per mode, separate mode from a
soco run, resume (refused for another run; the same weights after a crash, also with persistent workers over an epoch
boundary), no host sync in the step, --compile against eager, a non-finite loss, the cross-process checks (2 gloo
processes), torchrun with 2 processes (eager and --compile model)."""
import ast
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train
from test_train import load, tiny_args

ROOT = Path(__file__).resolve().parents[1]


# lr = base_lr x batch x world / 256 (train.train_loop): 128 x 2 / 256 = 1.0 at step 0 without warm-up. A step that
# large moves every weight by many float32 ulps (LARS: ~1e-3 of its norm), enough to see the EMA's 1% of it
BIG_STEP = ("--warmup-epochs", "0", "--base-lr", "128")


def initial_params(pool, out, *extra):
    """The parameters a train.py run with these flags starts from (train.build_model seeds them with --seed)."""
    args, _ = train.resolve_args(train.parse_args(tiny_args(pool, out, *extra)))
    return {k: p.detach().clone() for k, p in train.build_model(args, torch.device("cpu")).named_parameters()}


def assert_one_step_ema(before, after, tau):
    """After one step (3.3): every target parameter xi = tau xi_0 + (1 - tau) theta_1 (xi_0 the initial target,
    theta_1 the online parameter after the step)."""
    for k in before:
        if k.startswith("online."):
            t = "target." + k.removeprefix("online.")
            expected = (tau * before[t].double() + (1 - tau) * after[k].double()).float()
            torch.testing.assert_close(after[t], expected, rtol=1e-6, atol=1e-9, msg=lambda m, t=t: f"{t}: {m}")


def changed(before, after, prefix):
    """The parameters under `prefix` whose value the run changed, and those it did not."""
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    moved = [k for k in keys if not torch.equal(before[k], after[k])]
    return moved, [k for k in keys if k not in moved]


@pytest.mark.parametrize("mode", ["joint", "soco", "byol"])
def test_one_step_per_mode(pool, tmp_path, mode):
    flags = ("--mode", mode, "--max-steps", "1", *BIG_STEP)
    train.main(tiny_args(pool, tmp_path, *flags))
    rec = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert rec["step"] == 1 and all(k in rec for k in ("loss", "loss_rpn", "loss_det", "lr", "tau", "images_per_s"))
    # the lr and tau step 0 ran with: base_lr 128 x batch 2 x 1 process / 256, no warm-up, cosine at 0; tau_base
    assert rec["lr"] == 1.0 and rec["tau"] == pytest.approx(0.99, abs=1e-12)
    # the step changed the online weights (LARS) and moved the target by the EMA of 3.3 (tau = 0.99 at step 0)
    before, after = initial_params(pool, tmp_path, *flags), load(tmp_path / "checkpoint.pth")["model"]
    assert changed(before, after, "online.extractor.backbone.conv1.")[0]
    if mode == "joint":
        assert not changed(before, after, "rpn.")[1]  # every RPN parameter moved
    assert_one_step_ema(before, after, 0.99)
    # LARS on the weights; biases and norm parameters (the 1-D tensors) without weight decay and trust ratio (4.2)
    args, _ = train.resolve_args(train.parse_args(tiny_args(pool, tmp_path, *flags)))
    trainable = [p for p in train.build_model(args, torch.device("cpu")).parameters() if p.requires_grad]
    groups = load(tmp_path / "checkpoint.pth")["optimizer"]["param_groups"]
    assert [(g["lars"], g["weight_decay"], len(g["params"])) for g in groups] == \
        [(True, 1e-5, sum(p.ndim > 1 for p in trainable)), (False, 0.0, sum(p.ndim == 1 for p in trainable))]
    assert rec["replaced"] == 0 and 0 <= rec["fallback"] <= 2  # counts of images replaced / samples with no box
    assert (rec["loss_rpn"] > 0) == (mode == "joint")
    state = load(tmp_path / "pretrained.pth")
    prefixes = {k.split(".")[0] for k in state["state_dict"]}
    expected = {"joint": {"backbone", "fpn", "box_head", "rpn"}, "soco": {"backbone", "fpn", "box_head"},
                "byol": {"backbone", "fpn"}}[mode]
    assert prefixes == expected and state["meta"]["branch"] == "target" and state["meta"]["args"]["mode"] == mode


def test_separate_mode_from_a_soco_run(pool, tmp_path):
    train.main(tiny_args(pool, tmp_path / "soco", "--mode", "soco", "--max-steps", "1"))
    init = tmp_path / "soco" / "pretrained.pth"
    train.main(tiny_args(pool, tmp_path / "sep", "--mode", "separate", "--init", str(init), "--max-steps", "2"))
    soco, sep = load(init)["state_dict"], load(tmp_path / "sep" / "pretrained.pth")["state_dict"]
    for k, v in soco.items():  # extractor and head are frozen: exported unchanged
        assert torch.equal(v, sep[k]), k
    assert any(k.startswith("rpn.") for k in sep)
    # the soco run's checkpoint.pth works as --init too: its target branch is what its pretrained.pth holds
    flags = ("--mode", "separate", "--init", str(tmp_path / "soco" / "checkpoint.pth"), "--max-steps", "1", *BIG_STEP)
    train.main(tiny_args(pool, tmp_path / "sep2", *flags))
    sep2 = load(tmp_path / "sep2" / "pretrained.pth")["state_dict"]
    assert all(torch.equal(v, sep2[k]) for k, v in soco.items())
    # the step trained every RPN parameter and nothing else (online, predictor, target: as loaded from --init)
    before, after = initial_params(pool, tmp_path / "sep2", *flags), load(tmp_path / "sep2" / "checkpoint.pth")["model"]
    assert not changed(before, after, "rpn.")[1]
    for prefix in ("online.", "predictor.", "target."):
        assert not changed(before, after, prefix)[0], prefix
    # and the frozen extractor ran in eval mode: its BN statistics are still those of --init (= the target's)
    stats = [k for k in after if k.startswith("online.") and k.endswith(("running_mean", "running_var"))]
    assert stats and all(torch.equal(after[k], after["target." + k.removeprefix("online.")]) for k in stats)
    with pytest.raises(SystemExit, match="--init"):
        train.main(tiny_args(pool, tmp_path / "x", "--mode", "separate"))


def test_resume_refuses_another_run(pool, tmp_path):
    """A checkpoint resumes only the run that wrote it: another global batch (the step would land elsewhere in the
    data and the schedules) or another experiment flag is refused before any step, naming the file and the keys."""
    train.main(tiny_args(pool, tmp_path, "--max-steps", "2", "--ckpt-every", "2"))
    for extra, key in ((("--batch-size", "4"), "global_batch"), (("--rpn-proposals",), "rpn_proposals"),
                       (("--rpn-views", "1"), "rpn_views"), (("--seed", "1"), "seed"),
                       (("--no-box-jitter",), "no_box_jitter")):
        with pytest.raises(SystemExit, match=f"checkpoint.pth: written by a different run .*{key}"):
            train.main(tiny_args(pool, tmp_path, "--max-steps", "2", *extra))
    assert load(tmp_path / "checkpoint.pth")["step"] == 2
    train.main(tiny_args(pool, tmp_path, "--max-steps", "2", "--workers", "1", "--log-every", "2"))  # same run


def _two_process_checks(rank, world, port, out):
    """One of 2 gloo processes: rank 1 alone saw a non-finite loss, and lists one image more."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    seen = {"sum": train.all_processes_sum(torch.tensor([rank, 1]), torch.device("cpu"), world)}
    try:
        train.check_finite(torch.tensor(rank == 1), 5, 4, Path(out), world)
    except FloatingPointError:
        seen["finite_raised"] = True

    class Listing:  # what check_same_data reads of a PretrainDataset
        root, files = Path(out), np.array([b"a.jpg", b"b.jpg"] + [b"c.jpg"] * rank)

        def __len__(self):
            return len(self.files)

    try:
        train.check_same_data(Listing(), world)
    except RuntimeError as e:
        seen["data_raised"] = "different images" in str(e)
    Path(out, f"rank{rank}.json").write_text(json.dumps(seen))
    torch.distributed.destroy_process_group()
    os._exit(0)  # reference.md trap: skip the interpreter teardown of a gloo process


def test_cross_process_checks(tmp_path):
    """A non-finite loss on rank 1 only stops rank 0 too (before it would write the checkpoint), and processes that
    list different images refuse to train."""
    import socket

    with socket.socket() as s_:
        s_.bind(("127.0.0.1", 0))
        port = s_.getsockname()[1]
    torch.multiprocessing.spawn(_two_process_checks, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen == {"sum": [1, 2], "finite_raised": True, "data_raised": True}, rank


@pytest.mark.parametrize("color_on", ["loader", "device"])
def test_training_steps_make_no_host_sync(pool, tmp_path, monkeypatch, color_on):
    """train.train_step (batch to the device, colour on the device, forward, backward, LARS, EMA) waits for the device
    nowhere once the first step has built the anchors: no scalar read, no data-dependent shape, no tensor made from
    Python data (tests/sync_ops.py), with the RoI pooling a GPU runs. Only log and checkpoint steps read the loss."""
    from sync_ops import SyncOpCounter

    real_build, real_step, seen = train.build_model, train.train_step, []

    def gpu_pooling_model(*args, **kwargs):
        net = real_build(*args, **kwargs)
        net.pool_sync_free(True)
        return net

    def counted_step(*args, **kwargs):
        with SyncOpCounter() as counter:
            out = real_step(*args, **kwargs)
        seen.append(dict(counter.counts))
        return out

    monkeypatch.setattr(train, "build_model", gpu_pooling_model)
    monkeypatch.setattr(train, "train_step", counted_step)
    train.main(tiny_args(pool, tmp_path, "--max-steps", "3", "--log-every", "100", "--ckpt-every", "100",
                         "--color-on", color_on))
    assert len(seen) == 3 and seen[1:] == [{}, {}], seen


def test_resume_gives_the_same_weights(pool, tmp_path, monkeypatch):
    args = ["--mode", "joint", "--max-steps", "4", "--ckpt-every", "2"]
    train.main(tiny_args(pool, tmp_path / "a", *args))

    real = train.lr_at

    def crash_at_step_4(step, *a):
        if step == 3:  # step 3 is done and logged, the checkpoint is step 2's; the process "dies" before step 4
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(train, "lr_at", crash_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_args(pool, tmp_path / "b", *args))
    assert load(tmp_path / "b" / "checkpoint.pth")["step"] == 2
    monkeypatch.setattr(train, "lr_at", real)
    train.main(tiny_args(pool, tmp_path / "b", *args))
    a, b = load(tmp_path / "a" / "checkpoint.pth"), load(tmp_path / "b" / "checkpoint.pth")
    assert a["step"] == b["step"] == 4
    logs = [[json.loads(x) for x in (tmp_path / d / "log.jsonl").read_text().splitlines()] for d in "ab"]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]  # step 3's line, logged before the crash, is not repeated
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_persistent_workers_cross_epochs_and_resume_like_in_process(pool, tmp_path, monkeypatch):
    """One loader for the run (--workers 1, persistent): over an epoch boundary (4 steps per epoch here) and a
    mid-epoch resume, the weights equal an in-process run's (--workers 0): the epoch reaches the worker."""
    args = ["--mode", "joint", "--epochs", "2", "--max-steps", "6", "--ckpt-every", "2"]
    train.main(tiny_args(pool, tmp_path / "a", *args))
    real = train.lr_at

    def crash(step, *a):
        if step == 3:  # checkpoint of step 2 written, mid-epoch 0
            raise KeyboardInterrupt
        return real(step, *a)

    monkeypatch.setattr(train, "lr_at", crash)
    with pytest.raises(KeyboardInterrupt):
        train.main(tiny_args(pool, tmp_path / "b", *args, "--workers", "1"))
    monkeypatch.setattr(train, "lr_at", real)
    train.main(tiny_args(pool, tmp_path / "b", *args, "--workers", "1"))
    a, b = load(tmp_path / "a" / "checkpoint.pth"), load(tmp_path / "b" / "checkpoint.pth")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


@pytest.mark.parametrize("scope", train.COMPILE_SCOPES)
@pytest.mark.parametrize("backend", [
    "aot_eager",  # Dynamo capture + AOTAutograd's forward/backward graphs, no code generation: fast
    # SLOW, opt-in: Inductor generates and compiles C++ for every graph, minutes with a cold cache (RESULTS.md 8, 9)
    pytest.param("inductor", marks=pytest.mark.skipif(not os.environ.get("ADEPT_TEST_INDUCTOR"),
                                                      reason="slow (compiles C++); set ADEPT_TEST_INDUCTOR=1")),
])
def test_compile_matches_eager_and_keeps_checkpoint_keys(pool, tmp_path, monkeypatch, backend, scope):
    """--compile [extractors|model] (issue 7): the first step's losses equal eager ones (same weights, batch and seed;
    Inductor may reorder float sums; fallback_random keeps eager's random anchor sampling), checkpoint and export keys
    are unchanged (in-place compile: no `_orig_mod.`), a compiled run resumes from its checkpoint and an eager run
    loads it. train.py compiles with the default backend (Inductor); the fast case swaps in aot_eager, which checks
    the same capture, guards and autograd split."""
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import counters

    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: real(self, *a, backend=backend, **k))
    torch._dynamo.reset()
    try:
        with inductor_config.patch(fallback_random=True):  # Inductor: the anchor sampling draws as eager
            train.main(tiny_args(pool, tmp_path / "eager", "--max-steps", "1"))
            graphs = counters["stats"]["unique_graphs"]
            train.main(tiny_args(pool, tmp_path / "compiled", "--max-steps", "1", "--compile", scope))
            # extractors, dynamic=False: 2 view sides (64, 32) x 2 grad modes (online, target under no_grad), shared by
            # the branches; model: the whole forward of the step, no graph break (Encoder.sync_free)
            assert counters["stats"]["unique_graphs"] - graphs == {"extractors": 4, "model": 1}[scope]
            eager, compiled = ([json.loads(line) for line in (tmp_path / d / "log.jsonl").read_text().splitlines()]
                               for d in ("eager", "compiled"))
            # aot_eager runs eager's kernels: the same losses up to float rounding; Inductor may fuse and reorder sums
            # (bench smoke, 64/32 px: |diff| 3.9e-4 on 0.72)
            tol = dict(rel=1e-5, abs=1e-6) if backend == "aot_eager" else dict(rel=1e-2, abs=1e-3)
            for k in ("loss", "loss_rpn", "loss_det"):
                assert compiled[0][k] == pytest.approx(eager[0][k], **tol), (k, compiled[0][k], eager[0][k])
            a, b = load(tmp_path / "eager" / "checkpoint.pth"), load(tmp_path / "compiled" / "checkpoint.pth")
            assert a["model"].keys() == b["model"].keys()
            assert load(tmp_path / "eager" / "pretrained.pth")["state_dict"].keys() == \
                load(tmp_path / "compiled" / "pretrained.pth")["state_dict"].keys()
            train.main(tiny_args(pool, tmp_path / "compiled", "--max-steps", "2", "--compile", scope))  # resumes at 1
            recs = [json.loads(line) for line in (tmp_path / "compiled" / "log.jsonl").read_text().splitlines()]
            assert [r["step"] for r in recs] == [1, 2] and all(math.isfinite(r["loss"]) for r in recs)
            train.main(tiny_args(pool, tmp_path / "compiled", "--max-steps", "3"))  # eager loads the compiled one
            assert load(tmp_path / "compiled" / "checkpoint.pth")["step"] == 3
    finally:
        torch._dynamo.reset()  # drop the compiled graphs: later tests run eager


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(pool, tmp_path, monkeypatch):
    real = train.model_lib.ADePT.forward
    calls = {"n": 0}

    def nan_on_third_step(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] == 3:
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(train.model_lib.ADePT, "forward", nan_on_third_step)
    with pytest.raises(FloatingPointError, match="step 2"):
        train.main(tiny_args(pool, tmp_path, "--max-steps", "4", "--ckpt-every", "2"))
    ck = load(tmp_path / "checkpoint.pth")
    assert ck["step"] == 2 and all(torch.isfinite(v).all() for v in ck["model"].values() if v.is_floating_point())


# train.py under torchrun as is, and with --compile model under DDP (each process compiles; torch.compile's backend
# swapped for aot_eager, as in the compile test above, through a `python -c` launcher)
# The eager run records the dataset items each process reads (workers 0: in the process) into $ADEPT_TRACE<rank>
TRACING_LAUNCHER = ["--no-python", sys.executable, "-c",
                    "import os, sys, data, train; get = data.PretrainDataset.__getitem__; "
                    "data.PretrainDataset.__getitem__ = lambda self, item: (open(os.environ['ADEPT_TRACE'] + "
                    "os.environ['RANK'], 'a').write(repr(item) + '\\n'), get(self, item))[1]; train.main(sys.argv[1:])"]
AOT_EAGER_LAUNCHER = ["--no-python", sys.executable, "-c",
                      "import sys, torch, train; real = torch.nn.Module.compile; torch.nn.Module.compile = "
                      "lambda self, *a, **k: real(self, *a, backend='aot_eager', **k); train.main(sys.argv[1:])"]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile-model"])
def test_torchrun_two_processes_keep_identical_weights(pool, tmp_path, compiled):
    launcher = AOT_EAGER_LAUNCHER if compiled else TRACING_LAUNCHER
    extra = ["--compile", "model"] if compiled else []
    # lr = 64 x 2 images x 2 processes / 256 = 1.0 at step 0 (no warm-up), 0.5 at step 1 (cosine over 2 steps)
    flags = ("--mode", "joint", "--max-steps", "2", "--warmup-epochs", "0", "--base-lr", "64")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           *launcher, *tiny_args(pool, tmp_path, *flags, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "ADEPT_TRACE": str(tmp_path / "rank")}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "weights identical on 2 processes: True" in r.stdout
    assert '"compile": "model"' in r.stdout if compiled else '"compile": null' in r.stdout
    assert (tmp_path / "pretrained.pth").exists()
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in recs] == [1, 2]
    assert f"training curves {tmp_path / 'curves.png'}" in r.stdout and (tmp_path / "curves.png").stat().st_size
    assert [rec["lr"] for rec in recs] == pytest.approx([1.0, 0.5])
    # tau of 3.3's cosine over the 2 steps: 1 - (1 - 0.99) (cos(pi k / 2) + 1) / 2 at k = 0, 1
    assert [rec["tau"] for rec in recs] == pytest.approx([0.99, 0.995], abs=1e-12)
    if not compiled:  # each process read its own half of the 8 images: 2 steps x 2 images, none read twice
        items = [map(ast.literal_eval, (tmp_path / f"rank{k}").read_text().splitlines()) for k in (0, 1)]
        read = [[i[1] if isinstance(i, tuple) else i for i in its] for its in items]  # (epoch, index) or index
        assert [len(r) for r in read] == [4, 4] and sorted(read[0] + read[1]) == list(range(8)), read
    # identical weights that trained: the online backbone and RPN moved from their initial values, the target too
    before, after = initial_params(pool, tmp_path, *flags), load(tmp_path / "checkpoint.pth")["model"]
    for prefix in ("online.extractor.backbone.conv1.", "rpn.", "target.extractor.backbone.conv1."):
        assert changed(before, after, prefix)[0], prefix
