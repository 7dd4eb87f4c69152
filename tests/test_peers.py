"""The peers (N-FGSM, ELLE, ELLE-A, GradSum-FD) against hand computations, their authors' rules and exact GradSum."""
import os
import shlex

import numpy as np
import pytest
import torch
import torch.nn as nn
from scipy import stats
from test_train import TINY_RUN

import attacks
import bench
import methods
import train
import utils
from models import build_model

EPS = 8 / 255


class SumLogit(nn.Module):
    """Logits (sum of the pixels, 0): with label 1 every input gradient is positive, so a signed step is +1."""

    def forward(self, z):
        s = z.flatten(1).sum(1, keepdim=True)
        return torch.cat([s, torch.zeros_like(s)], 1)


def test_n_fgsm_is_its_noise_then_one_step_each_clipped_to_the_image_as_written():
    x = torch.rand(64, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.ones(64, dtype=torch.long)
    torch.manual_seed(5)
    noise = torch.empty_like(x).uniform_(-2 * EPS, 2 * EPS)  # the draw n_fgsm makes
    box = lambda d: torch.max(torch.min(d, 1 - x), -x)  # noqa: E731  (N-FGSM's attack_utils.clamp)
    expected = box(box(noise) + EPS * 1.0)
    torch.manual_seed(5)
    delta, grad = attacks.n_fgsm(SumLogit(), x, y, EPS, 2 * EPS)
    assert torch.equal(delta, expected) and (grad > 0).all()
    assert ((x + delta) >= 0).all() and ((x + delta) <= 1).all()
    torch.manual_seed(5)
    clipped, _ = attacks.n_fgsm(SumLogit(), x, y, EPS, 2 * EPS, clip=EPS)  # its --clip 1: the eps-ball
    assert torch.equal(clipped, expected.clamp(-EPS, EPS))


def test_n_fgsm_noise_is_uniform_over_k_eps_and_the_step_is_not_projected():
    x = torch.full((4000, 3, 4, 4), 0.5)  # far from 0 and 1: no image clipping
    y = torch.ones(len(x), dtype=torch.long)
    torch.manual_seed(0)
    delta, _ = attacks.n_fgsm(SumLogit(), x, y, EPS, 2 * EPS)
    noise = (delta - EPS).flatten().double()  # every step is +eps
    assert noise.min() >= -2 * EPS and noise.max() <= 2 * EPS
    assert stats.kstest(noise.numpy(), "uniform", args=(-2 * EPS, 4 * EPS)).pvalue > 1e-3
    assert delta.max() > 2.99 * EPS  # noise 2 eps + step eps: no projection back to the eps-ball


def test_linearity_error_is_zero_for_a_linear_loss_and_the_hand_computed_one_for_a_quadratic():
    g = torch.Generator().manual_seed(0)
    x, w = torch.rand(32, 3, 4, 4, generator=g).double(), torch.rand(3, 4, 4, generator=g).double()
    linear = lambda z: (z * w).sum((1, 2, 3)) + 1.5  # noqa: E731
    quadratic = lambda z: (w * (z - 0.3) ** 2).sum((1, 2, 3))  # noqa: E731
    torch.manual_seed(1)
    assert attacks.linearity_error(linear, x, EPS) < 1e-24
    torch.manual_seed(1)  # the draws linearity_error makes: a and b, then t
    ab = x.repeat(2, 1, 1, 1) + EPS * (2 * torch.rand(64, 3, 4, 4) - 1)  # float32 draws, as its code's
    t = torch.rand(32).double()
    a, b = ab[:32], ab[32:]
    # q((1 - t) a + t b) - (1 - t) q(a) - t q(b) = -t (1 - t) sum w (a - b)^2 for q = sum w (z - c)^2
    by_hand = ((t * (1 - t) * (w * (a - b) ** 2).sum((1, 2, 3))) ** 2).mean()
    torch.manual_seed(1)
    assert torch.allclose(attacks.linearity_error(quadratic, x, EPS), by_hand, rtol=1e-10, atol=0)


def elle_a_by_its_code(errors, lambda_max, decay=0.99, sensitivity=2.0):
    """ELLE's train.py / core/utils/train.py onoff schedule, re-typed: the lambdas each iteration used."""
    lin_reg, history, used = 0.0, [], []
    for e in errors:
        used.append(lin_reg)
        if len(history) > 2 and e > np.mean(history) + sensitivity * np.std(history):
            lin_reg = lambda_max
        else:
            lin_reg *= decay
        history.append(e)
    return used


def test_elle_a_lambda_follows_its_codes_rule():
    rng = np.random.default_rng(0)
    errors = rng.exponential(1e-4, 400)
    errors[[3, 50, 51, 200]] *= 30  # spikes, where lambda jumps (not before three errors: its len(...) > 2)
    schedule, used = methods.AdaptiveLambda(4000.0, 0.99, 2.0, torch.device("cpu")), []
    for e in errors:
        used.append(float(schedule.value))
        schedule.update(torch.tensor(e, dtype=torch.float32))
    theirs = elle_a_by_its_code(errors.astype(np.float32).astype(np.float64), 4000.0)
    assert np.allclose(used, theirs, rtol=1e-9, atol=0) and max(used) == 4000.0 and sum(np.diff(used) > 0) >= 3


def smooth_cnn(activation):
    torch.manual_seed(0)
    model = build_model("cnn", 10, 3, 8, None, 1, 4).double()
    model.features[1] = activation
    return model


def gradsum_exact_and_fd(model, x, y, step_px):
    """(relative errors of GradSum-FD's value and parameter gradient) against exact GradSum, bench.py's fd section."""
    return bench.fd_errors(model, x, y, EPS, (step_px,), seed=1)[step_px][:2]


def test_gradsum_fd_tends_to_exact_gradsum_value_and_parameter_gradient_as_the_step_shrinks():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8, generator=g).double(), torch.randint(0, 10, (16,), generator=g)
    model = smooth_cnn(nn.Softplus(beta=5))  # smooth: the first-order error is O(step)
    errors = {px: gradsum_exact_and_fd(model, x, y, px) for px in (1.0, 0.1, 0.01)}
    ordered = list(errors.values())
    for err_a, err_b in zip(ordered, ordered[1:], strict=False):
        assert all(6 < e_a / e_b < 14 for e_a, e_b in zip(err_a, err_b, strict=True))  # a tenth the step, the error
    default = train.config.build_parser().get_default("grad_input_sum_fd_step")
    value_err, grad_err = gradsum_exact_and_fd(model, x, y, default)
    print(f"GradSum-FD at its default step {default}/255 (float64, softplus CNN): value {value_err:.1e}, "
          f"parameter gradient {grad_err:.1e} relative error")
    assert value_err < 1e-2 and grad_err < 3e-2


def test_gradsum_fd_value_tends_to_gradsum_on_a_relu_network_too_and_a_zero_gradient_gives_zero():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(16, 3, 8, 8, generator=g).double(), torch.randint(0, 10, (16,), generator=g)
    assert gradsum_exact_and_fd(smooth_cnn(nn.ReLU()), x, y, 0.001)[0] < 1e-5
    blind = nn.Sequential(nn.Flatten(), nn.Linear(192, 10)).double()
    nn.init.zeros_(blind[1].weight)
    assert attacks.grad_sum_fd_penalty(blind, x, y, EPS, 0.5 / 255) == 0


@pytest.mark.parametrize("preset", ["n_fgsm", "elle", "elle_a", "gradsum_fd"])
def test_each_peer_runs_end_to_end_from_its_preset(preset, tmp_path, tiny_data):
    argv = f"{TINY_RUN} --preset={preset} --data_dir={tiny_data} --out_dir={tmp_path} --run_name=r"
    assert train.main(shlex.split(argv)) == 0
    rows = utils.read_jsonl(os.path.join(tmp_path, "r", "metrics.jsonl"))
    periodic = [r for r in rows if r["kind"] == "periodic"]
    assert [r["model"] for r in rows if r["kind"] == "final"] == ["last", "early_stopped", "best_test"]
    if preset.startswith("elle"):
        assert all(r["train_elle"] > 0 for r in periodic)
    if preset == "elle_a":
        assert all(0 <= r["elle_lambda"] <= 4000 for r in periodic)
    if preset == "gradsum_fd":
        assert all(r["train_gis"] > 0 for r in periodic)


def test_gradsum_fd_under_fp16_autocast_with_pytorchs_own_batchnorm_matches_fp32():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 64, 10))
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 10, (32,))
    torch.manual_seed(1)
    fp32 = attacks.grad_sum_fd_penalty(model, x, y, EPS, 0.5 / 255)
    with torch.autocast("cpu", dtype=torch.float16):
        torch.manual_seed(1)
        fp16 = attacks.grad_sum_fd_penalty(model, x, y, EPS, 0.5 / 255, loss_scale=256.0)
    grads = torch.autograd.grad(fp16 * 256.0, list(model.parameters()))
    assert abs(float((fp16 / fp32).detach()) - 1) < 1e-2 and all(torch.isfinite(g).all() for g in grads)


def test_gradsum_fd_trains_with_half_prec_and_its_loss_scaler(tmp_path, tiny_data):
    argv = f"{TINY_RUN} --preset=gradsum_fd --half_prec --data_dir={tiny_data} --out_dir={tmp_path} --run_name=r"
    assert train.main(shlex.split(argv)) == 0
    assert not train.methods.uses_double_backprop(train.runs.load_args(os.path.join(tmp_path, "r")))
    rows = [r for r in utils.read_jsonl(os.path.join(tmp_path, "r", "metrics.jsonl")) if r["kind"] == "periodic"]
    assert np.isfinite(rows[-1]["train_gis"]) and rows[-1]["train_gis"] > 0


class SinLogit(nn.Module):
    """Logits (c sin(k s), 0), s the sum of the pixels: the loss rises along its gradient, then falls past a peak."""

    def __init__(self, k, c=3.0):
        super().__init__()
        self.k, self.c = k, c

    def forward(self, z):
        s = z.flatten(1).sum(1, keepdim=True)
        return torch.cat([self.c * torch.sin(self.k * s), torch.zeros_like(s)], 1)


def test_gradsum_fd_is_the_absolute_difference_where_the_loss_falls_again_within_the_step():
    x, y = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64), torch.ones(1, dtype=torch.long)
    n, s0 = x.numel(), x.sum().item()
    model = SinLogit(k=(torch.pi / 2 - 0.1) / s0)  # just below the peak of the loss
    step = 1 / (model.k * n)  # the move along d adds k * step * n = 1 radian: past the peak
    torch.manual_seed(0)
    fd = attacks.grad_sum_fd_penalty(model, x, y, 1e-9, step)
    loss = lambda phase: torch.nn.functional.softplus(torch.tensor(3.0 * np.sin(phase)))  # noqa: E731
    signed = (loss(torch.pi / 2 + 0.9) - loss(torch.pi / 2 - 0.1)) / (step * n ** 0.5)
    assert signed < 0 and torch.allclose(fd.detach(), -signed.double(), rtol=1e-6)
