"""ardir.config: the one schema behind the TOML keys and the flags; parsing, checking, writing back."""
import inspect
import math
import typing

import pytest
import torch

from ardir import config as cfg
from ardir.cli import build_parser
from ardir.methods import create_method, method_arguments
from ardir.trainer import Trainer


def test_unknown_key_is_an_error_naming_the_key_and_close_matches():
    with pytest.raises(cfg.ConfigError, match=r"unknown key 'epoch'.*did you mean 'epochs'"):
        cfg.parse_toml("epoch = 3\n")
    with pytest.raises(cfg.ConfigError, match=r"unknown key 'wight_decay'.*'weight_decay'"):
        cfg.parse_toml("wight_decay = 0.1\n")
    with pytest.raises(cfg.ConfigError, match=r"unknown key 'zzz'"):
        cfg.parse_toml("zzz = 1\n")


def test_tables_are_refused_the_configuration_is_flat():
    with pytest.raises(cfg.ConfigError, match=r"table \[trainer\]"):
        cfg.parse_toml("[trainer]\nepochs = 3\n")


@pytest.mark.parametrize("text, message", [
    ('epochs = "ten"', r"epochs: expected an int, got str 'ten'"),
    ("epochs = 2.5", r"epochs: expected an int, got float 2.5"),
    ("lr = true", r"lr: expected a float, got bool"),
    ('lr = "fast"', r"lr: expected a float .*got str 'fast'"),
    ("fake_data = 1", r"fake_data: expected a bool .*got int 1"),
    ('milestones = "100"', r"milestones: expected a list of int, got str"),
    ('milestones = [100, "150"]', r"milestones\[1\]: expected an int, got str '150'"),
    ("dataset = 10", r"dataset: expected a str, got int 10"),
])
def test_wrong_types_name_key_expected_and_got(text, message):
    with pytest.raises(cfg.ConfigError, match=message):
        cfg.parse_toml(text)


def test_invalid_toml_names_the_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text("epochs = = 3\n")
    with pytest.raises(cfg.ConfigError, match="run.toml is not valid TOML"):
        cfg.load_toml(path)
    with pytest.raises(cfg.ConfigError, match="does not exist"):
        cfg.load_toml(tmp_path / "missing.toml")


def test_values_are_converted_fractions_and_ints_as_floats():
    values = cfg.parse_toml('eps = "8/255"\nlr = 1\nlayers = ["features", ["block3", "layer4"]]\n')
    assert values["eps"] == pytest.approx(8 / 255)
    assert values["lr"] == 1.0 and isinstance(values["lr"], float)
    assert values["layers"] == ["features", "block3:layer4"]
    assert cfg.layer_specs(values["layers"]) == ["features", ("block3", "layer4")]


def test_resolve_layers_defaults_then_each_mapping_in_turn():
    config = cfg.resolve({"epochs": 5, "lr": 0.05}, {"epochs": 7})
    assert config["epochs"] == 7 and config["lr"] == 0.05
    assert config["method"] == "ardir" and config["batch_size"] == 128
    assert config["tau"] is None  # a method argument left to the method's default


def test_method_arguments_must_belong_to_the_method():
    with pytest.raises(cfg.ConfigError, match=r"tau: method 'at' does not take this argument"):
        cfg.resolve({"method": "at", "tau": 30.0})
    with pytest.raises(cfg.ConfigError, match=r"'ardr' is not a method; did you mean .*'ard'"):
        cfg.resolve({"method": "ardr"})
    config = cfg.resolve({"method": "ard", "tau": 30.0, "eps": "8/255"})
    assert cfg.method_kwargs(config) == {"tau": 30.0, "eps": pytest.approx(8 / 255)}


def test_an_argument_a_method_fixes_is_not_its_argument(tiny):
    # ARDIR builds on ARD but fixes alpha = 1: offering alpha for ARDIR crashed inside ARD.__init__.
    assert "alpha" in method_arguments("ard") and "alpha" not in method_arguments("ardir")
    assert "tau" in method_arguments("ardir") and "eps" in method_arguments("ardir")
    with pytest.raises(cfg.ConfigError, match=r"alpha: method 'ardir' does not take this argument"):
        cfg.resolve({"method": "ardir", "alpha": 0.5})
    loader = [(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))]
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['alpha'\] for method 'ardir'"):
        Trainer(tiny(), loader, teacher=tiny().requires_grad_(False).eval(), alpha=0.5)
    for method in ("at", "trades", "ard", "iad", "rslad", "ardir"):
        create_method(method, **{arg: DEFAULTS_PROBE[arg] for arg in method_arguments(method) if arg in DEFAULTS_PROBE})


DEFAULTS_PROBE = {"eps": 0.1, "step_size": 0.02, "steps": 3, "tau": 2.0, "alpha": 0.5, "beta": 1.0,
                  "kl_reduction": "batchmean", "w_ir": 0.5, "adv_weight": 0.5, "warmup_epochs": 1}


def test_help_is_each_arguments_first_sentence_with_its_continuation_lines():
    keys = cfg.schema()
    # an entry that wraps onto the next docstring line is kept whole up to its first full stop
    assert keys["precision"].help.endswith('or "fp16" (autocast in float16 with a gradient scaler; CUDA).')
    assert "bf16 is the fast choice" not in keys["precision"].help
    assert keys["teacher_input"].help.startswith('the teacher\'s features on the "natural" batch')
    assert '"adversarial"' in keys["teacher_input"].help
    assert not any("``" in option.help for option in keys.values())  # reST literals read as plain text
    # one entry per argument: w_ce, w_kl and w_ir each say which term they weigh
    assert keys["w_ir"].help.startswith("weight of the internal-representation term (1).")
    assert keys["w_kl"].help.startswith("weight of the KL to the teacher's output (1).")
    # one argument with different meanings in different methods says which is which
    assert "iad: exponent" in keys["beta"].help and "trades: weight of the robust KL term (6)" in keys["beta"].help
    assert keys["alpha"].help.endswith("[adaad, ard, iad; default: the method's own]")
    for name, option in keys.items():
        assert option.help, name


def test_schema_covers_every_trainer_and_method_argument():
    keys = cfg.schema()
    hints = typing.get_type_hints(Trainer.__init__)
    plain = (int, float, str, bool, typing.Optional[int], typing.Optional[float], typing.Optional[str],
             typing.Optional[typing.List[int]])
    for p in inspect.signature(Trainer.__init__).parameters.values():
        if p.name in hints and hints[p.name] in plain and p.name not in ("progress", "checkpoint_dir"):
            assert p.name in keys, p.name
    for method in ("at", "trades", "ard", "iad", "rslad", "ardir", "adaad", "mtard"):
        for arg in method_arguments(method):
            assert arg in keys, (method, arg)
    assert keys["natural_teacher"].kind == "str"  # MTARD's: a model from Python, a path or a name in a config


def test_every_key_is_a_flag_and_flags_parse_to_config_values():
    parser = build_parser()
    args = parser.parse_args(["train", "--epochs", "3", "--eps", "8/255", "--milestones", "1", "2",
                              "--fake-data", "--layers", "features", "block3:layer4", "--no-download"])
    flags = {k: v for k, v in vars(args).items() if k in cfg.schema()}
    assert flags == {"epochs": 3, "eps": pytest.approx(8 / 255), "milestones": [1, 2], "fake_data": True,
                     "layers": ["features", "block3:layer4"], "download": False}
    train_help = parser._subparsers._group_actions[0].choices["train"].format_help()
    for option in cfg.schema().values():
        assert option.flag in train_help, option.flag


def test_flags_override_the_config_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('dataset = "fashion-mnist"\nepochs = 10\nlr = 0.05\n')
    config = cfg.resolve(cfg.load_toml(path), {"epochs": 2})
    assert (config["dataset"], config["epochs"], config["lr"]) == ("fashion-mnist", 2, 0.05)


def test_dump_config_round_trips_through_the_parser():
    config = cfg.resolve({"dataset": "fashion-mnist", "eps": 0.1, "milestones": [3, 4], "layers": ["a:b"],
                          "fake_data": True, "data_dir": 'C:\\data "x"', "w_ir": 2.0, "attacks": ["natural"]})
    text = cfg.dump_config(config)
    assert "# epochs = (not set)" in text
    back = cfg.parse_toml(text)
    assert back == {k: v for k, v in config.items() if v is not None}


def test_dump_toml_values_and_one_level_tables():
    import tomllib
    values = {"s": "tab\there\nnew \u0001", "i": -3, "f": 1e-5, "big": 1e300, "t": True, "l": [1.5, 2.0],
              "inf": math.inf, "none": None, "table": {"x": 1, "y": ["a", "b"], "weird key": "v"}}
    text = cfg.dump_toml(values, comments={"i": "a comment"})
    assert "# a comment\ni = -3" in text
    parsed = tomllib.loads(text)
    expected = {k: v for k, v in values.items() if v is not None}
    assert parsed == expected
    with pytest.raises(TypeError, match="one level of tables"):
        cfg.dump_toml({"a": {"b": {"c": 1}}})
    with pytest.raises(TypeError, match="cannot write"):
        cfg.dump_toml({"a": object()})


def test_an_unquoted_fraction_gets_the_hint_to_quote_it():
    """TOML has no arithmetic: ``eps = 8/255`` fails to parse, and the message says how to write it."""
    from ardir.config import ConfigError, parse_toml
    with pytest.raises(ConfigError, match=r'not valid TOML.*write eps = "8/255" in quotes'):
        parse_toml('method = "at"\neps = 8/255  # the radius\n')
    with pytest.raises(ConfigError) as err:
        parse_toml('method = "at"\neps = [\n')  # another mistake: no fraction hint
    assert "fractions" not in str(err.value)
    assert parse_toml('eps = "8/255"\n')["eps"] == pytest.approx(8 / 255)
