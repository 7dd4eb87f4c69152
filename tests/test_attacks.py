"""Attacks and regularisers against closed forms of a linear model and finite differences."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import attacks

EPS = 8 / 255


def linear_model(n_in=3 * 4 * 4, n_classes=2, seed=0, scale=1.0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(n_in, n_classes)).double()
    with torch.no_grad():
        model[1].weight.mul_(scale)
    return model


def interior_batch(n=16, seed=1):
    """Images whose eps-ball lies inside [0, 1], so only the ball constrains the attack."""
    g = torch.Generator().manual_seed(seed)
    return (EPS + (1 - 2 * EPS) * torch.rand(n, 3, 4, 4, generator=g)).double(), torch.randint(0, 2, (n,), generator=g)


def worst_case_delta(model, x, y):
    """For 2-class linear logits the loss grows as the margin w_y - w_other shrinks: delta = -eps sign(w_y - w_o)."""
    w = model[1].weight
    direction = (w[y] - w[1 - y]).view_as(x)
    return -EPS * direction.sign()


def margin(model, x, y):
    z = model(x)
    return z.gather(1, y[:, None]).squeeze(1) - z.gather(1, (1 - y)[:, None]).squeeze(1)


def analytic_input_grad(model, x, y):
    """d mean-CE / dx for linear logits: (softmax - onehot) W / batch size."""
    p = F.softmax(model(x), 1) - F.one_hot(y, model[1].out_features)
    return (p @ model[1].weight / len(y)).view_as(x)


def test_fgsm_reaches_linear_worst_case():
    model, (x, y) = linear_model(), interior_batch()
    delta = attacks.fgsm(model, x, y, EPS, EPS)
    assert torch.equal(delta, worst_case_delta(model, x, y))


def test_pgd_reaches_linear_worst_case_and_closed_form_margin():
    model, (x, y) = linear_model(), interior_batch()
    start = attacks.uniform_delta(x, EPS)
    delta = attacks.pgd(model, x, y, EPS, EPS / 4, n_iters=10, delta_init=start)
    assert torch.allclose(delta, worst_case_delta(model, x, y), atol=1e-12)
    w = model[1].weight
    expected = margin(model, x, y) - EPS * (w[y] - w[1 - y]).abs().sum(1)  # margin - eps * ||w_y - w_o||_1
    assert torch.allclose(margin(model, x + delta, y), expected, atol=1e-9)


@pytest.mark.parametrize("skip_broken", [True, False])
def test_pgd_robust_mask_equals_closed_form(skip_broken):
    model, (x, y) = linear_model(scale=0.3), interior_batch(n=64)
    w = model[1].weight
    expected = margin(model, x, y) - EPS * (w[y] - w[1 - y]).abs().sum(1) > 0
    assert 0 < expected.sum() < len(y)  # the check means something only if both outcomes occur
    robust = attacks.pgd_robust(model, x, y, EPS, EPS / 4, n_iters=10, n_restarts=3, skip_broken=skip_broken)
    assert torch.equal(robust, expected)


def test_attacks_stay_in_ball_and_image_range():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    x = torch.rand(32, 3, 8, 8)
    x[:8] = 0.0  # corners of the image cube, where clipping to [0, 1] binds
    x[8:16] = 1.0
    y = torch.randint(0, 10, (32,))
    deltas = [attacks.uniform_delta(x, EPS), attacks.uniform_delta(x, EPS, on_grid=True),
              attacks.fgsm(model, x, y, EPS, 1.25 * EPS, attacks.uniform_delta(x, EPS)),
              attacks.pgd(model, x, y, EPS, 2 / 255, 7, attacks.uniform_delta(x, EPS))]
    for delta in deltas:
        assert delta.abs().max() <= EPS + 1e-7
        assert (x + delta).min() >= 0 and (x + delta).max() <= 1


def test_uniform_delta_on_grid_is_integer_pixels():
    x = torch.randint(0, 256, (64, 3, 4, 4)) / 255  # images are on the grid, so clipping to [0, 1] keeps it
    delta = attacks.uniform_delta(x, EPS, on_grid=True) * 255
    assert torch.allclose(delta, delta.round(), atol=1e-4)
    assert len(delta.round().unique()) > 8  # spread over the grid, not collapsed to a few values


def test_input_grad_matches_closed_form_and_ignores_loss_scale():
    model, (x, y) = linear_model(), interior_batch()
    expected = analytic_input_grad(model, x, y)
    assert torch.allclose(attacks.input_grad(model, x, y), expected, atol=1e-12)
    assert torch.allclose(attacks.input_grad(model, x, y, loss_scale=2.0**16), expected, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # attacks never touch parameter .grad


def test_grad_sum_penalty_equals_definition():
    model, (x, y) = linear_model(n_classes=2), interior_batch()
    torch.manual_seed(5)
    eta = attacks.uniform_delta(x, EPS, on_grid=True)
    torch.manual_seed(5)
    value = attacks.grad_sum_penalty(model, x, y, EPS)
    assert torch.allclose(value, analytic_input_grad(model, x + eta, y).norm(), atol=1e-12)


def finite_difference_check(penalty_fn, weight, n_entries=5, h=1e-6):
    """Compare autograd's d penalty / d weight with central differences; penalty_fn reseeds its own noise."""
    (grad,) = torch.autograd.grad(penalty_fn(), weight)
    assert grad.abs().sum() > 0  # the term reaches the parameters
    for k in range(n_entries):
        i, j = k % weight.shape[0], 7 * k
        values = []
        for shift in (h, -2 * h, h):  # up, down, back to the original weight
            with torch.no_grad():
                weight[i, j] += shift
            values.append(penalty_fn().item())
        numeric = (values[0] - values[1]) / (2 * h)
        assert abs(numeric - grad[i, j].item()) < 1e-5 * max(1.0, abs(grad[i, j].item()))


def seeded(fn, seed=3):
    def call():
        torch.manual_seed(seed)
        return fn()
    return call


def test_grad_sum_penalty_gradient_reaches_parameters():
    model, (x, y) = linear_model(n_classes=3), interior_batch()
    y = y % 3
    finite_difference_check(seeded(lambda: attacks.grad_sum_penalty(model, x, y, EPS)), model[1].weight)


class GatedLinear(nn.Module):
    """Linear logits of relu(x - 1/2): an image below 1/2 everywhere has an exactly zero input gradient."""

    def __init__(self, n_in=48, n_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(n_in, n_classes).double()

    def forward(self, x):
        return self.linear(F.relu(x - 0.5).flatten(1))

    def analytic_input_grad(self, x, y):
        p = F.softmax(self(x), 1) - F.one_hot(y, self.linear.out_features)
        return (p @ self.linear.weight / len(y)).view_as(x) * (x > 0.5)


def cosine(a, b):
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_grad_align_penalty_equals_definition_and_skips_zero_gradients():
    model, (x, y) = GatedLinear(), interior_batch()
    y = y % 3
    x[0] = EPS  # the whole ball around example 0 lies below 1/2: zero gradient, excluded from the mean
    torch.manual_seed(5)
    eta = attacks.uniform_delta(x, EPS)
    torch.manual_seed(5)
    value = attacks.grad_align_penalty(model, x, y, EPS)
    g1 = model.analytic_input_grad(x, y).flatten(1)
    g2 = model.analytic_input_grad(x + eta, y).flatten(1)
    assert g1[0].abs().max() == 0 and g1[1:].norm(dim=1).min() > 0
    expected = 1 - cosine(g1[1:], g2[1:]).mean()
    assert expected > 1e-3  # three classes: the two gradients really differ in direction
    assert torch.allclose(value, expected, atol=1e-12)


def test_grad_align_penalty_gradient_reaches_parameters():
    model, (x, y) = GatedLinear(), interior_batch()
    y = y % 3
    grad_clean = model.analytic_input_grad(x, y)  # a constant of the penalty, as in GradAlign
    finite_difference_check(seeded(lambda: attacks.grad_align_penalty(model, x, y, EPS, grad_clean)),
                            model.linear.weight)


def test_grad_align_penalty_is_zero_without_valid_examples():
    model, (x, y) = linear_model(), interior_batch(n=4)
    with torch.no_grad():
        model[1].weight.zero_()  # every input gradient is zero
    assert attacks.grad_align_penalty(model, x, y, EPS).item() == 0


def test_loss_scale_prevents_fp16_underflow_of_grad_sum():
    """Under fp16 autocast tiny input gradients vanish unless the loss is scaled, as GradScaler does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10))
    with torch.no_grad():
        model[1].weight.mul_(1e-5)
    x, y = torch.rand(64, 3, 4, 4), torch.randint(0, 10, (64,))
    torch.manual_seed(1)
    exact = attacks.grad_sum_penalty(model, x, y, EPS)
    with torch.autocast("cpu", dtype=torch.float16):
        torch.manual_seed(1)
        unscaled = attacks.grad_sum_penalty(model, x, y, EPS)
        torch.manual_seed(1)
        scaled = attacks.grad_sum_penalty(model, x, y, EPS, loss_scale=torch.tensor(2.0**16))
    assert unscaled < 0.5 * exact  # the failure mode exists here...
    assert abs(scaled / exact - 1) < 1e-2  # ...and loss scaling removes it


def test_fast_pgd_evaluation_never_reports_higher_robust_accuracy():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    x, y = torch.rand(128, 3, 8, 8), torch.randint(0, 10, (128,))
    with torch.no_grad():
        y = model(x).argmax(1)  # all clean-correct, so the attack decides everything
    for seed in range(3):
        torch.manual_seed(seed)
        fast = attacks.pgd_robust(model, x, y, 4 / 255, 1 / 255, n_iters=5, n_restarts=3, skip_broken=True)
        torch.manual_seed(seed)
        plain = attacks.pgd_robust(model, x, y, 4 / 255, 1 / 255, n_iters=5, n_restarts=3, skip_broken=False)
        assert 0 < plain.sum() < len(y)
        assert not (fast & ~plain).any()  # every example robust in the fast mode is robust in the plain one
