"""eval.py's attacks against closed forms of linear models, restart semantics, and the command line."""
import json
import os
import shlex

import pytest
import torch
import torch.nn as nn
from test_train import TINY_RUN

import eval as evaluation
import train
import utils

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
    """Past eps (4 here) the original's sweep grows the ball to the step: FGSM at step s is then exact at radius
    s for two classes; projected, it stays at eps."""
    model, x_u8 = linear(2), interior_images()
    x = x_u8.float() / 255
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 4 / 255
    acc = evaluation.fgsm_correct(model, x_u8, y, eps, step_px / 255, batch_size=16).double().mean().item()
    expected = linear_robust(model, x, y, step_px / 255).float().mean().item()  # FGSM is exact for 2 classes
    assert 0 < expected < 1 or step_px == 1
    assert acc == pytest.approx(expected)
    projected = evaluation.fgsm_correct(model, x_u8, y, eps, step_px / 255, batch_size=16,
                                        projected=True).double().mean().item()
    assert projected == pytest.approx(linear_robust(model, x, y, min(step_px, 4) / 255).float().mean().item())


@pytest.mark.parametrize("projected", [False, True])
def test_worst_case_counts_attacks_within_the_ball(projected):
    """Two classes, eps 4: PGD (sign steps reach the ball's corner) and FGSM step 2 stay within the ball, and PGD
    is exact, so the worst case is the exact robust accuracy at radius 4; the unprojected FGSM step 12 reaches
    radius 12 and must not count, while projected it stays at 4. Some labels are wrong: those count for none."""
    model, x_u8 = linear(2), interior_images()
    x = x_u8.float() / 255
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:8] = 1 - y[:8]
    argv = ["RUN", "--pgd", "10", "1", "--fgsm_sweep", "2", "12"] + ["--fgsm_sweep_projected"] * projected
    result = evaluation.evaluate(model, x_u8, y, 4, evaluation.build_parser().parse_args(argv))
    exact = {r: linear_robust(model, x, y, r / 255).double().mean().item() for r in (2, 4, 12)}
    assert exact[12] < exact[4] < exact[2]
    assert result["pgd10_1_any_acc"] == pytest.approx(exact[4]) and result["fgsm_step2_acc"] == pytest.approx(exact[2])
    assert result["fgsm_step12_acc"] == pytest.approx(exact[4 if projected else 12])
    assert result["worst_case_acc"] == pytest.approx(exact[4])
    only_fgsm = evaluation.build_parser().parse_args(["RUN", "--pgd", "0", "0", "--fgsm_sweep", "12"])
    only_fgsm.pgd = None  # as prepare() reads "0 0"
    assert "worst_case_acc" not in evaluation.evaluate(model, x_u8, y, 4, only_fgsm)


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
        assert set(r) == {"clean_acc", "pgd3_2_acc", "pgd3_2_any_acc", "fgsm_step1_acc", "fgsm_step4_acc",
                          "worst_case_acc", "iteration", "seed"}
        assert r["pgd3_2_any_acc"] <= min(r["pgd3_2_acc"], r["clean_acc"])
        assert r["worst_case_acc"] <= min(r["pgd3_2_any_acc"], r["fgsm_step1_acc"], r["fgsm_step4_acc"])
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
    # a finished run whose checkpoint is gone: the advice is to put it back, not to train again
    os.rename(tmp_path / "run" / "checkpoint.pt", tmp_path / "moved.pt")
    capsys.readouterr()
    assert evaluation.main([str(tmp_path / "run"), "--device", "cpu"]) == 2
    (err,) = capsys.readouterr().err.strip().splitlines()
    assert "the run finished, so its checkpoint.pt was deleted or moved: put it back" in err
    assert "start it again" not in err and "eval.py --weights" in err


def test_eval_refuses_bad_input_with_one_line(tmp_path, capsys):
    assert evaluation.main([str(tmp_path / "missing")]) == 2
    assert evaluation.main([str(tmp_path), "--models", "best"]) == 2
    assert evaluation.main([str(tmp_path), "--n_points", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and "RUN_DIR" in err[0] and "--models='best'" in err[1] and "--n_points=0" in err[2]


def test_train_and_eval_under_one_protocol_give_the_same_numbers_and_other_protocols_other_labels(tmp_path,
                                                                                                  tiny_data):
    """train.py's final PGD (step eps/4) and eval.py's with the same step, points and batches score each model
    alike (the same seeded starts); eval.py's default step (1/255, the original eval.py's) is labelled apart."""
    argv = shlex.split(f"{TINY_RUN} --attack=fgsm --eps=8 --data_dir={tiny_data} --out_dir={tmp_path} "
                       "--run_name=run --final_attack_iters=4 --final_n_restarts=3 --lr_max=0.05 --epochs=8 "
                       "--n_final_eval=24")
    assert train.main(argv) == 0
    finals = {r["model"]: r for r in utils.read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "final"}
    same = ["--pgd", "4", "3", "--pgd_step", "2", "--n_points", "24", "--batch_size", "8", "--device", "cpu"]

    def evaluated(*extra):
        before = set(os.listdir(tmp_path / "run"))
        assert evaluation.main([str(tmp_path / "run"), *extra]) == 0
        (written,) = [f for f in os.listdir(tmp_path / "run") if f not in before]
        return json.load(open(tmp_path / "run" / written))
    result = evaluated(*same)
    for name, row in finals.items():
        ours = result["models"][name]
        assert (ours["pgd4_3_acc"], ours["pgd4_3_any_acc"], ours["clean_acc"]) == (
            row["pgd_acc"], row["pgd_any_acc"], row["clean_acc"])
        assert ours["seed"] == row["protocol"]["seed"] and ours["iteration"] == row["iteration"]
    assert result["pgd_protocol"]["label"] == finals["last"]["protocol"]["label"] == "PGD-4-3 (step 2/255, 24 pts)"
    assert finals["last"]["pgd_acc"] < finals["last"]["clean_acc"]  # a model that PGD's starts matter for:
    assert evaluated(*same, "--seed=2")["models"]["last"]["pgd4_3_acc"] != finals["last"]["pgd_acc"]
    assert evaluated("--pgd", "4", "3", "--n_points", "24")["pgd_protocol"]["label"] == "PGD-4-3 (step 1/255, 24 pts)"


def test_models_kept_at_one_iteration_are_evaluated_once_with_identical_numbers(tmp_path, tiny_data, monkeypatch):
    import evaluation as shared
    argv = shlex.split(f"{TINY_RUN} --attack=fgsm --data_dir={tiny_data} --out_dir={tmp_path} --run_name=run "
                       "--epochs=1 --eval_iter_freq=2")  # one periodic evaluation (iteration 2 of 3): one kept model
    evaluated, original = [], shared.final_stats
    monkeypatch.setattr(shared, "final_stats", lambda model, *a, **kw: evaluated.append(1) or original(model, *a,
                                                                                                        **kw))
    assert train.main(argv) == 0
    finals = {r["model"]: r for r in utils.read_jsonl(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "final"}
    assert finals["early_stopped"]["iteration"] == finals["best_test"]["iteration"]  # this run keeps one model
    drop = ("model",)
    assert {k: v for k, v in finals["early_stopped"].items() if k not in drop} == {
        k: v for k, v in finals["best_test"].items() if k not in drop}
    assert len(evaluated) == len({r["iteration"] for r in finals.values()}) == 2


class RobustBenchBlock(nn.Module):
    """RobustBench's PreActResNet block, written out from its layout: BatchNorm-ReLU, 3x3, BatchNorm-ReLU, 3x3,
    plus the input, or its 1x1 projection (a one-module Sequential) where the shape changes."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c_in), nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False))

    def forward(self, x):
        out = torch.relu(self.bn1(x))
        skip = self.shortcut(x) if hasattr(self, "shortcut") else x
        return self.conv2(torch.relu(self.bn2(self.conv1(out)))) + skip


class RobustBenchPreActResNet18(nn.Module):
    def __init__(self, n_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        widths, c_in = (64, 128, 256, 512), 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(self, f"layer{i + 1}", nn.Sequential(RobustBenchBlock(c_in, width, stride),
                                                         RobustBenchBlock(width, width, 1)))
            c_in = width
        self.linear = nn.Linear(512, n_classes)

    def forward(self, x):
        out = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return self.linear(torch.nn.functional.avg_pool2d(out, 4).flatten(1))


def test_export_of_another_layout_is_refused_with_one_line(tmp_path, tiny_data, capsys):
    argv = shlex.split(f"{TINY_RUN} --epochs=1 --data_dir={tiny_data} --out_dir={tmp_path} --run_name=cnn")
    assert train.main(argv) == 0
    capsys.readouterr()
    assert evaluation.main([str(tmp_path / "cnn"), "--export", str(tmp_path / "rb")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--model=cnn" in err[0] and not (tmp_path / "rb").exists()
