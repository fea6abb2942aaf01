"""`ardir eval --model NAME --weights FILE --dataset NAME`: a state_dict trained elsewhere is evaluated like a run's
checkpoint; weights that do not fit, a missing --model and the like are one sentence."""
import json
import pickle

import pytest
import torch

from ardir import cli, data, models
from ardir.checkpoint import CheckpointError
from ardir.teachers import load_weights

TINY_EVAL = ["--fake-data", "--attacks", "natural", "pgd1", "--n-examples", 8, "--batch-size", 8, "--no-checks",
             "--quiet"]


def run(*args):
    return cli.main([str(a) for a in args])


def _always(model, label):
    """``model`` with its classifier made to predict ``label`` for every image."""
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        model.fc.bias[label] = 1.0
    return model


def test_eval_loads_a_ddp_state_dict_and_writes_its_report(tmp_path, capsys):
    labels = [int(data.get_dataset("cifar10", "test", fake=True)[i][1]) for i in range(8)]
    common = max(set(labels), key=labels.count)
    model = _always(models.create("resnet18", num_classes=10, in_chans=3), common)
    weights = tmp_path / "sd.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, weights)
    assert run("eval", "--model", "resnet18", "--weights", weights, "--dataset", "cifar10", *TINY_EVAL) == 0
    report = json.loads((tmp_path / "sd_report.json").read_text())
    expected = 100 * labels.count(common) / 8  # what the file's weights predict, not a fresh model's
    assert report["attacks"]["natural"]["accuracy"] == report["attacks"]["pgd1"]["accuracy"] == expected
    assert report["n_examples"] == 8 and set(report["attacks"]) == {"natural", "pgd1"}
    assert report["dataset"] == "cifar10" and report["eps_value"] == pytest.approx(8 / 255)
    assert "| Natural |" in (tmp_path / "sd_report.md").read_text()
    assert f"wrote {tmp_path / 'sd_report'}.md" in capsys.readouterr().out
    # --output with a suffix: the files Report.save writes (r.md, r.json), and the message names them
    assert run("eval", "--model", "resnet18", "--weights", weights, "--dataset", "cifar10", *TINY_EVAL,
               "--output", tmp_path / "r.md") == 0
    assert (tmp_path / "r.md").is_file() and (tmp_path / "r.json").is_file() and not (tmp_path / "r.md.md").exists()
    assert f"wrote {tmp_path / 'r'}.md and {tmp_path / 'r'}.json" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--weights", "{sd}", "--dataset", "fashion-mnist"], "--weights needs --model NAME, the architecture"),
    (["--weights", "{sd}", "--model", "cnn_small"], "--weights needs --dataset NAME"),
    ([], "pass --checkpoint FILE (an ardir run's best.pt or last.pt), or --weights FILE with --model NAME"),
    (["--checkpoint", "{sd}", "--model", "cnn_small"], "--model describes --weights; an ardir checkpoint records"),
    (["--checkpoint", "{sd}"], "is not an ardir run checkpoint (best.pt or last.pt of `ardir train`); evaluate a "
                               "plain state_dict with --model NAME --weights FILE --dataset NAME"),
    (["--weights", "{sd}", "--model", "cnn_small", "--dataset", "cifar10"],
     "weights {sd} do not fit model cnn_small (10 classes, 3-channel images): key 'block1.0.weight' is "
     "(16, 1, 3, 3) in the file and (16, 3, 3, 3) in the model"),
    (["--weights", "{sd}", "--model", "resnet18", "--dataset", "fashion-mnist"],
     "weights {sd} do not fit model resnet18 (10 classes, 1-channel images): the model's key 'conv1.weight' is "
     "missing from the file ("),
])
def test_eval_errors_are_one_sentence(tmp_path, capsys, argv, message):
    sd = tmp_path / "sd.pt"
    torch.save(models.create("cnn_small", in_chans=1).state_dict(), sd)
    assert run("eval", *[str(a).format(sd=sd) for a in argv], *TINY_EVAL) == 2
    err = capsys.readouterr().err
    assert message.format(sd=sd) in err and "Traceback" not in err and err.count("\n") == 1, err


def test_checkpoint_and_weights_exclude_each_other_and_model_names_are_checked(capsys):
    with pytest.raises(SystemExit):
        run("eval", "--checkpoint", "a.pt", "--weights", "b.pt")
    assert "argument --weights: not allowed with argument --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("eval", "--weights", "b.pt", "--model", "resnet81", "--dataset", "cifar10")
    assert "argument --model: " in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run("eval", "--weights", "b.pt", "--model", "resnet18", "--dataset", "cifar11")
    assert "argument --dataset: " in capsys.readouterr().err


class _RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_weights_load_safely_and_say_what_they_hold(tmp_path, capsys):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"fc.weight": _RunsCode(marker)}, protocol=2))
    assert run("eval", "--model", "cnn_small", "--weights", evil, "--dataset", "mnist", *TINY_EVAL) == 2
    assert "refused" in capsys.readouterr().err and not marker.exists()
    torch.save({"epoch": 3, "net": {"w": 1}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt hold no state_dict \(keys 'epoch', 'net'\)"):
        load_weights(models.create("cnn_small", in_chans=1), tmp_path / "other.pt")
    assert run("eval", "--model", "cnn_small", "--weights", tmp_path / "missing.pt", "--dataset", "mnist") == 2
    assert "does not exist" in capsys.readouterr().err


def test_load_weights_takes_wrappers_and_lets_the_model_keep_its_own_buffers(tmp_path):
    source = models.create("cnn_small", in_chans=1)
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save({"model": state, "epoch": 3}, tmp_path / "w.pt")
    spec = data.get_spec("fashion-mnist")
    target = models.create("cnn_small", in_chans=1, mean=spec.mean, std=spec.std)
    assert load_weights(target, tmp_path / "w.pt") is target
    for key, value in state.items():
        assert torch.equal(target.state_dict()[key], value), key
    assert torch.allclose(target.normalize.mean.flatten(), torch.tensor(spec.mean))  # kept: not in the file
    with pytest.raises(CheckpointError, match=r"extra.pt do not fit model SmallCNN: the file's key 'head.weight' is not in the model$"):
        extra = {**state, "head.weight": torch.zeros(1)}
        torch.save(extra, tmp_path / "extra.pt")
        load_weights(models.create("cnn_small", in_chans=1), tmp_path / "extra.pt")
