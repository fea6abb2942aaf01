"""Every registered method, model, data set and attack, tested without a hand-kept list: a newly registered entry
is picked up by the registries' ``list()`` and has to pass the same checks as the built-in ones."""
import pytest
import torch
import torch.nn as nn

from ardir import data, models
from ardir.evaluation.attacks import ATTACKS, parse_attack
from ardir.methods import METHODS, Method, create_method

from conftest import TinyNet

# Models above this many parameters take seconds to build and run on a CPU (ResNet-34, the WRN-28-10 and wider);
# their building blocks are those of ResNet-18 and WRN-16-4, which are run.
MAX_PARAMETERS = 12_000_000


def frozen(model: nn.Module) -> nn.Module:
    return model.eval().requires_grad_(False)


# Method arguments that default to None but must be given (MTARD's second teacher), with a stand-in each.
REQUIRED = {"natural_teacher": lambda: frozen(TinyNet())}


def built(name: str) -> Method:
    """``create_method(name)`` with its defaults, plus a stand-in for each required argument it takes."""
    arguments = METHODS.arguments(name)
    given = {key: make() for key, make in REQUIRED.items() if key in arguments and arguments[key] is None}
    return create_method(name, **given)


# ---------------------------------------------------------------------------------------------------- methods
@pytest.mark.parametrize("name", METHODS.list())
def test_every_method_is_documented_and_lists_its_arguments(name):
    cls = METHODS[name]
    assert (cls.__doc__ or "").strip(), f"method {name!r} has no docstring"
    assert cls.name == name
    arguments = METHODS.arguments(name)
    assert {"eps", "step_size", "steps", "norm"} <= set(arguments), arguments  # the threat model of every method
    assert all(not key.startswith("_") for key in arguments)


@pytest.mark.parametrize("name", METHODS.list())
def test_every_method_builds_with_its_defaults_and_trains_one_batch(name):
    torch.manual_seed(0)
    method = built(name)
    assert isinstance(method, Method) and method.name == name
    student, teacher = TinyNet(), frozen(TinyNet(width=6))
    images, labels = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    method.steps = 1  # one attack step keeps the test fast; the loop is the same
    method.on_epoch_start(0, 1)
    method.setup(student, teacher, images)
    terms = method(student.train(), images, labels, teacher)
    assert terms and all(torch.isfinite(value) and value.dim() == 0 for value in terms.values()), terms
    sum(terms.values()).backward()
    assert any(p.grad is not None for p in student.parameters())


# ----------------------------------------------------------------------------------------------------- models
def parameter_count(name: str, in_chans: int) -> int:
    with torch.device("meta"):  # no memory and no initialisation: the count only
        return sum(p.numel() for p in models.create(name, num_classes=10, in_chans=in_chans).parameters())


@pytest.mark.parametrize("name", models.MODELS.list())
def test_every_model_builds_for_10_classes_and_runs_a_forward_pass(name):
    in_chans = models.MODELS.arguments(name).get("in_chans", 3)  # the constructor's own default
    size = 28 if in_chans == 1 else 32  # the 28x28 CNNs take one channel, the CIFAR models three
    count = parameter_count(name, in_chans)
    if count > MAX_PARAMETERS:
        pytest.skip(f"{name} has {count / 1e6:.0f} M parameters (over {MAX_PARAMETERS / 1e6:.0f} M: seconds on a CPU)")
    torch.manual_seed(0)
    model = models.create(name, num_classes=10, in_chans=in_chans).eval()
    with torch.no_grad():
        logits = model(torch.rand(2, in_chans, size, size))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


# -------------------------------------------------------------------------------------------------- data sets
@pytest.mark.parametrize("name", data.DATASETS.list())
def test_every_data_set_has_a_consistent_spec_and_fake_data_of_its_shape(name):
    spec = data.get_spec(name)
    assert spec.name == name and len(spec.mean) == len(spec.std) == spec.in_chans
    assert 0 < spec.eps <= 1 and spec.image_size > 0
    if spec.num_classes is None:
        pytest.skip(f"{name}: its classes are the folders of a directory of images, so it has no fake data")
    test = data.get_dataset(name, "test", fake=True)
    image, label = test[0]
    assert image.shape == (spec.in_chans, spec.image_size, spec.image_size)
    assert 0 <= image.min() and image.max() <= 1 and 0 <= label < spec.num_classes


# ---------------------------------------------------------------------------------------------------- attacks
@pytest.mark.parametrize("name", ATTACKS.list())
def test_every_attack_rule_has_a_summary_and_its_examples_parse_back_to_it(name):
    spec = ATTACKS[name]
    assert spec.summary.strip() and spec.examples
    for example in spec.examples:
        rule, match = parse_attack(example)
        assert rule is spec, (example, rule.name)
    assert callable(spec.build)
