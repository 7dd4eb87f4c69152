"""Schedules and atomic files against hand-computed values."""
import os

import pytest
import torch

import utils


def test_vfsat_cycles_match_the_paper():
    assert utils.vfsat_cycle(8) == [2, 4, 6, 8, 8, 8, 8, 8]
    assert utils.vfsat_cycle(16) == [2, 4, 6, 8, 10, 12, 14, 16, 16, 16, 16, 16]


def test_vfsat_training_eps_by_epoch():
    by_epoch = [utils.training_eps(8, epoch, discrete_eps=True) for epoch in range(18)]
    assert by_epoch == [2, 4, 6, 8, 8, 8, 8, 8] * 2 + [2, 4]  # the first epoch uses the first value
    assert utils.training_eps(8, 5, discrete_eps=False) == 8


@pytest.mark.parametrize("epochs_done, expected", [
    (0, 0.0), (4, 0.1), (8, 0.2), (11, 0.15), (14, 0.1), (20, 0.0)])
def test_cyclic_schedule_peaks_at_two_fifths(epochs_done, expected):
    assert utils.learning_rate("cyclic", 0.2, epochs_done, 20) == pytest.approx(expected)


def test_piecewise_and_constant_schedules():
    lr = [utils.learning_rate("piecewise", 0.1, t, 100) for t in (0, 49.9, 50, 74.9, 75, 99)]
    assert lr == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    assert utils.learning_rate("constant", 0.3, 17, 20) == 0.3


def test_atomic_save_keeps_old_file_when_writing_fails(tmp_path):
    path = str(tmp_path / "ckpt.pt")
    utils.atomic_torch_save({"a": torch.ones(2)}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        utils.atomic_torch_save({"a": Unpicklable()}, path)
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(2))


def test_jsonl_round_trip(tmp_path):
    rows = [{"iteration": 1, "acc": 0.5}, {"iteration": 2, "acc": 0.25}]
    utils.write_jsonl(rows, str(tmp_path / "m.jsonl"))
    assert utils.read_jsonl(str(tmp_path / "m.jsonl")) == rows
    assert os.listdir(tmp_path) == ["m.jsonl"]  # no temporary file left behind
