"""train.py: one step per mode, resume equivalence, a non-finite loss, bad inputs, LARS and the lr schedule, torchrun,
--compile."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import data
import lars
import ss_proposals
import synthetic
import train
from test_model import views_and_boxes  # (B, K, size) -> three views and their K boxes

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """A tiny unlabelled pool (8 synthetic images) with its selective-search proposals."""
    root = synthetic.ensure_synthetic_dataset(tmp_path_factory.mktemp("synth") / "d", n_unlabelled=8, n_train=1,
                                              n_val=1)
    proposals = root / "proposals.npz"
    ss_proposals.precompute(root / "unlabelled", proposals, workers=1, progress=False)
    return root / "unlabelled", proposals


def tiny_args(pool, out, *extra):
    images, proposals = pool
    return ["--data", str(images), "--proposals", str(proposals), "--out", str(out), "--depth", "18",
            "--size", "64", "--small-size", "32", "--batch-size", "2", "--epochs", "1", "--workers", "0",
            "--log-every", "1", *extra]


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


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
    with pytest.raises(SystemExit, match="--init"):
        train.main(tiny_args(pool, tmp_path / "x", "--mode", "separate"))


def test_failed_checkpoint_write_keeps_the_previous_one(tmp_path, monkeypatch):
    """A full disk mid-write (torch.save raises after writing part of the file): the last checkpoint survives, the
    partial temp file is removed, and the error names the file."""
    path = tmp_path / "checkpoint.pth"
    train.save_atomic({"step": 2, "w": torch.ones(3)}, path)
    real = torch.save

    def disk_full(obj, f, *a, **k):
        f.write(b"PK\x03\x04 partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="checkpoint.pth.*previous one is kept"):
        train.save_atomic({"step": 4, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real)
    assert load(path)["step"] == 2 and torch.equal(load(path)["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]


def test_resume_refuses_another_run(pool, tmp_path):
    """A checkpoint resumes only the run that wrote it: another global batch (the step would land elsewhere in the
    data and the schedules) or another experiment flag is refused before any step, naming the file and the keys."""
    train.main(tiny_args(pool, tmp_path, "--max-steps", "2", "--ckpt-every", "2"))
    for extra, key in ((("--batch-size", "4"), "global_batch"), (("--rpn-proposals",), "rpn_proposals"),
                       (("--rpn-views", "1"), "rpn_views"), (("--seed", "1"), "seed")):
        with pytest.raises(SystemExit, match=f"checkpoint.pth: written by a different run .*{key}"):
            train.main(tiny_args(pool, tmp_path, "--max-steps", "2", *extra))
    assert load(tmp_path / "checkpoint.pth")["step"] == 2
    train.main(tiny_args(pool, tmp_path, "--max-steps", "2", "--workers", "1", "--log-every", "2"))  # same run


def test_proposal_shards_by_glob(pool, tmp_path):
    """--proposals takes a glob (the shards of selective_search.py --shard i/n)."""
    images, proposals = pool
    args, _ = train.resolve_args(train.parse_args(tiny_args((images, proposals.parent / "proposal*.npz"), tmp_path)))
    assert len(train.build_data(args)) == 8


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    ok, bad = torch.zeros((), dtype=torch.bool), torch.ones((), dtype=torch.bool)
    train.check_finite(ok, 3, 2, tmp_path, tensors=[torch.ones(4), torch.zeros(2, 2)])
    for flag, tensors in ((bad, None), (ok, [torch.ones(4), torch.tensor([1.0, float("nan")])]),
                          (ok, [torch.tensor([float("inf")])])):
        with pytest.raises(FloatingPointError, match="step 2.*left intact"):
            train.check_finite(flag, 3, 2, tmp_path, tensors=tensors)


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
            for k in ("loss", "loss_rpn", "loss_det"):  # bench smoke, 64/32 px: |diff| 3.9e-4 on 0.72
                assert compiled[0][k] == pytest.approx(eager[0][k], rel=1e-2, abs=1e-3), k
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


@pytest.mark.parametrize("mode", train.model_lib.MODES)
def test_compile_model_is_one_graph_without_recompiles(mode):
    """model.compile_model: Dynamo captures the whole forward of a step as one graph in every mode, and three steps
    reuse it (no graph break from a host read, no recompile from the anchor cache). A host read added to the step
    fails this."""
    from torch._dynamo.testing import CompileCounter

    torch.manual_seed(0)
    net = train.model_lib.ADePT(mode, depth=18, fpn_channels=32)
    counter = CompileCounter()
    real = torch.nn.Module.compile
    torch._dynamo.reset()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(torch.nn.Module, "compile", lambda self, *a, **k: real(self, *a, backend=counter, **k))
            train.model_lib.compile_model(net)
        views, boxes = views_and_boxes(size=64)
        for _ in range(3):
            net(views, boxes)["loss"].backward()
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


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


def test_bad_inputs_fail_before_training(pool, tmp_path):
    images, proposals = pool
    with pytest.raises(SystemExit, match="missing.npz"):
        train.main(tiny_args((images, tmp_path / "missing.npz"), tmp_path))
    with pytest.raises(SystemExit, match="--proposals"):
        train.main(["--data", str(images), "--out", str(tmp_path)])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty"):
        train.main(tiny_args((empty, proposals), tmp_path))
    other = tmp_path / "other"
    other.mkdir()
    (other / "x.png").write_bytes((images / next(iter(ss_proposals.load_proposals(proposals)))).read_bytes())
    with pytest.raises(ValueError, match="proposals"):
        train.main(tiny_args((other, proposals), tmp_path))
    for bad in ("0,1", "1,1", "v1", ""):
        with pytest.raises(SystemExit, match="--rpn-views"):
            train.main(tiny_args(pool, tmp_path, "--rpn-views", bad))
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "checkpoint.pth").write_bytes(b"PK\x03\x04 cut short by a crash")
    with pytest.raises(SystemExit, match="ck/checkpoint.pth: cannot be read"):
        train.main(tiny_args(pool, tmp_path / "ck"))


def test_rpn_views_and_min_visible_flags_reach_model_and_data(pool, tmp_path):
    args, _ = train.resolve_args(train.parse_args(tiny_args(pool, tmp_path, "--rpn-views", "3,1",
                                                            "--min-visible", "0.8")))
    assert train.build_model(args, torch.device("cpu")).rpn_views == (1, 3)
    assert train.build_data(args).min_visible == 0.8
    args, _ = train.resolve_args(train.parse_args(tiny_args(pool, tmp_path)))
    assert train.build_model(args, torch.device("cpu")).rpn_views == (1, 2, 3)  # 3: all views feed the RPN
    assert train.build_data(args).min_visible == 0.5


def test_lars_excludes_biases_and_norms_from_trust_and_decay():
    w = torch.nn.Parameter(torch.full((2, 2), 2.0))  # |w| = 4
    b = torch.nn.Parameter(torch.ones(2))
    w.grad, b.grad = torch.full((2, 2), 1.0), torch.full((2,), 1.0)
    opt = lars.LARS([{"params": [w]}, {"params": [b], "lars": False, "weight_decay": 0.0}], lr=1.0,
                     weight_decay=0.5, trust_coefficient=0.001)
    opt.step()
    d = 1.0 + 0.5 * 2.0  # grad + wd * w, per entry; |d| = 4
    assert torch.allclose(w, torch.full((2, 2), 2.0 - d * 0.001 * 4.0 / 4.0))
    assert torch.allclose(b, torch.zeros(2))  # plain SGD step of lr * grad


def test_lars_foreach_step_matches_the_per_parameter_equation():
    """Two steps on mixed shapes, a zero weight (trust 1) and a parameter without gradient (untouched)."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.zeros(2, 2)),
          torch.nn.Parameter(torch.randn(5, 1, 2)), torch.nn.Parameter(torch.randn(4))]
    frozen = torch.nn.Parameter(torch.randn(2, 2))
    ref = [p.detach().clone() for p in ps]
    bufs = [torch.zeros_like(p) for p in ps]
    opt = lars.LARS([{"params": ps[:3] + [frozen]}, {"params": ps[3:], "lars": False, "weight_decay": 0.0}],
                     lr=0.5, momentum=0.9, weight_decay=0.1, trust_coefficient=0.01)
    frozen_before = frozen.detach().clone()
    for _ in range(2):
        grads = [torch.randn_like(p) for p in ps]
        for p, g in zip(ps, grads):
            p.grad = g
        opt.step()
        for i, g in enumerate(grads):  # the equation in LARS's docstring, one parameter at a time
            d = g + 0.1 * ref[i] if i < 3 else g
            if i < 3 and ref[i].norm() > 0 and d.norm() > 0:
                d = d * 0.01 * ref[i].norm() / (d.norm() + 1e-8)
            bufs[i] = 0.9 * bufs[i] + d
            ref[i] = ref[i] - 0.5 * bufs[i]
    for p, r in zip(ps, ref):
        torch.testing.assert_close(p.detach(), r)
    assert torch.equal(frozen, frozen_before)


def test_lars_step_launches_a_constant_number_of_ops():
    # Issue 7 (fast path): after the first step (momentum buffers created), a step is a fixed handful of foreach ops
    # whatever the number of parameters (each op is a kernel launch on a GPU; it used to allocate a zeros_like per
    # parameter every step).
    from sync_ops import SyncOpCounter

    counts = []
    for n_params in (10, 200):
        ps = [torch.nn.Parameter(torch.randn(3, 3)) for _ in range(n_params)]
        opt = lars.LARS([{"params": ps}], lr=0.1)
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
        with SyncOpCounter() as counter:
            opt.step()
        counts.append(counter.ops)
    assert counts[0] == counts[1] < 30, counts


def test_lr_schedule():
    assert train.lr_at(0, 100, 10, 1.0) == pytest.approx(0.01)
    assert train.lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert train.lr_at(100, 100, 10, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert train.lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert train.lr_at(5, 100, 10, 1.0) == pytest.approx(0.505)  # half-way up the warm-up: 0.01 + 0.99 x 5 / 10


def test_lars_param_groups_exclude_biases_and_norms():
    """lars.param_groups: conv / linear weights get LARS and weight decay; biases and norm parameters (1-D) get
    neither; frozen parameters are in no group."""
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Conv2d(4, 2, 1))
    net[2].requires_grad_(False)
    names = {id(p): name for name, p in net.named_parameters()}
    groups = lars.param_groups(net)
    assert [[names[id(p)] for p in g["params"]] for g in groups] == [["0.weight"], ["0.bias", "1.weight", "1.bias"]]
    assert groups[1].get("lars") is False and groups[1].get("weight_decay") == 0.0
    lars_group, plain = lars.LARS(groups, lr=0.1, weight_decay=1e-5).param_groups  # the defaults fill unset keys
    assert lars_group["lars"] is True and lars_group["weight_decay"] == 1e-5
    assert plain["lars"] is False and plain["weight_decay"] == 0.0


def test_to_device_boxes_for_the_rpn_and_the_head():
    """data.to_device: L_det's boxes are b1, b2, b3 (V1's jittered as SoCo's); Eq. 1's pseudo ground truth is r1, b2,
    b3 (V1's selective-search boxes before the jitter); no r1 in the batch: rpn_boxes None (the model takes boxes).
    The views are the colour function's output, normalised; without t1 the transforms are None."""
    g = torch.Generator().manual_seed(0)
    views = {f"v{j}": torch.randint(0, 256, (2, 3, s, s), dtype=torch.uint8, generator=g)
             for j, s in ((1, 8), (2, 8), (3, 4))}
    boxes = {k: torch.rand(2, 3, 4, generator=g) * 8 for k in ("b1", "b2", "b3", "r1")}
    extra = {**{f"t{j}": torch.rand(2, 4, generator=g) for j in (1, 2, 3)},
             **{f"c{j}": torch.full((2, 12), float(j)) for j in (1, 2, 3)}}
    calls = []

    def invert(v, params):  # a stand-in colour: records its parameters
        calls.append(params)
        return 255 - v

    cpu = torch.device("cpu")
    out_views, out_boxes, transforms, rpn_boxes = data.to_device({**views, **boxes, **extra}, cpu, False, invert)
    for j in (1, 2, 3):
        assert torch.equal(out_boxes[j - 1], boxes[f"b{j}"]) and torch.equal(transforms[j - 1], extra[f"t{j}"])
        assert torch.equal(calls[j - 1], extra[f"c{j}"])
        torch.testing.assert_close(out_views[j - 1], data.normalize(255 - views[f"v{j}"]))
    assert len(calls) == 3
    assert [torch.equal(a, b) for a, b in zip(rpn_boxes, (boxes["r1"], boxes["b2"], boxes["b3"]))] == [True] * 3
    assert not torch.equal(rpn_boxes[0], out_boxes[0])
    no_r1 = {k: v for k, v in boxes.items() if k != "r1"}
    out_views, out_boxes, transforms, rpn_boxes = data.to_device({**views, **no_r1}, cpu, False)  # no r1, t1, colour
    assert rpn_boxes is None and transforms is None
    assert all(torch.equal(a, b) for a, b in zip(out_boxes, (boxes["b1"], boxes["b2"], boxes["b3"])))
    for j in (1, 2, 3):
        torch.testing.assert_close(out_views[j - 1], data.normalize(views[f"v{j}"]))


@pytest.mark.parametrize("flags, expected", [
    (["--compile", "model", "--compile-mode", "reduce-overhead"], [("ADePT", "reduce-overhead")]),
    (["--compile", "--compile-mode", "max-autotune-no-cudagraphs"],
     [("FeatureExtractor", "max-autotune-no-cudagraphs")] * 2),
    (["--compile", "model"], [("ADePT", None)]),
])
def test_compile_flags_reach_torch_compile(monkeypatch, flags, expected):
    """--compile SCOPE --compile-mode MODE: which modules train.build_model compiles, and with which mode (recorded,
    not compiled: CUDA graphs need a GPU)."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **k: calls.append((type(self).__name__, k["mode"])))
    args, _ = train.resolve_args(train.parse_args(["--depth", "18", *flags]))
    train.build_model(args, torch.device("cpu"))
    assert calls == expected


@pytest.mark.parametrize("flags, message", [
    (["--compile-mode", "default"], "--compile-mode default needs --compile"),
    (["--compile", "--compile-mode", "reduce-overhead"], "(CUDA graphs) needs --compile model"),
    (["--compile", "extractors", "--compile-mode", "max-autotune"], "(CUDA graphs) needs --compile model"),
])
def test_compile_mode_without_its_scope_is_refused(capsys, flags, message):
    with pytest.raises(SystemExit):
        train.parse_args(flags)
    assert message in capsys.readouterr().err


# train.py under torchrun as is, and with --compile model under DDP (each process compiles; torch.compile's backend
# swapped for aot_eager, as in the compile test above, through a `python -c` launcher)
AOT_EAGER_LAUNCHER = ["--no-python", sys.executable, "-c",
                      "import sys, torch, train; real = torch.nn.Module.compile; torch.nn.Module.compile = "
                      "lambda self, *a, **k: real(self, *a, backend='aot_eager', **k); train.main(sys.argv[1:])"]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compile-model"])
def test_torchrun_two_processes_keep_identical_weights(pool, tmp_path, compiled):
    launcher = AOT_EAGER_LAUNCHER if compiled else [str(ROOT / "train.py")]
    extra = ["--compile", "model"] if compiled else []
    # lr = 64 x 2 images x 2 processes / 256 = 1.0 at step 0 (no warm-up), 0.5 at step 1 (cosine over 2 steps)
    flags = ("--mode", "joint", "--max-steps", "2", "--warmup-epochs", "0", "--base-lr", "64")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           *launcher, *tiny_args(pool, tmp_path, *flags, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "weights identical on 2 processes: True" in r.stdout
    assert '"compile": "model"' in r.stdout if compiled else '"compile": null' in r.stdout
    assert (tmp_path / "pretrained.pth").exists()
    recs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in recs] == [1, 2]
    assert f"training curves {tmp_path / 'curves.png'}" in r.stdout and (tmp_path / "curves.png").stat().st_size
    assert [rec["lr"] for rec in recs] == pytest.approx([1.0, 0.5])
    assert recs[0]["tau"] == pytest.approx(0.99, abs=1e-12)
    # identical weights that trained: the online backbone and RPN moved from their initial values, the target too
    before, after = initial_params(pool, tmp_path, *flags), load(tmp_path / "checkpoint.pth")["model"]
    for prefix in ("online.extractor.backbone.conv1.", "rpn.", "target.extractor.backbone.conv1."):
        assert changed(before, after, prefix)[0], prefix
