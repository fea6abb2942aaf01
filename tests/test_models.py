import pytest
import torch

import ardir
from ardir import models


@pytest.mark.parametrize("name, chans, size, feat", [
    ("resnet18", 3, 32, 512), ("preact_resnet18", 3, 32, 512), ("wrn16_4", 3, 32, 256),
    ("mobilenet_v2", 3, 32, 1280), ("cnn_small", 1, 28, 256), ("cnn_large", 1, 28, 768)])
def test_bundled_models_shapes_and_default_layer(name, chans, size, feat):
    model = models.create(name, num_classes=7, in_chans=chans).eval()
    x = torch.rand(2, chans, size, size)
    with ardir.FeatureHooks(model, model.default_ir_layers) as feats:
        assert model(x).shape == (2, 7)
        assert feats["features"].shape == (2, feat)


def test_wrn_depth_and_width():
    model = models.create("wrn", depth=10, widen_factor=2)
    assert model(torch.rand(1, 3, 32, 32)).shape == (1, 10)
    with pytest.raises(ValueError, match="6n\\+4"):
        models.create("wrn", depth=11)


def test_normalisation_lives_inside_the_model():
    model = models.create("cnn_small", in_chans=1, mean=[0.5], std=[0.25]).eval()
    plain = models.create("cnn_small", in_chans=1).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("normalize")})
    x = torch.rand(2, 1, 28, 28)
    assert torch.allclose(model(x), plain((x - 0.5) / 0.25), atol=1e-5)
    assert "layer" not in " ".join(n for n, _ in model.named_modules() if n.startswith("normalize."))


def test_timm_model_by_name():
    model = models.create("timm/resnet18", num_classes=5, in_chans=1).eval()
    assert model(torch.rand(1, 1, 32, 32)).shape == (1, 5)


def test_unknown_model_lists_close_matches():
    with pytest.raises(ValueError, match="resnet18"):
        models.create("resnet-18")
    with pytest.raises(ValueError, match="timm model"):
        models.create("timm/resnet_eighteen")
