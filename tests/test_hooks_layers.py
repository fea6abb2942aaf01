"""Layer names with shapes: ardir.describe_layers runs one sample through a model with a hook on every named module
and leaves the model as it was; `ardir layers --model NAME` prints the table."""
import pytest
import torch
import torch.nn as nn

import ardir
from ardir import cli
from ardir.hooks import LayerInfo, describe_layers, format_layers, layer_names
from conftest import TinyNet


def run(*args):
    return cli.main([str(a) for a in args])


class Unused(TinyNet):
    """TinyNet with a module forward never calls and one it calls twice."""

    def __init__(self):
        super().__init__()
        self.spare = nn.Linear(3, 3)
        self.twice = nn.ReLU()

    def forward(self, x):
        return self.fc(self.features(self.pool(self.twice(self.body(self.twice(self.bn(self.conv(x))))))))


def test_every_named_module_with_its_type_and_output_shape():
    model = TinyNet()
    layers = describe_layers(model, torch.rand(3, 1, 8, 8))
    assert [layer.name for layer in layers] == layer_names(model)
    by_name = {layer.name: layer for layer in layers}
    assert by_name["conv"] == LayerInfo("conv", "Conv2d", (3, 8, 8, 8), 1)
    assert by_name["pool"].shape == (3, 8, 2, 2) and by_name["features"] == LayerInfo("features", "Flatten",
                                                                                      (3, 32), 1)
    assert by_name["fc"].shape == (3, 4) and by_name["body.1"].type == "Conv2d"
    with ardir.FeatureHooks(model, ["features"]) as feats:  # the shape FeatureHooks records
        model.eval()(torch.rand(3, 1, 8, 8))
        assert tuple(feats["features"].shape) == by_name["features"].shape


def test_hooks_removed_modes_restored_no_gradients_also_when_forward_fails():
    model = Unused()
    model.train()
    model.bn.eval()
    modes = {name: m.training for name, m in model.named_modules()}
    layers = {layer.name: layer for layer in describe_layers(model, (2, 1, 8, 8))}  # a shape: a batch of zeros
    assert layers["spare"].calls == 0 and layers["spare"].shape is None
    assert layers["twice"].calls == 2 and layers["twice"].shape == (2, 8, 8, 8)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(not m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    assert model.bn.num_batches_tracked.item() == 0  # eval mode: no BatchNorm statistics were updated
    with pytest.raises(ValueError, match=r"Unused does not run on a batch of shape \(1, 3, 8, 8\): "):
        describe_layers(model, (1, 3, 8, 8))
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(TypeError, match="must be an input batch"):
        describe_layers(model, (1, 0, 8))


def test_format_layers_is_a_table_per_image():
    text = format_layers(describe_layers(Unused(), (2, 1, 8, 8)))
    lines = text.splitlines()
    assert lines[0].split() == ["name", "type", "output", "per", "image"] and set(lines[1]) <= {"-", " "}
    assert any(line.split()[:3] == ["conv", "Conv2d", "8x8x8"] for line in lines)
    assert any(line.split() == ["spare", "Linear", "-", "(not", "run)"] for line in lines)
    assert any(line.startswith("twice") and line.endswith("8x8x8 (last of 2 calls)") for line in lines)
    assert any(line.split() == ["features", "Flatten", "32"] for line in lines)


def test_ardir_layers_prints_the_table(capsys):
    assert run("layers", "--model", "cnn_small", "--dataset", "fashion-mnist") == 0
    out = capsys.readouterr().out
    assert out.startswith("cnn_small on 1x28x28 images, 10 classes: 17 named modules; ARDIR matches features")
    assert "features  Flatten " in out and "block3 " in out


def test_ardir_layers_takes_a_timm_model(capsys):
    pytest.importorskip("timm")
    assert run("layers", "--model", "timm/resnet18") == 0
    out = capsys.readouterr().out
    assert out.startswith("timm/resnet18 on 3x32x32 images, 10 classes: ")
    assert any(line.split()[:3] == ["layer4", "Sequential", "512x1x1"] for line in out.splitlines())
    assert run("layers", "--model", "timm/vit_tiny_patch16_224") == 2  # timm asserts the image size
    err = capsys.readouterr().err
    assert "does not run on a batch of shape (1, 3, 32, 32): Input height (32) doesn't match model (224)" in err
    assert "--in-chans and --image-size" in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--model", "cnn_small", "--dataset", "mnist", "--in-chans", 3], "--in-chans and --image-size describe the "
                                                                     "input when no --dataset does"),
    (["--model", "cnn_large", "--image-size", 2], "cnn_large: SmallCNN does not run on a batch of shape "
                                                  "(1, 3, 2, 2): "),
])
def test_ardir_layers_errors_are_one_sentence(capsys, argv, message):
    assert run("layers", *argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"ardir layers: error: {message}") and err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit):
        run("layers", "--model", "resnet81")
    assert "argument --model: name='resnet81' is not a known model; did you mean 'resnet18'" in \
        capsys.readouterr().err
