"""Atomic files against hand-computed values."""
import os

import pytest
import torch

import utils


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    utils.atomic_torch_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(utils.WriteError, match="disk full"):
        utils.atomic_torch_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_jsonl_round_trip(tmp_path):
    rows = [{"iteration": 1, "acc": 0.5}, {"iteration": 2, "acc": 0.25}]
    utils.write_jsonl(rows, str(tmp_path / "m.jsonl"))
    assert utils.read_jsonl(str(tmp_path / "m.jsonl")) == rows
    assert os.listdir(tmp_path) == ["m.jsonl"]  # no temporary file left behind


def test_progress_pace_counts_the_steps_since_it_was_made(monkeypatch):
    """A run resumed at iteration 3000 that took 10 steps in 5 s goes at 2 steps/s, not 602."""
    clock = iter([100.0, 105.0, 105.0])
    monkeypatch.setattr(utils.time, "time", lambda: next(clock))
    lines = utils.ProgressLines(60, done=3000)
    assert lines.rate(3010) == 2.0
    assert lines.eta(3010, 3130) == "1m00s"  # 120 steps at 2 steps/s
