"""A run directory written by ardir 0.1.0 still resumes. ``tests/fixtures/run-0.1.0`` is the run directory
(``last.pt``, ``best.pt``, ``config.toml``, ``metrics.jsonl``) of a 1-epoch ``ardir train`` (fake Fashion-MNIST,
cnn_small, 32 images, AT, ``--device cpu``) written by that release; its ``last.pt`` (format ``ardir-run``) carries
the run's own copy of the random states (``rng``) beside the trainer's."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from ardir import checkpoint as ck
from ardir import cli
from ardir._cli_resume import save_last
from ardir.trainer import Trainer

OLD_RUN = Path(__file__).parent / "fixtures" / "run-0.1.0"


def test_a_run_written_by_0_1_0_resumes_from_its_random_states_and_finishes(tmp_path, monkeypatch):
    out = tmp_path / "run"
    shutil.copytree(OLD_RUN, out)
    old = ck.load_checkpoint(out / "last.pt")
    assert old["format"] == "ardir-run" and old["epoch"] == 1 and "rng" in old  # the fixture is what 0.1.0 wrote
    first_line = (out / "metrics.jsonl").read_text().splitlines()[0]
    drawn_from = []
    train_epoch = Trainer.train_epoch

    def recording_train_epoch(self):
        drawn_from.append(torch.get_rng_state())
        return train_epoch(self)
    monkeypatch.setattr(Trainer, "train_epoch", recording_train_epoch)
    torch.manual_seed(123)  # the resumed run must not depend on the process's RNG
    assert cli.main(["train", "--output-dir", str(out), "--resume", "--epochs", "2"]) == 0
    assert torch.equal(drawn_from[0], old["rng"]["torch"])  # epoch 2 draws from the states 0.1.0 saved
    last = ck.load_checkpoint(out / "last.pt")
    assert last["epoch"] == 2 and last["step"] == 4 and last["config"]["model"] == "cnn_small"
    assert any(not torch.equal(last["model"][k], old["model"][k]) for k in old["model"])  # it trained on
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert lines[0] == first_line and [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert ck.load_checkpoint(out / "best.pt")["epoch"] == last["best"]["epoch"]


@pytest.mark.parametrize("version, words", [(99, "was written by a newer ardir (run format version 99"),
                                             (None, "records run format version None, not a whole number")])
def test_a_last_pt_of_a_newer_or_unknown_version_is_refused_naming_it(tmp_path, capsys, version, words):
    out = tmp_path / "run"
    shutil.copytree(OLD_RUN, out)
    state = ck.load_checkpoint(out / "last.pt")
    torch.save({**state, "version": version}, out / "last.pt")
    assert cli.main(["train", "--output-dir", str(out), "--resume", "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{out / 'last.pt'} {words}" in err and err.count("\n") == 1


def test_a_non_finite_last_pt_is_never_written_and_the_previous_one_stays(tmp_path):
    out = tmp_path / "run"
    shutil.copytree(OLD_RUN, out)
    before = (out / "last.pt").read_bytes()
    state = ck.load_checkpoint(out / "last.pt")
    state["model"]["fc.weight"][0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=r"model\.fc\.weight holds non-finite values \(NaN or Inf\) after 2 "
                                                 r"steps: no checkpoint was written with it \(last.pt is as it was\)"):
        save_last(out, state)
    assert (out / "last.pt").read_bytes() == before and not list(out.glob(".*.tmp"))
