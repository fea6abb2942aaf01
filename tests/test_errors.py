"""Every bad input fails early with a message naming the argument and the fix; numerical faults stop the run
naming the step, the loss terms and the last good checkpoint (or are skipped and counted)."""
import errno
import math

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

import ardir
from ardir import checkpoint as ck
from conftest import TinyNet

FAST = dict(eps=0.1, step_size=0.03, steps=1)


def loader(n=16, x=None, y=None, batch_size=4):
    x = torch.rand(n, 1, 8, 8) if x is None else x
    y = torch.randint(0, 4, (n,)) if y is None else y
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(0))


def frozen(width=8, num_classes=4):
    return TinyNet(width=width, num_classes=num_classes).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------- unknown names
def test_unknown_method_attack_model_and_layer_suggest_close_matches():
    with pytest.raises(ValueError, match=r"method='ardri' is not a known method; did you mean 'ardir'"):
        ardir.Trainer(TinyNet(), loader(), teacher=frozen(), method="ardri")
    with pytest.raises(ValueError, match=r"loss='kll' is not a known attack loss; did you mean 'kl'"):
        ardir.PGD(TinyNet(), loss="kll")
    with pytest.raises(ValueError, match=r"random_start='unifrom'.*did you mean 'uniform'"):
        ardir.ATTrainer(TinyNet(), loader(), random_start="unifrom")
    with pytest.raises(ValueError, match=r"name='resnet-18' is not a known model.*did you mean 'resnet18'"):
        ardir.models.create("resnet-18")
    with pytest.raises(ValueError, match=r"layers \(student\): TinyNet has no module named 'featurs'; "
                                         r"closest valid names: features"):
        ardir.Trainer(TinyNet(), loader(), teacher=frozen(), layers=[("features", "featurs")], **FAST)


def test_unknown_or_mistyped_configuration_keys():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['taus'\] for method 'ard'; did you mean 'tau'"):
        ardir.ARDTrainer(TinyNet(), loader(), teacher=frozen(), taus=30)
    with pytest.raises(TypeError, match=r"eps='8/255' must be a number, got str"):
        ardir.ATTrainer(TinyNet(), loader(), eps="8/255")
    with pytest.raises(TypeError, match=r"lr='0.1' must be a number"):
        ardir.ATTrainer(TinyNet(), loader(), lr="0.1")
    with pytest.raises(ValueError, match=r"epochs=2.5 must be a whole number >= 0"):
        ardir.ATTrainer(TinyNet(), loader(), epochs=2.5)
    with pytest.raises(ValueError, match=r"nan_policy='ignore' is not a known NaN policy.*valid: 'stop', 'skip'"):
        ardir.ATTrainer(TinyNet(), loader(), nan_policy="ignore")
    with pytest.raises(ValueError, match="checkpoint_every_steps needs checkpoint_dir"):
        ardir.ATTrainer(TinyNet(), loader(), checkpoint_every_steps=10)


def test_configuration_file_keys():
    config = pytest.importorskip("ardir.config")
    with pytest.raises(ValueError, match="epochz"):
        config.check({"epochz": 3})
    with pytest.raises(ValueError, match="epochs.*int"):
        config.check({"epochs": "ten"})


# ---------------------------------------------------------------------------------- attack settings
@pytest.mark.parametrize("kwargs,pattern", [
    (dict(eps=0.0), r"eps=0.0 is outside \(0, 1\].*8/255"),
    (dict(eps=-0.1), r"eps=-0.1 is outside \(0, 1\]"),
    (dict(eps=1.5), r"eps=1.5 is outside \(0, 1\]"),
    (dict(steps=-1), r"steps=-1 must be a whole number >= 0"),
    (dict(step_size=0.0), r"step_size=0.0 must be > 0"),
    (dict(step_size=-0.01), r"step_size=-0.01 must be > 0"),
])
def test_attack_settings(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        ardir.ATTrainer(TinyNet(), loader(), **kwargs)


# ---------------------------------------------------------------------------------- data
def test_inputs_outside_unit_range_hint_at_normalisation_inside_the_model():
    with pytest.raises(ValueError, match=r"outside \[0, 1\].*put it inside the model"):
        ardir.ATTrainer(TinyNet(), loader(x=torch.randn(16, 1, 8, 8) * 3), progress=False, **FAST).fit()


def test_empty_loaders():
    empty = DataLoader(TensorDataset(torch.rand(0, 1, 8, 8), torch.zeros(0).long()))
    with pytest.raises(ValueError, match="train_loader is empty"):
        ardir.ATTrainer(TinyNet(), empty)
    class NoBatches:  # re-iterable, but no len() and no dataset
        def __iter__(self):
            return iter([])
    with pytest.raises(ValueError, match="train_loader is empty"):
        ardir.ATTrainer(TinyNet(), NoBatches())


def test_labels_out_of_range():
    with pytest.raises(ValueError, match=r"labels range over \[7, 7\] but the student has 4 outputs.*"
                                         r"num_classes=8 or fix the dataset's labels"):
        ardir.ATTrainer(TinyNet(), loader(y=torch.full((16,), 7)), progress=False, **FAST).fit()


# ---------------------------------------------------------------------------------- models
def test_teacher_and_student_class_counts_differ():
    with pytest.raises(ValueError, match="teacher predicts 5 classes but student 4"):
        ardir.ARDTrainer(TinyNet(), loader(), teacher=frozen(num_classes=5))


def test_trainable_teacher_in_train_mode_is_frozen_and_switched_to_eval_with_warnings():
    teacher = TinyNet().train()
    with pytest.warns(UserWarning) as record:
        ardir.ARDTrainer(TinyNet(), loader(), teacher=teacher, **FAST)
    text = " ".join(str(w.message) for w in record)
    assert "switched to eval mode" in text and "froze them" in text
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


class TokenNet(TinyNet):
    """Exposes a 3-d feature (N, C, H*W), which no adapter can match to a (N, D) or (N, C, H, W) feature."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Flatten(2)

    def forward(self, x):
        h = self.body(self.bn(self.conv(x)))
        self.tokens(h)
        return self.fc(self.features(self.pool(h)))


def test_ir_layers_whose_shapes_cannot_be_adapted():
    with pytest.raises(ValueError, match=r"layers \('features', 'tokens'\): cannot adapt a student feature of "
                                         r"shape \(2, 8, 64\).*choose other layers"):
        ardir.Trainer(TokenNet(), loader(), teacher=frozen(), layers=[("features", "tokens")], **FAST)


def test_models_and_data_on_different_devices():
    teacher = frozen().to("meta")
    with pytest.raises(ValueError, match=r"teacher is on meta but student on cpu.*teacher.to\('cpu'\)"):
        ardir.ARDTrainer(TinyNet(), loader(), teacher=teacher)
    split = TinyNet()
    split.fc.to("meta")
    with pytest.raises(ValueError, match=r"student has parameters or buffers on several devices \(cpu, meta\)"):
        ardir.ATTrainer(split, loader())
    # Batches on another device than the model are moved to the model's device, not refused.
    trainer = ardir.ATTrainer(TinyNet(), loader(), epochs=1, progress=False, **FAST)
    assert trainer.fit()[0]["loss"] > 0


# ---------------------------------------------------------------------------------- output
def test_output_directory_not_writable(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    with pytest.raises(PermissionError, match=r"checkpoint directory .*file/run is not writable"):
        ardir.ATTrainer(TinyNet(), loader(), checkpoint_dir=tmp_path / "file" / "run")


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    trainer = ardir.ATTrainer(TinyNet(), loader(), epochs=3, progress=False, checkpoint_dir=tmp_path, **FAST)
    save = ck.torch.save
    calls = []

    def disk_fills_up(obj, f):
        calls.append(1)
        if len(calls) == 2:  # the second epoch's checkpoint
            f.write(b"some bytes")
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, f)

    monkeypatch.setattr(ck.torch, "save", disk_fills_up)
    with pytest.raises(OSError, match=r"could not write .*epoch-0002-step-000000008.pt: No space left on device; "
                                      r"the disk is full; free space and resume"):
        trainer.fit()
    monkeypatch.undo()
    assert ck.load_checkpoint(tmp_path / "last.pt")["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch-0001-step-000000004.pt", "last.pt"]
    again = ardir.ATTrainer(TinyNet(), loader(), epochs=3, progress=False, checkpoint_dir=tmp_path, **FAST)
    assert again.resume(tmp_path).name == "epoch-0001-step-000000004.pt" and again.epoch == 1
    assert len(again.fit()) == 3


# ---------------------------------------------------------------------------------- numerical faults
def poison(trainer, steps, value=float("nan")):
    """The loss terms of the batches after optimiser steps ``steps`` become ``value``."""
    forward = trainer.method.forward

    def faulty(*args, **kwargs):
        terms = forward(*args, **kwargs)
        if trainer.step in steps:
            terms = {k: v * value for k, v in terms.items()}
        return terms

    trainer.method.forward = faulty


def test_nan_loss_stops_naming_step_terms_and_last_good_checkpoint(tmp_path):
    trainer = ardir.ATTrainer(TinyNet(), loader(), epochs=3, progress=False, checkpoint_dir=tmp_path,
                              checkpoint_every_steps=2, **FAST)
    poison(trainer, {5})
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    with pytest.raises(FloatingPointError) as info:
        trainer.fit()
    message = str(info.value)
    assert "loss is nan at epoch 2, step 6 (batch 2 of the epoch)" in message
    assert "loss terms: ce_adv=nan" in message
    assert "last good checkpoint: " in message and "epoch-0001-step-000000004.pt" in message
    assert "nan_policy='skip'" in message
    assert all(torch.isfinite(v).all() for v in trainer.student.state_dict().values() if v.is_floating_point())
    assert any(not torch.equal(before[k], v) for k, v in trainer.student.state_dict().items())
    with pytest.raises(FloatingPointError, match=r"loss is inf .*no checkpoint was written yet"):
        other = ardir.ATTrainer(TinyNet(), loader(), epochs=1, progress=False, **FAST)
        poison(other, {0}, float("inf"))
        other.fit()


def test_nan_loss_skip_policy_skips_the_update_and_counts_it():
    trainer = ardir.ATTrainer(TinyNet(), loader(), epochs=2, progress=False, nan_policy="skip", **FAST)
    poison(trainer, {1, 2})
    snapshots = {}
    forward = trainer.method.forward

    def watch(*args, **kwargs):
        snapshots[trainer.step] = {k: v.clone() for k, v in trainer.student.state_dict().items()}
        return forward(*args, **kwargs)

    trainer.method.forward = watch
    history = trainer.fit()
    assert [r["skipped_batches"] for r in history] == [2, 0]
    params = [k for k, _ in trainer.student.named_parameters()]
    for k in params:  # steps 2 and 3 (batches 2 and 3) changed no weight
        assert torch.equal(snapshots[1][k], snapshots[3][k])
    assert not all(torch.equal(snapshots[3][k], snapshots[4][k]) for k in params)
    assert all(math.isfinite(r["loss"]) for r in history)
    assert all(torch.isfinite(p).all() for p in trainer.student.parameters())


def test_gradient_norm_is_logged():
    history = ardir.ATTrainer(TinyNet(), loader(), epochs=2, progress=False, **FAST).fit()
    for record in history:
        assert math.isfinite(record["grad_norm"]) and 0 < record["grad_norm"] <= record["grad_norm_max"]
        assert record["skipped_batches"] == 0


def test_device_side_nan_check_without_host_sync(tmp_path):
    """The accelerator path (flags kept on the device, looked at only at log points, epoch ends and checkpoints),
    exercised on CPU tensors: it names the same step and never saves the poisoned weights."""
    trainer = ardir.ATTrainer(TinyNet(), loader(), epochs=3, progress=False, checkpoint_dir=tmp_path,
                              checkpoint_every_steps=2, **FAST)
    trainer._host_checks = False
    poison(trainer, {5})
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 2, step 6 \(batch 2 of the epoch\); loss "
                                                 r"terms: ce_adv=nan; last good checkpoint: .*step-000000004.pt"):
        trainer.fit()
    assert ck.newest_good(tmp_path).name == "epoch-0001-step-000000004.pt"
    unsaved = ardir.ATTrainer(TinyNet(), loader(), epochs=3, progress=False, **FAST)
    unsaved._host_checks = False
    poison(unsaved, {5})  # found at the end of epoch 2
    with pytest.raises(FloatingPointError, match=r"loss is nan at epoch 2, step 6 .*no checkpoint was written"):
        unsaved.fit()
    skipping = ardir.ATTrainer(TinyNet(), loader(), epochs=2, progress=False, nan_policy="skip", **FAST)
    skipping._host_checks = False
    poison(skipping, {1, 2})
    history = skipping.fit()
    assert [r["skipped_batches"] for r in history] == [2, 0]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in history)
    assert all(torch.isfinite(p).all() for p in skipping.student.parameters())


# ------------------------------------------------------------------------ data and models that do not fit
def test_a_model_with_other_input_channels_is_named_not_a_conv_error():
    three = ardir.models.create("cnn_small", in_chans=3, width=4, num_classes=4)
    with pytest.raises(ValueError, match=r"student cannot take the images, shaped \(2, 1, 8, 8\).*"
                                         r"in_chans"):
        ardir.ATTrainer(three, loader(), **FAST)
    teacher = ardir.models.create("cnn_small", in_chans=3, width=4, num_classes=4).eval().requires_grad_(False)
    with pytest.raises(ValueError, match=r"teacher cannot take the images"):
        ardir.Trainer(TinyNet(), loader(), teacher=teacher, **FAST)


def test_images_of_another_dtype_or_without_channels_are_named_as_such():
    model = ardir.models.create("cnn_small", in_chans=1, width=4, num_classes=4).eval()
    x, y = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match=r"the images are torch.float64 but the model's parameters torch.float32: "
                                         r"convert them \(images.float\(\)\)"):
        ardir.evaluate(model, [(x.double(), y)], eps=0.1, attacks=("natural",), progress=False, checks=False)
    with pytest.raises(ValueError, match=r"images must be shaped \(N, C, H, W\): add the channel dimension"):
        ardir.evaluate(model, [(x[:, 0], y)], eps=0.1, attacks=("natural",), progress=False, checks=False)
    with pytest.raises(ValueError, match=r"student cannot take the images.*torch.float64 but the model's"):
        ardir.ATTrainer(ardir.models.create("cnn_small", in_chans=1, width=4, num_classes=4),
                        [(x.double(), y)], **FAST)


class TupleNet(TinyNet):
    def forward(self, x):
        return super().forward(x), x


def test_a_model_must_return_logits():
    with pytest.raises(TypeError, match=r"student must return logits shaped \(N, num_classes\), got tuple"):
        ardir.ATTrainer(TupleNet(), loader(), **FAST)


@pytest.mark.parametrize("x, y, message", [
    (torch.rand(8, 1, 8, 8).double(), torch.randint(0, 4, (8,)), None),  # float64 is floating point: fine
    ((torch.rand(8, 1, 8, 8) * 255).to(torch.uint8), torch.randint(0, 4, (8,)), r"images must be a floating-point tensor .* got torch.uint8.*ToTensor"),
    (torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,)).float(), r"labels must be int64 .* got torch.float32"),
    (torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8, 1)), r"labels must be int64 .* got torch.int64 \(4, 1\)"),
])
def test_batch_dtypes_are_checked_before_training(x, y, message):
    def run():
        ardir.ATTrainer(TinyNet().double() if x.dtype == torch.float64 else TinyNet(),
                        loader(8, x, y), epochs=1, progress=False, **FAST).fit()
    if message is None:
        run()
        return
    with pytest.raises(TypeError, match=message):
        run()


def test_batches_must_be_pairs():
    triples = [(torch.rand(4, 1, 8, 8), torch.randint(0, 4, (4,)), torch.arange(4))]
    with pytest.raises(TypeError, match=r"train_loader must yield \(images, labels\) batches, got a list of 3"):
        ardir.ATTrainer(TinyNet(), [list(b) for b in triples], epochs=1, progress=False, **FAST).fit()


def test_a_dataset_of_dicts_is_named():
    """A Dataset whose items are dicts (a common Hugging Face shape) gets the trainer's message, not KeyError: 0."""
    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, i):
            return {"image": torch.rand(1, 8, 8), "label": i % 4}

    with pytest.raises(TypeError, match=r"must yield \(images, labels\) batches, got a dict with keys \['image', 'label'\]"):
        ardir.ATTrainer(TinyNet(), DataLoader(Dicts(), batch_size=4), epochs=1, progress=False, **FAST)


def test_a_normalised_or_empty_val_loader_is_refused():
    normalised = loader(8, x=torch.randn(8, 1, 8, 8) * 2)
    trainer = ardir.ATTrainer(TinyNet(), loader(8), val_loader=normalised, epochs=1, progress=False, **FAST)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        trainer.fit()
    trainer = ardir.ATTrainer(TinyNet(), loader(8), val_loader=[], epochs=1, progress=False, **FAST)
    with pytest.raises(ValueError, match=r"val_loader yielded no batch"):
        trainer.fit()


# ------------------------------------------------------------------------------ the trainer's arguments
def test_a_frozen_student_or_the_teacher_as_student():
    with pytest.raises(ValueError, match=r"student has no trainable parameters"):
        ardir.ATTrainer(frozen(), loader(), **FAST)
    net = TinyNet()
    with pytest.raises(ValueError, match=r"teacher is student"):
        ardir.Trainer(net, loader(), teacher=net, **FAST)


def test_a_teacher_given_to_a_method_without_one_is_reported_unused():
    with pytest.warns(UserWarning, match=r"method 'at' uses no teacher; the teacher passed is ignored"):
        ardir.ATTrainer(TinyNet(), loader(), teacher=frozen(), **FAST)


def test_optimizer_scheduler_and_callbacks_of_the_wrong_kind():
    net = TinyNet()
    with pytest.raises(TypeError, match=r"optimizer must be a factory, e\.g\. lambda params: .*got Adam"):
        ardir.ATTrainer(net, loader(), optimizer=torch.optim.Adam(net.parameters()), **FAST)
    with pytest.raises(TypeError, match=r"scheduler must be a factory.*got StepLR"):
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        ardir.ATTrainer(net, loader(), scheduler=torch.optim.lr_scheduler.StepLR(opt, 1), **FAST)
    with pytest.raises(TypeError, match=r"callbacks must be a list .* pass \[fn\]"):
        ardir.ATTrainer(TinyNet(), loader(), callbacks=print, **FAST)
    with pytest.raises(TypeError, match=r"callbacks: 1 is not callable"):
        ardir.ATTrainer(TinyNet(), loader(), callbacks=[1], **FAST)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(milestones=[0.5, 0.75], epochs=10), ValueError, r"look like fractions.*\[5, 8\]"),
    (dict(milestones=[0, 3]), ValueError, r"milestones=0 must be a whole number >= 1"),
    (dict(milestones="5"), TypeError, r"milestones='5' must be a list of epoch numbers"),
    (dict(lr_gamma=-1.0), ValueError, r"lr_gamma=-1.0 must be > 0"),
    (dict(lr=float("inf")), ValueError, r"lr=inf must be a finite number"),
    (dict(weight_decay=float("nan")), ValueError, r"weight_decay=nan must be a finite number"),
    (dict(momentum="0.9"), TypeError, r"momentum='0.9' must be a number"),
    (dict(limit_batches=0), ValueError, r"limit_batches=0 must be a whole number >= 1"),
])
def test_schedule_and_optimiser_settings_are_checked(kwargs, error, message):
    with pytest.raises(error, match=message):
        ardir.ATTrainer(TinyNet(), loader(), **FAST, **kwargs)


def test_milestones_after_the_last_epoch_warn():
    with pytest.warns(UserWarning, match=r"milestones \[20\] lie after the last epoch \(10\)"):
        ardir.ATTrainer(TinyNet(), loader(), epochs=10, milestones=[5, 20], **FAST)


def test_numpy_numbers_are_numbers():
    np = pytest.importorskip("numpy")
    trainer = ardir.ATTrainer(TinyNet(), loader(), epochs=np.int64(2), eps=np.float32(0.1), step_size=0.03,
                              steps=np.int64(1))
    assert trainer.epochs == 2 and isinstance(trainer.epochs, int)
    assert trainer.method.eps == pytest.approx(0.1) and trainer.method.steps == 1


# ---------------------------------------------------------------------------------- the methods' arguments
def test_create_method_names_valid_arguments_and_ignores_case():
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['taus'\] for method 'ard'; did you mean 'tau'"):
        ardir.create_method("ard", taus=30)
    assert ardir.create_method("ARD").name == "ard"


@pytest.mark.parametrize("method, kwargs, message", [
    ("trades", dict(beta=-1.0), r"beta=-1.0 must be >= 0"),
    ("iad", dict(beta=-0.1), r"beta=-0.1 must be >= 0"),
    ("rslad", dict(adv_weight=2.0), r"adv_weight=2.0 must be in \[0, 1\]"),
    ("ardir", dict(w_ir=float("nan")), r"w_ir=nan must be a finite number"),
    ("ardir", dict(w_kl=-1.0), r"w_kl=-1.0 must be >= 0"),
    ("ardir", dict(layers=["features"], layer_weights=[-1.0]), r"layer_weights=-1.0 must be >= 0"),
    ("ard", dict(tau=float("inf")), r"tau=inf must be a finite number"),
])
def test_method_weights_are_checked(method, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ardir.create_method(method, **kwargs)


def test_ardir_layers_may_be_one_name():
    assert ardir.create_method("ardir", layers="features").layers == [("features", "features")]


# ------------------------------------------------------------------------------------------------ PGD
def test_pgd_checks_its_inputs():
    model = TinyNet().eval()
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 4, (4,))
    pgd = ardir.PGD(model, eps=0.1, step_size=0.03, steps=1)
    with pytest.raises(ValueError, match=r"pixel values in \[.*\], outside \[0, 1\].*inside the model"):
        pgd((x - 0.5) / 0.25, y)
    with pytest.raises(TypeError, match=r"images must be a floating-point tensor .* got torch.uint8"):
        pgd((x * 255).to(torch.uint8), y)
    with pytest.raises(TypeError, match=r"labels must be int64 class indices shaped \(4,\), got torch.int64 \(3,\)"):
        pgd(x, y[:3])
    with pytest.raises(TypeError, match=r"images and labels must be tensors, got ndarray"):
        pgd(x.numpy(), y)
    with pytest.raises(TypeError, match=r"target_probs must be probabilities shaped \(N, K\) = \(4, K\)"):
        ardir.PGD(model, eps=0.1, step_size=0.03, steps=1, loss="kl")(x, y, target_probs=torch.rand(3, 4))
    assert pgd(x, y).shape == x.shape


# ----------------------------------------------------------------------------------------------- resume
def test_resume_refuses_a_checkpoint_of_another_method(tmp_path):
    data = loader(8)
    at = ardir.ATTrainer(TinyNet(), data, epochs=1, progress=False, checkpoint_dir=tmp_path, **FAST)
    at.fit()
    trades = ardir.TRADESTrainer(TinyNet(), data, epochs=2, progress=False, **FAST)
    with pytest.raises(ck.CheckpointError, match=r"written by a 'at' run, this trainer runs 'trades'"):
        trades.resume(tmp_path)


# ------------------------------------------------------------------------------------------- evaluate
def test_evaluate_checks_every_batch_and_names_a_model_that_does_not_fit():
    model = TinyNet().eval()
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 4, (8,))
    y[6] = 9  # a class the model does not have, in the second batch (a class-sorted test set)
    with pytest.raises(ValueError, match=r"the batch of samples 4\.\.7: labels range over \[\d, 9\] but the model has 4"):
        ardir.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=4), eps=0.1, attacks=("natural",),
                       progress=False, checks=False, warn=False)
    x[5] += 2  # pixels out of range in a later batch
    y[6] = 0
    with pytest.raises(ValueError, match=r"the batch of samples 4\.\.7 has pixel values in .* outside \[0, 1\]"):
        ardir.evaluate(model, DataLoader(TensorDataset(x, y), batch_size=4), eps=0.1, attacks=("natural",),
                       progress=False, checks=False, warn=False)
    rgb = ardir.models.create("cnn_small", in_chans=3, width=4, num_classes=4)
    with pytest.raises(ValueError, match=r"model cannot take the images, shaped \(4, 1, 8, 8\).*in_chans"):
        ardir.evaluate(rgb, DataLoader(TensorDataset(x[:4].clamp(0, 1), y[:4]), batch_size=4), eps=0.1,
                       attacks=("natural",), progress=False, checks=False, warn=False)


# -------------------------------------------------------------------------- hooks, models, data files
def test_feature_hooks_arguments():
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        ardir.FeatureHooks("resnet18", ["layer4"])
    with pytest.raises(TypeError, match=r"names=None must be module names"):
        ardir.FeatureHooks(TinyNet(), None)
    with pytest.raises(ValueError, match=r"^names: TinyNet has no module named 'fc2'"):
        ardir.FeatureHooks(TinyNet(), ["fc2"])
    hooks = ardir.FeatureHooks(TinyNet(), "fc")
    with hooks:
        with pytest.raises(RuntimeError, match=r"already active"):
            hooks.__enter__()


def test_model_creation_arguments():
    with pytest.raises(TypeError, match=r"name=None must be a model name"):
        ardir.models.create(None)
    with pytest.raises(ValueError, match=r"one value per input channel \(in_chans=3\), got 1 and 1"):
        ardir.models.create("cnn_small", in_chans=3, mean=[0.5], std=[0.25])
    with pytest.raises(ValueError, match=r"in \[0, 1\] pixel units"):
        ardir.models.create("cnn_small", in_chans=1, mean=[125.3], std=[63.0])
    with pytest.raises(ValueError, match=r"std > 0"):
        ardir.models.create("cnn_small", in_chans=1, mean=[0.5], std=[0.0])


def test_a_one_shot_iterator_is_not_a_loader():
    batches = iter([(torch.rand(4, 1, 8, 8), torch.randint(0, 4, (4,)))] * 3)
    with pytest.raises(TypeError, match=r"train_loader is a one-shot iterator \(list_iterator\)"):
        ardir.ATTrainer(TinyNet(), batches, **FAST)


def test_truncated_idx_files_are_named(tmp_path):
    import gzip
    from ardir.data import read_idx
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, 8, 3]) + (60000).to_bytes(4, "big") + (28).to_bytes(4, "big") * 2 + bytes(7840))
    with pytest.raises(ValueError, match=rf"{path} is truncated or corrupt: .* download it again"):
        read_idx(path)
    with gzip.open(path, "wb") as f:
        f.write(b"")
    with pytest.raises(ValueError, match=r"is not an idx file: 0 bytes"):
        read_idx(path)


def test_cli_float_flags_keep_their_message(capsys):
    from ardir.cli import main
    with pytest.raises(SystemExit):
        main(["train", "--eps", "abc"])
    assert "argument --eps: expected a float (or a fraction like \"8/255\"), got str 'abc'" in capsys.readouterr().err


class UnusedLayerNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.spare = nn.Linear(2, 2)  # registered, never called by forward


def test_ardir_layers_that_never_run_and_setup_skipped():
    with pytest.raises(ValueError, match=r"layers \(student\): UnusedLayerNet's \['spare'\] did not run"):
        ardir.Trainer(UnusedLayerNet(), loader(), teacher=frozen(), layers=[("fc", "spare")], **FAST)
    method = ardir.create_method("ardir", layers=["features"])
    x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 4, (4,))
    with pytest.raises(RuntimeError, match=r"ARDIR.setup\(student, teacher, images\) must run"):
        method(TinyNet(), x, y, frozen())


def test_evaluate_argument_kinds_and_a_corrupt_state_file(tmp_path):
    data = DataLoader(TensorDataset(torch.rand(4, 1, 8, 8), torch.randint(0, 4, (4,))), batch_size=4)
    model = TinyNet().eval()
    with pytest.raises(TypeError, match=r"attacks=None must be attack names"):
        ardir.evaluate(model, data, eps=0.1, attacks=None, progress=False)
    report = ardir.evaluate(model, data, eps=0.1, attacks=("natural",), eps_sweep=0.05, large_eps=None,
                            progress=False, warn=False)
    assert set(report.sweep) == {0.05, 0.1}
    state = tmp_path / "state.json"
    state.write_text('{"format": "ardir-eval-st')
    with pytest.raises(ValueError, match=r"state_path .* cannot be read as an evaluation state \(JSONDecodeError"):
        ardir.evaluate(model, data, eps=0.1, attacks=("natural",), state_path=state, progress=False)
    state.write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"is not an ardir evaluation state file \(format 'list'\)"):
        ardir.evaluate(model, data, eps=0.1, attacks=("natural",), state_path=state, progress=False)


def test_cli_counts_and_an_absent_mps_device(capsys, monkeypatch):
    from ardir import cli
    with pytest.raises(SystemExit):
        cli.main(["eval", "--checkpoint", "x.pt", "--batch-size", "0"])
    assert "argument --batch-size: 0 must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["eval", "--checkpoint", "x.pt", "--n-examples", "ten"])
    assert "argument --n-examples: expected a whole number, got 'ten'" in capsys.readouterr().err
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(cli.CLIError, match=r"device 'mps' asked for, but torch sees no Apple GPU"):
        cli._device("mps")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cifar10_example_refuses_cuda_without_a_gpu(capsys):
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "examples" / "cifar10.py"
    spec = importlib.util.spec_from_file_location("cifar10_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with pytest.raises(SystemExit):
        example.parse_args(["--device", "cuda"])
    assert "argument --device: device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu" in capsys.readouterr().err


def test_pgd_and_evaluate_name_bad_labels_and_channels():
    """Out-of-range or (N, 1) labels and images the model cannot take are one sentence, not torch's IndexError."""
    model = TinyNet().eval()
    x = torch.rand(4, 1, 8, 8)
    with pytest.raises(ValueError, match=r"PGD's labels: labels range over \[0, 50\] but the model has 4 outputs"):
        ardir.PGD(model, eps=0.1, steps=1)(x, torch.tensor([0, 1, 2, 50]))
    with pytest.raises(ValueError, match=r"PGD's model cannot take the images, shaped \(2, 3, 8, 8\)"):
        ardir.PGD(model, eps=0.1, steps=1)(torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"the first batch: labels must be int64 class indices shaped \(4,\), got "
                                        r"torch.int64 \(4, 1\)"):
        ardir.evaluate(model, [(x, torch.zeros(4, 1, dtype=torch.long))], eps=0.1, attacks=["natural"], progress=False)
    with pytest.raises(TypeError, match=r"images must be a floating-point tensor .* divide by 255"):
        ardir.evaluate(model, [((x * 255).to(torch.uint8), torch.zeros(4, dtype=torch.long))], eps=0.1,
                       attacks=["natural"], progress=False)
    int32 = ardir.evaluate(model, [(x, torch.zeros(4, dtype=torch.int32))], eps=0.1, attacks=["natural"],
                           progress=False, checks=False)
    assert int32.n_examples == 4


def test_a_preset_trainer_refuses_another_method():
    with pytest.raises(TypeError, match=r"ATTrainer always trains 'at'; for 'trades' use ardir.Trainer\(..., method='trades'\)"):
        ardir.ATTrainer(TinyNet(), loader(), method="trades", epochs=1, progress=False)


def test_preset_trainers_take_their_own_method_and_subclasses_any():
    assert ardir.ATTrainer(TinyNet(), loader(), method=ardir.AT(steps=1), epochs=1, progress=False).method.steps == 1
    assert ardir.IADTrainer(TinyNet(), loader(), teacher=frozen(), method="iad", epochs=1, progress=False)

    class MyTrainer(ardir.Trainer):
        pass

    assert MyTrainer(TinyNet(), loader(), method="at", epochs=1, progress=False).method.name == "at"


def test_an_unregistered_method_prints():
    class Custom(ardir.Method):
        name = "custom"

        def __init__(self, gamma: float = 0.5, **attack):
            super().__init__(**attack)
            self.gamma = gamma

    assert repr(Custom()).startswith("Custom(gamma=0.5, eps=0.031373, step_size=0.0078431, steps=10")


def test_a_step_larger_than_the_radius_is_warned_about_once():
    """A multi-step attack whose step exceeds eps overshoots the ball at every step: one warning per setting,
    naming both values; a one-step attack with a large step (fast AT's 1.25 eps) is a choice, not warned about."""
    import warnings
    from ardir import _checks
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    _checks._WARNED_STEPS.clear()
    with pytest.warns(UserWarning, match=r"step_size=0.05 is larger than eps=0.03 for a 10-step attack"):
        ardir.PGD(model, eps=0.03, step_size=0.05, steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ardir.PGD(model, eps=0.03, step_size=0.05, steps=10)  # the same setting again: already said
        ardir.PGD(model, eps=0.03, step_size=0.0375, steps=1)
        ardir.PGD(model, eps=0.03, step_size=0.0075, steps=10)
    with pytest.warns(UserWarning, match="2.5 \\* eps / steps"):
        ardir.PGD(model, eps=0.5, step_size=0.6, steps=3, norm="l2")


def test_a_mistyped_sweep_attack_is_named_as_sweep_attack():
    model = ardir.models.create("cnn_small", in_chans=1, width=4, num_classes=4).eval()
    with pytest.raises(ValueError, match=r"^sweep_attack='pgdx' is not a known attack.*did you mean 'pgd20'"):
        ardir.evaluate(model, [(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))], sweep_attack="pgdx",
                       progress=False)
