"""ardir.registry.Registry: the one idiom behind methods, models, data sets and attacks."""
import inspect

import pytest

import ardir
from ardir import data, methods, models
from ardir.evaluation import attacks
from ardir.registry import Registry, UnknownName


@pytest.fixture
def shapes():
    shapes = Registry("shape", normalize=str.lower)

    @shapes.register
    class Square:
        name = "square"

        def __init__(self, side: float = 1.0):
            self.side = side

    @shapes.register("disc")
    def make_disc(radius, colour="red"):
        return ("disc", radius, colour)

    shapes.register("polygon", lambda match, closed=True: int(match[1]), pattern=r"(\d+)-gon",
                    examples=("5-gon",))
    shapes.register("dot", "a plain object", aliases=("point",))
    return shapes


def test_register_create_list_get_and_arguments(shapes):
    assert shapes.list() == ["disc", "dot", "polygon", "square"]
    assert shapes.create("SQUARE", side=2.0).side == 2.0
    assert shapes.create("disc", 3) == ("disc", 3, "red")
    assert shapes.create("7-gon") == 7  # a pattern's entry gets the regex match first
    assert shapes.get("point") == "a plain object" and shapes.get("nope", None) is None
    assert shapes.arguments("square") == {"side": 1.0}
    assert shapes.arguments("disc") == {"radius": inspect.Parameter.empty, "colour": "red"}
    assert shapes.arguments("dot") == {}
    assert "disc" in shapes and sorted(shapes) == shapes.list() and len(shapes) == 4


def test_unknown_name_lists_the_known_ones_and_suggests_the_closest(shapes):
    with pytest.raises(UnknownName, match=r"name='sqare' is not a known shape; did you mean 'square'\? "
                                          r"valid: 'square', 'disc', '5-gon', 'dot', 'point'"):
        shapes.lookup("sqare")
    with pytest.raises(ValueError, match="did you mean 'disc'"):  # a ValueError and a KeyError
        shapes.create("dsic")
    with pytest.raises(KeyError):
        shapes["polygons"]
    with pytest.raises(TypeError, match=r"name=3 must be a shape name \(square, disc, 5-gon, dot, point\)"):
        shapes.lookup(3)
    assert shapes.get("sqare") is None and shapes.get(3, "d") == "d"  # dict.get's contract


def test_unknown_keyword_names_the_valid_ones(shapes):
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['sides'\] for shape 'square'; "
                                        r"did you mean 'side' for 'sides'\? it accepts: side"):
        shapes.create("square", sides=2)


def test_duplicate_names_are_refused_unless_overridden(shapes):
    with pytest.raises(ValueError, match="shape 'disc' is already registered; pass override=True"):
        shapes.register("disc", print)
    with pytest.raises(ValueError, match="shape 'point' is already registered"):
        shapes.register("star", print, aliases=("point",))
    shapes.register("disc", print, override=True)
    assert shapes["disc"] is print
    first = type("Again", (), {"__module__": "cell"})
    again = type("Again", (), {"__module__": "cell"})  # the same class defined again (a re-run notebook cell)
    shapes.register("again", first)
    shapes.register("again", again)
    assert shapes["again"] is again
    with pytest.raises(ValueError, match="already registered"):
        shapes.register("again", type("Other", (), {}))
    shapes["dot"] = "replaced"  # item assignment replaces, as for a dict (monkeypatch.setitem)
    del shapes["polygon"]
    assert shapes.get("dot") == "replaced" and "polygon" not in shapes and shapes.get("5-gon", None) is None


def test_the_four_kinds_are_registries():
    for registry in (methods.METHODS, models.MODELS, data.DATASETS, attacks.ATTACKS):
        assert isinstance(registry, Registry)
    assert models._REGISTRY is models.MODELS
    assert methods.METHODS.list() == ardir.list_methods() and methods.METHODS["ard"] is ardir.ARD
    assert models.MODELS.list() == models.list_models()
    assert data.DATASETS.get("CIFAR_10") is data.get_spec("cifar10") is data.DATASETS["cifar10"]
    assert {"pgd", "cw", "fgsm", "natural", "autoattack", "square"} <= set(attacks.ATTACKS.list())
    assert attacks.parse_attack("pgd-50")[0] is attacks.ATTACKS["pgd"]


def test_arguments_serve_help_for_every_kind():
    assert "tau" in methods.METHODS.arguments("ard") and "eps" in methods.METHODS.arguments("ard")
    assert "alpha" not in methods.METHODS.arguments("ardir")  # ARDIR fixes ARD's alpha
    assert models.MODELS.arguments("wrn")["depth"] == 34
    assert models.MODELS.arguments("wrn34_10") == {"num_classes": 10, "in_chans": 3}
    assert list(attacks.ATTACKS.arguments("pgd")) == ["match", "ctx"]


def test_registered_extensions_are_reachable_through_the_old_names():
    try:
        @methods.register_method
        class Plain(ardir.methods.Natural):
            name = "_plain_test"
        assert ardir.create_method("_PLAIN_TEST").name == "_plain_test"
        models.register_model("_tiny_test")(lambda num_classes=10, in_chans=3: models.SmallCNN(num_classes, in_chans))
        assert models.create("_tiny_test", num_classes=3, in_chans=1).ardir_name == "_tiny_test"
        with pytest.raises(TypeError, match=r"unknown argument\(s\) \['width'\] for model '_tiny_test'"):
            models.create("_tiny_test", width=4)
    finally:
        methods.METHODS.pop("_plain_test", None)
        models.MODELS.pop("_tiny_test", None)


def test_an_attack_rule_without_examples_is_refused_naming_them():
    with pytest.raises(ValueError, match="examples must name at least one attack"):
        attacks.register_attack(r"noise", (), "uniform noise")
