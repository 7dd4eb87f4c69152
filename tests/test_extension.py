"""The extension point docs/code.md describes: a regulariser registered in this file alone, with its own flags,
statistic and coefficient schedule, trains through train.py's own path (flags, checks, run name, loss, log)."""
import os

import pytest
import torch
from test_train import run_cli

import config
import methods
import runs
import utils

EPS_PX = 4  # TINY_RUN's


class RunningSum:
    """The toy's coefficient schedule: its start plus every statistic it was given (one per training step)."""

    def __init__(self, start, device):
        self.value = torch.full((), start, dtype=torch.float64, device=device)

    def update(self, stat):
        self.value += stat.double()

    def state_dict(self):
        return {"value": self.value.cpu()}

    def load_state_dict(self, state):
        self.value.copy_(state["value"])


def toy_term(model, x, y, radii, grad, loss_scale, power):
    """eps in pixels to the power --toy_power: a constant, so the training itself is the plain run's."""
    return torch.tensor(float(round(radii.reg_eps * 255)) ** power, device=x.device)


TOY = methods.Regulariser(
    "Toy", "toy_coeff", "toy", toy_term, "toy", options=lambda args: args.toy_power, double_backprop=False,
    flags=(("toy_power", methods.flag(default=2.0, help="the toy's exponent")),),
    schedule=lambda term, device: RunningSum(term.coefficient, device),
    refuse=lambda args: [("toy_power", "must be positive")] if args.toy_power <= 0 else [])


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setattr(methods, "REGULARISERS", (*methods.REGULARISERS, TOY))


def periodic(run_dir):
    return [r for r in utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "periodic"]


def test_a_regulariser_registered_in_a_test_trains_with_its_flag_statistic_and_schedule(toy, tmp_path, tiny_data):
    fgsm = "--attack=fgsm --attack_init=zero"
    code, run_dir = run_cli(f"{fgsm} --toy_coeff=0.5 --toy_power=2", tmp_path, tiny_data)
    assert code == 0
    code, plain_dir = run_cli(fgsm, tmp_path, tiny_data, name="plain")
    assert code == 0
    rows, plain = periodic(run_dir), periodic(plain_dir)
    term = EPS_PX ** 2
    assert [r["train_toy"] for r in rows] == [term, term]  # its own statistic, unweighted
    assert [r["toy_coeff"] for r in rows] == [0.5 + 3 * term, 0.5 + 6 * term]  # the schedule after 3 and 6 steps
    # iteration i (from 1) weighs the term by 0.5 + (i - 1) * term: its mean over each period of 3 equal batches
    added = [term * (0.5 + term * (first + 1)) for first in (0, 3)]
    for row, base, extra in zip(rows, plain, added, strict=True):
        assert row["train_loss"] - base["train_loss"] == pytest.approx(extra, rel=1e-5)
        assert row["test_pgd_acc"] == base["test_pgd_acc"]  # a constant term leaves training as it was
    assert config.method_name(runs.load_args(run_dir)).endswith("-toy0.5")
    assert f"toy {term:.4g}" in open(os.path.join(run_dir, "log.txt")).read()


def test_its_flags_are_declared_and_checked_by_its_row(toy, tmp_path, tiny_data, capsys):
    assert "--toy_power" in config.build_parser().format_help()
    code, run_dir = run_cli("--toy_coeff=1 --toy_power=0", tmp_path, tiny_data)
    assert code == 2 and not os.path.exists(run_dir)
    assert "--toy_power=0.0: must be positive" in capsys.readouterr().err
    assert run_cli("--toy_coeff=-1", tmp_path, tiny_data)[0] == 2
