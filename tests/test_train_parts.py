"""The Trainer's collaborators (ardir.train): the method's epoch hook, the run state's round trip, one guarded
optimiser step."""
import pytest
import torch

import ardir
from ardir.train.state import TrainState
from ardir.train.step import Stepper, new_fault
from conftest import TinyNet


def batches(n=2, size=8):
    return [(torch.rand(size, 1, 8, 8), torch.randint(0, 4, (size,))) for _ in range(n)]


def test_the_trainer_tells_the_method_each_epoch_through_on_epoch_start():
    calls = []

    class Watched(ardir.AT):
        def on_epoch_start(self, epoch, epochs, lr_scale=1.0):
            calls.append((epoch, epochs, round(lr_scale, 6)))
            super().on_epoch_start(epoch, epochs, lr_scale)

    method = Watched(eps=0.1, step_size=0.05, steps=1)
    trainer = ardir.Trainer(TinyNet(), batches(), method=method, epochs=3, milestones=[1, 2], progress=False)
    assert calls == [(0, 3, 1.0)]  # when built: the run's length is known before the first epoch
    trainer.fit()
    assert calls[1:] == [(0, 3, 1.0), (1, 3, 0.1), (2, 3, 0.01)]
    assert (method.epoch, method.run_epochs, method.lr_scale) == (2, 3, pytest.approx(0.01))


def test_the_default_on_epoch_start_keeps_what_the_methods_read():
    method = ardir.IAD()
    assert (method.epoch, method.run_epochs, method.lr_scale) == (0, 200, 1.0) and method.warmup == 60
    method.on_epoch_start(4, 10, lr_scale=0.5)
    assert (method.epoch, method.run_epochs, method.lr_scale) == (4, 10, 0.5) and method.warmup == 3


def test_the_train_state_round_trips_mid_epoch():
    loader = batches()
    state = TrainState(epoch=1, step=7, history=[{"epoch": 1, "loss": 0.5}])
    assert state.begin_epoch(loader, torch.device("cpu")) is None  # a fresh epoch: no fault record to restore
    state.add(torch.tensor(2.0), {"ce": torch.tensor(2.0)}, True, 8)
    state.add(torch.tensor(4.0), {"ce": torch.tensor(4.0)}, False, 8)  # a skipped batch counts images, not loss
    assert (state.seen, state.batches, float(state.sums["loss"])) == (16, 2, 16.0)
    saved = state.state_dict(loader, state.progress(new_fault()))
    assert list(saved) == ["epoch", "step", "history", "rng", "progress", "epoch_rng", "ranks"]
    assert list(saved["progress"]) == ["batches", "seen", "sums", "fault"]
    after = torch.rand(3)  # the random states are set back as they were when the state was taken
    restored = TrainState()
    restored.load_state_dict(saved, loader, TinyNet(), world_size=1)
    assert torch.equal(torch.rand(3), after)
    assert (restored.epoch, restored.step, restored.history) == (1, 7, [{"epoch": 1, "loss": 0.5}])
    assert restored.pending is not None  # the next epoch continues from batch 2
    fault = restored.begin_epoch(loader, torch.device("cpu"))
    assert fault == new_fault() and (restored.seen, restored.batches, float(restored.sums["ce"])) == (16, 2, 16.0)
    assert list(restored.epoch_batches(loader)) == []  # both batches were trained on before the checkpoint
    at_epoch_end = state.state_dict(loader)
    assert at_epoch_end["progress"] is None and at_epoch_end["epoch_rng"] is None
    fresh = TrainState()
    fresh.load_state_dict(at_epoch_end, loader, TinyNet(), world_size=1)
    assert fresh.pending is None


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_a_non_finite_step_stops_or_is_skipped_on_the_host(policy):
    model = TinyNet()
    params = list(model.parameters())
    stepper = Stepper(torch.optim.SGD(params, lr=0.1), params, None, torch.device("cpu"), "fp32", policy, 1,
                      lambda: "no checkpoint was written yet")
    stepper.start_epoch(0)
    x, y = batches(1)[0]
    loss = torch.nn.functional.cross_entropy(model(x), y)
    stepper.backward(loss)
    assert stepper.guard(loss, {"ce": loss}, 0, 0, 0, 8) is True and stepper.fault["good_steps"] == 1
    bad = loss.detach() * float("nan")
    if policy == "stop":
        with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 1, step 2 \(batch 2 of the epoch\); "
                                                     r"loss terms: ce=nan; no checkpoint was written yet"):
            stepper.guard(bad, {"ce": bad}, 1, 0, 1, 8)
    else:
        assert stepper.guard(bad, {"ce": bad}, 1, 0, 1, 8) is False
        assert all(p.grad is None for p in params)  # the optimiser leaves every parameter alone
        assert (stepper.fault["skipped"], stepper.fault["skipped_images"]) == (1, 8)
