"""eval.py's attacks against closed forms of linear models, restart semantics, and the command line."""
import json
import os
import shlex

import pytest
import torch
import torch.nn as nn

import attacks
import eval as evaluation
import train
from test_train import TINY_RUN

EPS = 8 / 255


def linear(n_classes, seed=0, scale=0.3):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, n_classes))
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model.eval()


def interior_images(n=64, seed=1):
    """uint8 images whose eps-ball (eps <= 12/255) stays inside [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(12, 256 - 12, (n, 3, 4, 4), generator=g, dtype=torch.uint8)


def linear_robust(model, x, y, eps):
    """Exact L-inf robustness of linear logits: min over classes j of z_y - z_j - eps ||w_y - w_j||_1 > 0."""
    w, z = model[1].weight, model(x)
    gaps = z.gather(1, y[:, None]) - z - eps * (w[y][:, None, :] - w[None, :, :]).abs().sum(2)
    gaps.scatter_(1, y[:, None], float("inf"))
    return gaps.min(1).values > 0


@pytest.mark.parametrize("step_px", [1, 3, 6, 12])
def test_fgsm_sweep_matches_closed_form_of_two_class_linear_model(step_px):
    model, x_u8 = linear(2), interior_images()
    x = x_u8.float() / 255
    with torch.no_grad():
        y = model(x).argmax(1)
    acc = evaluation.fgsm_accuracy(model, x_u8, y, 12 / 255, step_px / 255, batch_size=16)
    expected = linear_robust(model, x, y, step_px / 255).float().mean().item()  # FGSM is exact for 2 classes
    assert 0 < expected < 1 or step_px == 1
    assert acc == pytest.approx(expected)


class Recorder(nn.Module):
    """Wraps a model and records the batch size of every forward pass."""

    def __init__(self, model):
        super().__init__()
        self.model, self.sizes = model, []

    def forward(self, x):
        self.sizes.append(len(x))
        return self.model(x)


def test_pgd_restarts_break_different_points_and_attack_only_survivors():
    model, x_u8 = linear(2), interior_images(n=256)
    with torch.no_grad():  # logits depend on pixel 0 alone, thresholded at 1/2: random starts decide near it
        model[1].weight.zero_()
        model[1].weight[:, 0] = torch.tensor([-1.0, 1.0])
        model[1].bias.copy_(torch.tensor([0.5, -0.5]))
    x_u8[:, 0, 0, 0] = torch.randint(118, 139, (256,), dtype=torch.uint8)
    x = x_u8.float() / 255
    with torch.no_grad():
        y = model(x).argmax(1)
    eps, n_restarts = 12 / 255, 4
    torch.manual_seed(7)
    starts = [attacks.uniform_delta(x, eps) for _ in range(n_restarts)]  # the draws pgd_robust will make
    with torch.no_grad():
        survives = [model(x + d).argmax(1) == y for d in starts]  # 0 iterations: each start decides alone
    assert len({tuple(s.tolist()) for s in survives}) == n_restarts  # restarts break different points
    recorder = Recorder(model)
    torch.manual_seed(7)
    robust = attacks.pgd_robust(recorder, x, y, eps, eps / 4, n_iters=0, n_restarts=n_restarts)
    expected = torch.stack(survives).all(0)
    assert torch.equal(robust, expected) and 0 < expected.sum() < len(y)
    alive = [len(y)] + [int(torch.stack(survives[:r]).all(0).sum()) for r in range(1, n_restarts)]
    assert recorder.sizes == [len(y)] + alive  # a clean pass, then one pass per restart on its survivors only


def test_autoattack_finds_the_exact_linear_worst_case():
    pytest.importorskip("torchattacks")
    model, x_u8 = linear(10, scale=1.0), interior_images(n=48)  # torchattacks' AutoAttack needs 10 classes
    x = x_u8.float() / 255
    with torch.no_grad():
        y = model(x).argmax(1)
    expected = linear_robust(model, x, y, EPS).float().mean().item()
    assert 0 < expected < 1
    acc = evaluation.autoattack_accuracy(model, x_u8, y, EPS, n_classes=10, batch_size=48, seed=0)
    assert acc == pytest.approx(expected)


def test_eval_command_line_on_a_finished_run(tmp_path, tiny_data, capsys):
    argv = shlex.split(f"{TINY_RUN} --attack=fgsm --data_dir={tiny_data} --out_dir={tmp_path} --run_name=run")
    assert train.main(argv) == 0
    capsys.readouterr()
    assert evaluation.main([str(tmp_path / "run"), "--pgd", "3", "2", "--fgsm_sweep", "1", "4", "--n_points", "16",
                            "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    (written,) = [f for f in os.listdir(tmp_path / "run") if f.startswith("eval-")]
    result = json.load(open(tmp_path / "run" / written))
    assert list(result["models"]) == ["last", "early_stopped", "best_test"] and result["n_points"] == 16
    for r in result["models"].values():
        assert set(r) == {"clean_acc", "pgd3_2_acc", "fgsm_step1_acc", "fgsm_step4_acc"}
        assert r["pgd3_2_acc"] <= r["clean_acc"]
    assert "| last |" in out
    # the sweep equals separate evaluations, one step each
    capsys.readouterr()
    for step in ("1", "4"):
        evaluation.main([str(tmp_path / "run"), "--pgd", "0", "0", "--fgsm_sweep", step, "--n_points", "16",
                         "--models", "last", "--device", "cpu"])
    singles = [json.load(open(tmp_path / "run" / f)) for f in sorted(os.listdir(tmp_path / "run"))
               if f.startswith("eval-") and f != written]
    for single in singles:
        (key,) = [k for k in single["models"]["last"] if k.startswith("fgsm")]
        assert single["models"]["last"][key] == result["models"]["last"][key]


def test_eval_refuses_bad_input_with_one_line(tmp_path, capsys):
    assert evaluation.main([str(tmp_path / "missing")]) == 2
    assert evaluation.main([str(tmp_path), "--models", "best"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "RUN_DIR_OR_CHECKPOINT" in err[0] and "--models='best'" in err[1]
