import pytest
import torch
import torchvision

import ardir
from conftest import TinyNet


def test_captures_the_named_module_output_and_cleans_up():
    model = TinyNet().eval()
    x = torch.rand(3, 1, 8, 8)
    with ardir.FeatureHooks(model, ["bn", "features"]) as feats:
        model(x)
        assert torch.allclose(feats["bn"], model.bn(model.conv(x)))
        assert feats["features"].shape == (3, 32)
        assert set(feats) == {"bn", "features"}
    assert not model.bn._forward_hooks and not model.features._forward_hooks


def test_last_forward_wins_and_gradients_flow():
    model = TinyNet().eval()
    with ardir.FeatureHooks(model, ["features"]) as feats:
        model(torch.zeros(2, 1, 8, 8))
        x = torch.rand(2, 1, 8, 8)
        model(x)
        expected = model.features(model.pool(model.body(model.bn(model.conv(x)))))
        assert torch.allclose(feats["features"], expected)
        feats["features"].sum().backward()
    assert model.conv.weight.grad is not None


def test_hooks_removed_on_error():
    model = TinyNet()
    with pytest.raises(RuntimeError):
        with ardir.FeatureHooks(model, ["conv"]):
            raise RuntimeError("boom")
    assert not model.conv._forward_hooks


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError, match="features"):
        ardir.FeatureHooks(TinyNet(), ["featurs"])


def test_reading_before_forward_is_a_clear_error():
    with ardir.FeatureHooks(TinyNet(), ["fc"]) as feats:
        with pytest.raises(KeyError, match="not run yet"):
            feats["fc"]


def test_works_on_torchvision_and_timm_models():
    x = torch.rand(1, 3, 32, 32)
    tv = torchvision.models.resnet18(num_classes=10).eval()
    with ardir.FeatureHooks(tv, ["layer3"]) as feats:
        tv(x)
        assert feats["layer3"].shape == (1, 256, 2, 2)
    timm_model = ardir.models.create("timm/resnet18", num_classes=10).eval()
    with ardir.FeatureHooks(timm_model, ["layer4"]) as feats:
        timm_model(x)
        assert feats["layer4"].shape[:2] == (1, 512)
