"""Health warnings and catastrophic-overfitting detection, on hand-made metrics and on runs made to fail."""
import os
import shlex

import torch
from test_train import TINY_RUN

import attacks
import config
import health
import methods
import train
import utils


def periodic(iteration, pgd, fgsm, **extra):
    return {"kind": "periodic", "iteration": iteration, "epoch": iteration / 10, "test_pgd_acc": pgd,
            "test_fgsm_acc": fgsm, **extra}


def test_co_onset_is_the_first_collapse_with_fgsm_holding():
    rows = [periodic(10, 0.20, 0.25), periodic(20, 0.30, 0.35), periodic(30, 0.12, 0.40),  # PGD falls, gap 28
            periodic(40, 0.09, 0.45), periodic(50, 0.0, 1.0)]  # 0.09 < 0.30 / 3 and the gap is 36 points
    assert health.co_onset(rows)["iteration"] == 40
    assert health.co_onset(rows[:3]) is None
    assert health.co_onset([periodic(10, 0.0, 0.0), periodic(20, 0.0, 0.9)]) is None  # never robust: no collapse


def row(**changes):
    base = {"iteration": 20, "train_eps": 8, "train_loss": 2.0, "train_reg": 0.1, "train_gis": 0.1,
            "train_elle": 1e-4, "train_delta_abs": 8 / 255, "train_grad_zero": 0.01}
    return {**base, **changes}


def args(flags=""):
    """The StepSettings of FGSM from zero with these flags."""
    flags = config.build_parser().parse_args(shlex.split(f"--attack_init=zero --fgsm_alpha=1.0 {flags}"))
    return methods.StepSettings.from_flags(flags)


def test_each_warning_names_its_cause():
    assert health.period_warnings(row(), None, args()) == []
    assert "loss scale" in health.period_warnings(row(loss_scale=0.5), None, args())[0]
    assert "GradAlign" in health.period_warnings(row(train_reg=0.0), None, args("--grad_align_cos_lambda=1"))[0]
    assert "GradSum" in health.period_warnings(row(train_gis=0.0), None, args("--grad_input_sum_coeff=1"))[0]
    assert "ELLE" in health.period_warnings(row(train_elle=0.0), None, args("--elle_lambda=1000"))[0]
    assert "exactly 0 (or NaN) at 70%" in health.period_warnings(row(train_grad_zero=0.7), None, args())[0]
    assert "exactly 0" in health.period_warnings(row(train_grad_zero=0.7), None, args("--attack=n_fgsm"))[0]
    assert health.period_warnings(row(train_grad_zero=0.7), None, args("--attack=pgd")) == []  # not its step
    # a small mean |delta| alone is no sign: clipping to [0, 1] and VFSAT's small epochs shrink it too
    assert health.period_warnings(row(train_delta_abs=1 / 255), None, args("--discrete_eps")) == []
    previous = row(iteration=10)
    assert "has not changed since iteration 10" in health.period_warnings(row(), previous, args())[0]


def test_zero_input_gradients_raise_the_perturbation_warning_and_can_stop_the_run(tmp_path, tiny_data, monkeypatch):
    original = attacks.input_grad

    def blind(*a, **kw):  # as for a model whose output ignores its input
        grad, logits = original(*a, **kw)
        return grad * 0, logits
    monkeypatch.setattr(attacks, "input_grad", blind)
    argv = f"{TINY_RUN} --attack_init=zero --fgsm_alpha=1.0 --data_dir={tiny_data} --out_dir={tmp_path}"
    assert train.main(shlex.split(f"{argv} --run_name=warn")) == 0
    rows = [r for r in utils.read_jsonl(os.path.join(tmp_path, "warn", "metrics.jsonl")) if r["kind"] == "periodic"]
    assert all(r["train_grad_zero"] == 1 and any("exactly 0" in w for w in r["warnings"]) for r in rows)
    assert "warning: the attack's input gradient was exactly 0" in open(os.path.join(tmp_path, "warn",
                                                                                      "log.txt")).read()
    assert train.main(shlex.split(f"{argv} --run_name=stop --stop_on_warning")) == 1
    assert "stopped by --stop_on_warning at iteration 3" in open(os.path.join(tmp_path, "stop", "log.txt")).read()


def test_a_loss_scale_pushed_below_one_is_reported(tmp_path, tiny_data, monkeypatch):
    original = torch.amp.GradScaler.update
    monkeypatch.setattr(torch.amp.GradScaler, "update", lambda self, new_scale=None: original(self, 0.25))
    argv = f"{TINY_RUN} --attack_init=zero --half_prec --data_dir={tiny_data} --out_dir={tmp_path} --run_name=r"
    assert train.main(shlex.split(argv)) == 0
    rows = [r for r in utils.read_jsonl(os.path.join(tmp_path, "r", "metrics.jsonl")) if r["kind"] == "periodic"]
    assert all(r["loss_scale"] == 0.25 and "loss scale" in r["warnings"][0] for r in rows)


def test_a_healthy_fgsm_step_on_mostly_black_images_raises_no_warning():
    """MNIST-like images (80% of pixels 0) and a model that reads brightness as the true class: FGSM steps every
    pixel down, the black ones are clipped back to 0, and the mean |delta| falls far below half the step, which
    the old rule called zero input gradients. None is zero."""
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8) * (torch.rand(64, 1, 8, 8) > 0.8)
    y = torch.zeros(64, dtype=torch.long)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    with torch.no_grad():
        model[1].weight.zero_()[0] = 1.0  # logits (sum of pixels, 0, 0): the loss falls as the image brightens
        model[1].bias.zero_()
    a = args("--eps=8")
    radii = methods.StepRadii(eps=8 / 255, fgsm_eps=8 / 255, pgd_eps=8 / 255, fgsm_alpha=1.0, reg_eps=8 / 255)
    stats = methods.losses(model, x, y, radii, a, 1.0)[1]
    assert stats["delta_abs"] < 0.3 * 8 / 255 and stats["grad_zero"] == 0
    period = row(train_delta_abs=float(stats["delta_abs"]), train_grad_zero=float(stats["grad_zero"]))
    assert health.period_warnings(period, None, a) == []
