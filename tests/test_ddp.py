"""Data-parallel training on CPU: 2 processes with the gloo backend against one process on the same global batch.

BatchNorm normalises each process's shard with its own batch statistics (as DDP does), so per-process results
differ from one process on the whole batch by design; the equality test uses models without BatchNorm.
"""
import json
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import ardir
from ardir import distributed

GLOBAL_BATCH, STEPS, WORLD = 16, 3, 2


class NoBNNet(nn.Module):
    default_ir_layers = ("features",)

    def __init__(self, width=6, num_classes=4):
        super().__init__()
        self.conv = nn.Conv2d(1, width, 3, padding=1)
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(width, width, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.features = nn.Flatten()
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        return self.fc(self.features(self.pool(self.body(self.conv(x)))))


def _data():
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.rand(GLOBAL_BATCH * STEPS, 1, 8, 8, generator=g),
                         torch.randint(0, 4, (GLOBAL_BATCH * STEPS,), generator=g))


def _models():
    torch.manual_seed(0)
    teacher = NoBNNet(width=10).eval().requires_grad_(False)  # wider: ARDIR gets a feature adapter
    student = NoBNNet(width=6)
    return teacher, student


def _train(loader, teacher, student):
    trainer = ardir.Trainer(student, loader, teacher=teacher, method="ardir", epochs=2, lr=0.1, progress=False,
                            eps=0.1, step_size=0.03, steps=3, random_start="none", w_ce=0.5)
    trainer.fit()
    return trainer


def _torchrun_env(rank, port):
    """What torchrun sets for process ``rank`` of WORLD (the code under test joins the group itself, or the
    worker calls distributed.init)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _worker(rank, port, out):
    _torchrun_env(rank, port)
    distributed.init(backend="gloo", timeout_s=120)
    try:
        teacher, student = _models()
        if rank == 1:  # rank 0's weights must win the start broadcast
            with torch.no_grad():
                for p in student.parameters():
                    p.add_(1.0)
        dataset = _data()
        # a plain loader of the global batch: the trainer shards it (DistributedSampler, GLOBAL_BATCH / WORLD each)
        loader = DataLoader(dataset, batch_size=GLOBAL_BATCH, shuffle=True, drop_last=True)
        calls = []
        real = dist.all_reduce
        dist.all_reduce = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        trainer = _train(loader, teacher, student)
        assert isinstance(trainer.train_loader.sampler, DistributedSampler)
        assert trainer.train_loader.batch_size == GLOBAL_BATCH // WORLD
        # one gradient all-reduce per step (the attack adds none) + one for the epoch's sums, per epoch
        # (no BatchNorm buffers to average); validate's count sum is not called here
        n_calls = len(calls)
        # PGD on a DDP-wrapped model attacks the bare module: no collective during the attack
        ddp = nn.parallel.DistributedDataParallel(student)
        calls.clear()
        ardir.PGD(ddp, eps=0.1, step_size=0.03, steps=3)(dataset.tensors[0][:4], dataset.tensors[1][:4])
        attack_calls = len(calls)
        dist.all_reduce = real
        state = {"student": student.state_dict(), "adapters": trainer.method.state_dict(),
                 "history": trainer.history, "calls": n_calls, "attack_calls": attack_calls}
        torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


def _spawn(fn, *args, timeout_s=240):
    """``mp.spawn`` of WORLD processes running ``fn(rank, free_port, *args)``, killed and failed after ``timeout_s``
    (a collective that never completes would otherwise hang the suite for the process group's 30 minutes)."""
    context = mp.spawn(fn, args=(_free_port(), *args), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"{fn.__name__} did not finish within {timeout_s} s (a deadlock between the processes?)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    _spawn(_worker, out)
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


def test_two_processes_match_one_process_on_the_same_global_batch(two_process_run):
    teacher, student = _models()
    dataset = _data()
    # the same shuffle as the 2-process DistributedSampler (it depends on seed + epoch only), one process
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0)
    trainer = _train(DataLoader(dataset, batch_size=GLOBAL_BATCH, sampler=sampler, drop_last=True),
                     teacher, student)
    for r in range(WORLD):
        got = two_process_run[r]
        for name, value in student.state_dict().items():
            torch.testing.assert_close(got["student"][name], value, rtol=1e-4, atol=1e-5, msg=f"rank {r}: {name}")
        for name, value in trainer.method.state_dict().items():
            torch.testing.assert_close(got["adapters"][name], value, rtol=1e-4, atol=1e-5)
        # the epoch records are means over all processes, equal to the one-process means
        for mine, theirs in zip(trainer.history, got["history"]):
            assert theirs["loss"] == pytest.approx(mine["loss"], rel=1e-4)
    assert trainer.method.adapters[0].is_identity is False  # the adapter was trained and averaged too


def test_no_collective_in_the_attack(two_process_run):
    for got in two_process_run:
        assert got["calls"] == 2 * (STEPS + 1)  # 2 epochs x (3 gradient all-reduces + 1 for the epoch means)
        assert got["attack_calls"] == 0


def test_single_process_helpers_are_no_ops(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main_process()
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1, 1, 1]
    loader = DataLoader(_data(), batch_size=4)
    assert distributed.shard_loader(loader) is loader
    assert distributed.join(torch.device("cpu")) == (torch.device("cpu"), False)  # no WORLD_SIZE: nothing to join
    before = torch.get_rng_state()
    distributed.own_random_stream()
    assert torch.equal(torch.get_rng_state(), before)


def test_shard_sampler_covers_every_index_once():
    shards = [list(distributed.ShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and [len(s) for s in shards] == [4, 3, 3]


# ------------------------------------------------------------- shard_loader and GPULoader in a pretend process group
def _pretend_rank(monkeypatch, r, world=2):
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: r)
    monkeypatch.setattr(distributed, "shared_seed", lambda seed: seed)


def _indices(loader):
    return [int(i) for _, labels in loader for i in labels]


def test_shards_stay_inside_the_loaders_own_sampler(monkeypatch):
    """A SubsetRandomSampler's subset (say, a held-out split) is all the shards read, in training and evaluation;
    a sequential loader stays in order; a sampler ardir cannot split is refused by name."""
    dataset = TensorDataset(torch.zeros(12, 1), torch.arange(12))
    subset = list(range(6))
    shards = {}
    for r in range(2):
        _pretend_rank(monkeypatch, r)
        sub = DataLoader(dataset, batch_size=2, sampler=torch.utils.data.SubsetRandomSampler(subset))
        train = distributed.shard_loader(sub, training=True, keep_global_batch=True)
        evaluation = distributed.shard_loader(DataLoader(dataset, batch_size=2, sampler=[0, 1, 2]), training=False)
        ordered = distributed.shard_loader(DataLoader(dataset, batch_size=4), training=True, keep_global_batch=True)
        shards[r] = (_indices(train), _indices(evaluation), _indices(ordered))
        weighted = DataLoader(dataset, batch_size=2,
                              sampler=torch.utils.data.WeightedRandomSampler(torch.ones(12), 12))
        with pytest.raises(ValueError, match="WeightedRandomSampler.*cannot be split over 2 processes"):
            distributed.shard_loader(weighted, training=True)
    assert sorted(shards[0][0] + shards[1][0]) == subset
    assert sorted(shards[0][1] + shards[1][1]) == [0, 1, 2]
    assert shards[0][2] == [0, 2, 4, 6, 8, 10] and shards[1][2] == [1, 3, 5, 7, 9, 11]


def test_training_shuffle_follows_the_loaders_seed(monkeypatch):
    _pretend_rank(monkeypatch, 0)
    dataset = TensorDataset(torch.zeros(32, 1), torch.arange(32))
    orders = [_indices(distributed.shard_loader(
        DataLoader(dataset, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(seed)),
        keep_global_batch=True)) for seed in (1, 2, 1)]
    assert orders[0] != orders[1] and orders[0] == orders[2]


def test_gpu_loader_shards_are_the_one_process_batch(monkeypatch):
    """Shuffle and augmentation are drawn for the global batch: the processes' shards interleave into exactly what
    one process reads, crops included; from_loader keeps a DataLoader's batch as the global batch."""
    from ardir.gpu_data import GPULoader
    images = torch.randint(0, 256, (40, 1, 6, 6), dtype=torch.uint8)
    labels = torch.arange(40)
    make = lambda **k: GPULoader(images, labels, device="cpu", crop_padding=2, hflip=True, seed=3, **k)  # noqa: E731
    whole = list(make(batch_size=8, rank=0, world_size=1))
    parts = [list(make(batch_size=4, rank=r, world_size=2)) for r in range(2)]
    for (x, y), (x0, y0), (x1, y1) in zip(whole, *parts):
        assert torch.equal(x[0::2], x0) and torch.equal(x[1::2], x1)
        assert torch.equal(y[0::2], y0) and torch.equal(y[1::2], y1)
    default = GPULoader(images, labels, batch_size=8).device.type  # no device given: the GPU when there is one
    assert default == ("cuda" if torch.cuda.is_available() else "cpu")
    _pretend_rank(monkeypatch, 1)
    dataset = ardir.data.InMemoryImageDataset(images, labels, 2, True, augment=True)
    assert GPULoader.from_loader(DataLoader(dataset, batch_size=8), device="cpu").batch_size == 4
    with pytest.raises(ValueError, match="batch size 9 does not split over 2 processes"):
        GPULoader.from_loader(DataLoader(dataset, batch_size=9), device="cpu")


# ------------------------------------------------- the CLI under torchrun, and skipped batches' means, 2 processes
def _nan_skip_run():
    """One epoch of 2 global batches of 8, the second holding a NaN image: skipped by nan_policy="skip"."""
    torch.manual_seed(0)
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 4
    x[9, 0, 0, 0] = float("nan")
    trainer = ardir.Trainer(NoBNNet(), DataLoader(TensorDataset(x, y), batch_size=8), method="natural", epochs=1,
                            lr=0.01, progress=False, channels_last=False, nan_policy="skip")
    return trainer.fit()[-1]


EVAL_ARGS = ["--attacks", "natural", "pgd2", "--n-examples", "24", "--batch-size", "8", "--no-checks", "--quiet",
             "--device", "cpu"]


def _cli_worker(rank, port, out, phase):
    """One phase per spawn (a process joins one group in its life: no port reuse between phases)."""
    _torchrun_env(rank, port)
    from ardir import cli
    result = {}
    if phase == "train":
        joined = []
        real_init = distributed.init
        distributed.init = lambda **k: (joined.append(k), real_init(**k))[1]
        result["code"] = cli.main(["train", "--dataset", "fashion-mnist", "--fake-data", "--model", "cnn_small",
                                   "--train-size", "64", "--val-size", "16", "--batch-size", "16", "--epochs", "2",
                                   "--steps", "1", "--val-attack-steps", "1", "--eps", "0.1", "--step-size", "0.05",
                                   "--method", "at", "--quiet", "--device", "cpu", "--output-dir",
                                   os.path.join(out, "run")])
        result["joined"] = joined
    elif phase == "eval":
        result["code"] = cli.main(["eval", "--checkpoint", os.path.join(out, "run", "last.pt"), *EVAL_ARGS])
    else:
        distributed.init(backend="gloo", timeout_s=120)
        try:
            result["record"] = _nan_skip_run()
        finally:
            distributed.cleanup()
    torch.save(result, os.path.join(out, f"{phase}{rank}.pt"))


def _run_phase(out, phase):
    _spawn(_cli_worker, str(out), phase)
    return [torch.load(out / f"{phase}{r}.pt", weights_only=False) for r in range(WORLD)]


def test_cli_under_torchrun_trains_one_run_written_by_rank_0(tmp_path):
    from ardir import cli
    got = _run_phase(tmp_path, "train")
    assert [g["code"] for g in got] == [0, 0] and all(g["joined"] == [{"backend": "gloo"}] for g in got)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]  # one writer, not one per process
    assert (tmp_path / "run" / "last.pt").is_file() and (tmp_path / "run" / "config.toml").is_file()
    # `torchrun -m ardir eval`: the test batches split over the processes, one report, the one-process one
    assert [g["code"] for g in _run_phase(tmp_path, "eval")] == [0, 0]
    two = json.loads((tmp_path / "run" / "last_report.json").read_text())
    assert cli.main(["eval", "--checkpoint", str(tmp_path / "run" / "last.pt"), *EVAL_ARGS]) == 0
    one = json.loads((tmp_path / "run" / "last_report.json").read_text())
    assert two["n_examples"] == 24 and two["per_sample"] == one["per_sample"]


def test_skipped_batches_leave_every_processs_count(tmp_path):
    """nan_policy="skip" in 2 processes: the epoch's mean loss is the one-process mean."""
    one = _nan_skip_run()
    for g in _run_phase(tmp_path, "nan"):
        assert g["record"]["skipped_batches"] == 1
        assert g["record"]["loss"] == pytest.approx(one["loss"], rel=1e-5)


def _example_worker(rank, port, out):
    import importlib.util
    _torchrun_env(rank, port)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "cifar10.py")
    spec = importlib.util.spec_from_file_location("cifar10_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    rows = example.main(["--fake-data", "--epochs", "1", "--limit-batches", "2", "--output-dir", out, "--quiet",
                         "--device", "cpu", "--n-examples", "8"])
    torch.save({"rows": None if rows is None else [name for name, _ in rows]}, os.path.join(out, f"ex{rank}.pt"))


@pytest.mark.slow
def test_cifar10_example_under_torchrun(tmp_path):
    """`torchrun --nproc_per_node=2 examples/cifar10.py`: both processes train, rank 0 alone writes and evaluates."""
    _spawn(_example_worker, str(tmp_path))
    got = [torch.load(tmp_path / f"ex{r}.pt", weights_only=False)["rows"] for r in range(WORLD)]
    assert got == [["teacher", "student (ResNet-18, ARDIR)"], None]
    assert {"teacher.pt", "student.pt", "results.md"} <= {p.name for p in tmp_path.iterdir()}


# ------------------------------------------------------------------------- ardir.evaluate split over 2 processes
def _eval_data():
    g = torch.Generator().manual_seed(1)
    images, labels = torch.rand(37, 1, 8, 8, generator=g), torch.randint(0, 4, (37,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=8)  # 5 batches, the last of 5 images


def _eval_model():
    torch.manual_seed(0)
    return NoBNNet(width=6).eval()


def _eval_worker(rank, port, out):
    _torchrun_env(rank, port)
    distributed.init(backend="gloo", timeout_s=120)
    try:
        report = ardir.evaluate(_eval_model(), _eval_data(), eps=0.1, attacks=["natural", "pgd5", "cw5"],
                                eps_sweep=[0.05], progress=False, state_path=os.path.join(out, "state.json"))
        torch.save(report.to_dict(), os.path.join(out, f"report{rank}.pt"))
    finally:
        distributed.cleanup()


def test_evaluate_split_over_processes_is_the_one_process_report(tmp_path):
    """Each process attacks every other batch; the gathered report, per sample and sanity checks included, is the
    one-process report on both; each process keeps its own state file."""
    _spawn(_eval_worker, str(tmp_path))
    one = ardir.evaluate(_eval_model(), _eval_data(), eps=0.1, attacks=["natural", "pgd5", "cw5"], eps_sweep=[0.05],
                         progress=False).to_dict()
    for r in range(WORLD):
        got = torch.load(tmp_path / f"report{r}.pt", weights_only=False)
        assert got["n_examples"] == 37 and got["per_sample"] == one["per_sample"]
        accuracy = {k: a["accuracy"] for k, a in one["attacks"].items()}
        assert {k: a["accuracy"] for k, a in got["attacks"].items()} == accuracy
        assert got["sweep"] == one["sweep"] and got["warnings"] == one["warnings"]
        assert got["gradient_check"] == one["gradient_check"]
    assert sorted(p.name for p in tmp_path.glob("state.json.rank*")) == ["state.json.rank0", "state.json.rank1"]


def test_shard_loader_infers_evaluation_from_a_sequential_loader(monkeypatch):
    dataset = TensorDataset(torch.zeros(5, 1), torch.arange(5))
    seen = []
    for r in range(2):
        _pretend_rank(monkeypatch, r)
        seen += _indices(distributed.shard_loader(DataLoader(dataset, batch_size=2)))
    assert sorted(seen) == [0, 1, 2, 3, 4]  # every example once: no padding


def _stuck_worker(rank, port):
    time.sleep(600)


def test_a_stuck_spawn_fails_instead_of_hanging():
    with pytest.raises(pytest.fail.Exception, match="_stuck_worker did not finish within 2 s"):
        _spawn(_stuck_worker, timeout_s=2)


# ------------------------------------------------------------------ a mid-epoch checkpoint in 2 processes
class BNNet(NoBNNet):
    def __init__(self):
        super().__init__(width=6)
        self.conv = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6))


def _resume_worker(rank, port, out, resume_from):
    _torchrun_env(rank, port)
    distributed.init(backend="gloo", timeout_s=120)
    try:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        dataset = TensorDataset(torch.rand(48, 1, 8, 8, generator=g), torch.randint(0, 4, (48,), generator=g))
        trainer = ardir.Trainer(BNNet(), DataLoader(dataset, batch_size=8, shuffle=True, drop_last=True),
                                method="at", epochs=2, lr=0.05, progress=False, channels_last=False, eps=0.1,
                                step_size=0.05, steps=2, checkpoint_dir=os.path.join(out, "ck"),
                                checkpoint_every_steps=2, keep_last=20)
        start = ardir.PGD(trainer.student, eps=0.1).start(dataset.tensors[0][:2])  # this process's random stream
        if resume_from:
            trainer.resume(resume_from)
        trainer.fit()
        torch.save({"student": trainer.student.state_dict(), "history": trainer.history, "start": start},
                   os.path.join(out, f"resume{rank}.pt"))
    finally:
        distributed.cleanup()


def test_mid_epoch_resume_in_two_processes_is_exact(tmp_path):
    """Each process resumes from its own share of rank 0's checkpoint (random starts, BatchNorm statistics, partial
    sums): the resumed run equals the uninterrupted one bit for bit, on both processes."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    full.mkdir()
    resumed.mkdir()
    _spawn(_resume_worker, str(full), "")
    mid = sorted((full / "ck").glob("epoch-0001-step-000000008.pt"))  # mid-way through the second epoch
    assert mid, sorted(p.name for p in (full / "ck").iterdir())
    _spawn(_resume_worker, str(resumed), str(mid[0]))
    for r in range(WORLD):
        a = torch.load(full / f"resume{r}.pt", weights_only=False)
        b = torch.load(resumed / f"resume{r}.pt", weights_only=False)
        assert all(torch.equal(a["student"][k], b["student"][k]) for k in a["student"]), r
        assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    first = torch.load(full / "resume0.pt", weights_only=False)["student"]
    other = torch.load(full / "resume1.pt", weights_only=False)["student"]
    assert all(torch.equal(first[k], other[k]) for k in first)  # one model everywhere
    starts = [torch.load(full / f"resume{r}.pt", weights_only=False)["start"] for r in range(WORLD)]
    assert not torch.equal(starts[0], starts[1])  # but each process draws its own random starts


def _rank0_settings_worker(rank, port, out):
    """checkpoint_dir (mid-epoch checkpoints) and a randomness-using callback on rank 0 alone."""
    _torchrun_env(rank, port)
    distributed.init(backend="gloo", timeout_s=120)
    try:
        for phase in ("full", "resumed"):
            torch.manual_seed(0)
            g = torch.Generator().manual_seed(0)
            dataset = TensorDataset(torch.rand(32, 1, 8, 8, generator=g), torch.randint(0, 4, (32,), generator=g))
            on_rank0 = dict(checkpoint_dir=os.path.join(out, phase), checkpoint_every_steps=3,
                            callbacks=[lambda trainer, record: torch.rand(3)]) if rank == 0 else {}
            trainer = ardir.Trainer(BNNet(), DataLoader(dataset, batch_size=8, shuffle=True, drop_last=True),
                                    method="at", epochs=2, lr=0.05, progress=False, channels_last=False, eps=0.1,
                                    step_size=0.05, steps=2, keep_last=20, **on_rank0)
            if phase == "resumed":  # from the end of epoch 1, written after rank 0's callback drew numbers
                trainer.resume(os.path.join(out, "full", "epoch-0001-step-000000004.pt"))
            trainer.fit()
            torch.save(trainer.student.state_dict(), os.path.join(out, f"{phase}{rank}.pt"))
    finally:
        distributed.cleanup()


def test_checkpoint_settings_on_rank_0_alone(tmp_path):
    """Only rank 0 writes, so only rank 0 may be given checkpoint_dir and callbacks: no deadlock, and a resume is
    exact even when rank 0's callback draws random numbers."""
    _spawn(_rank0_settings_worker, str(tmp_path), timeout_s=120)
    assert (tmp_path / "full" / "epoch-0000-step-000000003.pt").is_file()  # a mid-epoch one
    for r in range(WORLD):
        a, b = (torch.load(tmp_path / f"{phase}{r}.pt", weights_only=False) for phase in ("full", "resumed"))
        assert all(torch.equal(a[k], b[k]) for k in a), r


def test_a_two_process_checkpoint_resumed_in_one_process_warns():
    dataset = TensorDataset(torch.rand(16, 1, 8, 8), torch.randint(0, 4, (16,)))
    trainer = ardir.Trainer(NoBNNet(), DataLoader(dataset, batch_size=8), method="natural", epochs=1, progress=False)
    state = trainer.state_dict()
    state["ranks"] = [{"rng": state["rng"], "buffers": {}, "progress": None, "epoch_rng": None}] * 2
    with pytest.warns(UserWarning, match=r"written by 2 process\(es\), this run has 1: every process continues"):
        trainer.load_state_dict(state)
