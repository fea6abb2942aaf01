"""Data-parallel training on CPU: 2 processes with the gloo backend against one process on the same global batch.

BatchNorm normalises each process's shard with its own batch statistics (as DDP does), so per-process results
differ from one process on the whole batch by design; the equality test uses models without BatchNorm.
"""
import os
import socket

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


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.init(backend="gloo")
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
        ardir.PGD(ddp, eps=0.1, alpha=0.03, steps=3)(dataset.tensors[0][:4], dataset.tensors[1][:4])
        attack_calls = len(calls)
        dist.all_reduce = real
        state = {"student": student.state_dict(), "adapters": trainer.method.state_dict(),
                 "history": trainer.history, "calls": n_calls, "attack_calls": attack_calls}
        torch.save(state, os.path.join(out, f"rank{rank}.pt"))
    finally:
        distributed.cleanup()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ddp"))
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
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


def test_single_process_helpers_are_no_ops():
    assert not distributed.is_distributed() and distributed.world_size() == 1 and distributed.is_main_process()
    t = torch.ones(3)
    assert distributed.all_reduce_sum(t) is t and t.tolist() == [1, 1, 1]
    loader = DataLoader(_data(), batch_size=4)
    assert distributed.shard_loader(loader) is loader


def test_shard_sampler_covers_every_index_once():
    shards = [list(distributed.ShardSampler(10, 3, r)) for r in range(3)]
    assert sorted(sum(shards, [])) == list(range(10)) and [len(s) for s in shards] == [4, 3, 3]
