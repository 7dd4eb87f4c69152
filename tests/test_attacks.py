"""Attacks, regularisers and the evaluation protocol against closed forms of linear models and finite differences."""
import math

import numpy as np
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
    return -EPS * (w[y] - w[1 - y]).view_as(x).sign()


def margin(model, x, y):
    z = model(x)
    return z.gather(1, y[:, None]).squeeze(1) - z.gather(1, (1 - y)[:, None]).squeeze(1)


def analytic_input_grad(model, x, y):
    """d mean-CE / dx for linear logits: (softmax - onehot) W / batch size."""
    p = F.softmax(model(x), 1) - F.one_hot(y, model[1].out_features)
    return (p @ model[1].weight / len(y)).view_as(x)


def zeros(x):
    return torch.zeros_like(x)


def test_fgsm_step_reaches_linear_worst_case():
    model, (x, y) = linear_model(), interior_batch()
    grad, _ = attacks.input_grad(model, x, zeros(x), y)
    assert torch.equal(attacks.fgsm_step(x, zeros(x), grad, EPS, EPS), worst_case_delta(model, x, y))


def test_pgd_train_reaches_linear_worst_case_and_closed_form_margin():
    model, (x, y) = linear_model(), interior_batch()
    delta = attacks.pgd_train(model, x, y, EPS, EPS / 4, 10, attacks.uniform_delta(x, EPS))
    assert torch.allclose(delta, worst_case_delta(model, x, y), atol=1e-12)
    w = model[1].weight
    expected = margin(model, x, y) - EPS * (w[y] - w[1 - y]).abs().sum(1)  # margin - eps * ||w_y - w_o||_1
    assert torch.allclose(margin(model, x + delta, y), expected, atol=1e-9)


def test_clamp_passes_half_the_gradient_on_ties_and_none_outside():
    """The original clips with torch.min/torch.max: on 0 or 1 exactly the gradient halves, beyond it is zero."""
    z = torch.tensor([-0.5, 0.0, 0.3, 1.0, 1.5], requires_grad=True)
    attacks.clamp01(z).sum().backward()
    assert z.grad.tolist() == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_uniform_delta_is_unclipped_and_on_grid_when_asked():
    x = torch.zeros(64, 3, 4, 4)  # black images: a clipped draw could not be negative
    delta = attacks.uniform_delta(x, EPS, on_grid=True)
    assert delta.min() < 0 and delta.abs().max() <= EPS + 1e-7
    assert torch.allclose(delta * 255, (delta * 255).round(), atol=1e-4)
    assert len((delta * 255).round().unique()) == 17  # -8 ... 8


def test_fgsm_from_an_unclipped_random_start_keeps_the_start_where_the_clamp_binds():
    """A start pixel outside [0, 1] has zero gradient: no step there, so the original's delta keeps the start
    (clipped to the ball, then the image to [0, 1])."""
    model = linear_model()
    x = torch.full((4, 3, 4, 4), 1.0, dtype=torch.float64)
    x[:, 0] = 0.5
    start = torch.full_like(x, 6 / 255)  # pushes channels 1 and 2 above 1: clamped in the forward pass
    y = torch.zeros(4, dtype=torch.long)
    grad, _ = attacks.input_grad(model, x, start, y)
    assert grad[:, 1:].abs().max() == 0 and grad[:, 0].abs().min() > 0
    delta = attacks.fgsm_step(x, start, grad, EPS, EPS)
    assert torch.equal(delta[:, 1:], torch.zeros_like(delta[:, 1:]))  # start kept, then x + delta clipped to 1
    stepped = (start[:, 0] + EPS * grad[:, 0].sign()).clamp(-EPS, EPS)  # 8/255 or -2/255: from the start
    assert torch.allclose(delta[:, 0], stepped) and len(stepped.unique()) == 2


def test_attacks_stay_in_ball_and_image_range():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10))
    x = torch.rand(32, 3, 8, 8)
    x[:8], x[8:16] = 0.0, 1.0  # corners of the image cube, where clipping to [0, 1] binds
    y = torch.randint(0, 10, (32,))
    start = attacks.uniform_delta(x, EPS)
    deltas = [attacks.fgsm_step(x, start, attacks.input_grad(model, x, start, y)[0], EPS, EPS, 1.25),
              attacks.pgd_train(model, x, y, EPS, 2 / 255, 7, start), attacks.corner(x, start, EPS),
              attacks.pgd_eval(model.eval(), x, y, EPS, 2 / 255, 3, 2)[2], attacks.fgsm_eval(model, x, y, EPS, EPS)[1]]
    for delta in deltas:
        assert delta.abs().max() <= EPS + 1e-7
        assert (x + delta).min() >= 0 and (x + delta).max() <= 1


def test_input_grad_matches_closed_form_and_ignores_loss_scale():
    model, (x, y) = linear_model(), interior_batch()
    expected = analytic_input_grad(model, x, y)
    assert torch.allclose(attacks.input_grad(model, x, zeros(x), y)[0], expected, atol=1e-12)
    assert torch.allclose(attacks.input_grad(model, x, zeros(x), y, loss_scale=2.0**16)[0], expected, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # attacks never touch parameter .grad


def test_grad_sum_penalty_equals_definition_at_an_unclipped_grid_point():
    model, _ = linear_model(n_classes=2), None
    x = torch.ones(16, 3, 4, 4, dtype=torch.float64)  # white images: eta pushes half the pixels above 1
    y = torch.randint(0, 2, (16,))
    torch.manual_seed(5)
    eta = attacks.uniform_delta(x, EPS, on_grid=True)
    torch.manual_seed(5)
    value = attacks.grad_sum_penalty(model, x, y, EPS)
    assert (x + eta).max() > 1  # the point is not clipped, as in the original
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
    g1 = model.analytic_input_grad(x, y)
    torch.manual_seed(5)
    eta = attacks.uniform_delta(x, EPS, on_grid=True)
    torch.manual_seed(5)
    value = attacks.grad_align_penalty(model, x, y, EPS, g1)
    g1, g2 = g1.flatten(1), model.analytic_input_grad(x + eta, y).flatten(1)
    assert g1[0].abs().max() == 0 and g1[1:].norm(dim=1).min() > 0
    expected = 1 - cosine(g1[1:], g2[1:]).mean()
    assert expected > 1e-3  # three classes: the two gradients really differ in direction
    assert torch.allclose(value, expected, atol=1e-12)


def test_grad_align_penalty_gradient_reaches_parameters():
    model, (x, y) = GatedLinear(), interior_batch()
    y = y % 3
    grad_first = model.analytic_input_grad(x, y).detach()  # a constant of the penalty, as with FGSM
    finite_difference_check(seeded(lambda: attacks.grad_align_penalty(model, x, y, EPS, grad_first)),
                            model.linear.weight)


def test_grad_align_differentiates_a_differentiable_first_gradient_too():
    """PGD/none: the original's first gradient keeps its graph, so the penalty's parameter gradient changes."""
    model, (x, y) = GatedLinear(), interior_batch()
    y = y % 3

    def penalty(first_differentiable):
        torch.manual_seed(3)
        first = attacks.input_grad(model, x, zeros(x), y, clip=False, create_graph=first_differentiable)[0]
        return attacks.grad_align_penalty(model, x, y, EPS, first)
    constant = torch.autograd.grad(penalty(False), model.linear.weight)[0]
    both = torch.autograd.grad(penalty(True), model.linear.weight)[0]
    assert not torch.allclose(constant, both)
    finite_difference_check(lambda: penalty(True), model.linear.weight)


def test_grad_align_penalty_without_valid_examples_is_nan_unless_fixed():
    model, (x, y) = linear_model(), interior_batch(n=4)
    with torch.no_grad():
        model[1].weight.zero_()  # every input gradient is zero
    first = zeros(x)
    assert torch.isnan(attacks.grad_align_penalty(model, x, y, EPS, first))
    fixed = attacks.grad_align_penalty(model, x, y, EPS, first, empty_is_zero=True)
    assert fixed.item() == 1  # 1 - (mean over no examples, taken as 0)


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


def faint_gradient_model():
    """A two-layer linear classifier of 3x8x8 images into 10 classes (eval mode) whose input gradients, about 1e-7,
    lie below fp16's normal range: under fp16 autocast they underflow unless the loss is scaled."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(192, 32), nn.Linear(32, 10)).eval()
    with torch.no_grad():
        for layer in model[1:]:
            layer.weight.mul_(1e-3)
    return model


def test_loss_scale_keeps_fp16_evaluation_attacks_on_the_fp32_path():
    """Under fp16 autocast (a periodic evaluation under --half_prec) FGSM's and PGD's steps follow the sign of tiny
    input gradients only when the loss is scaled: then they match fp32 almost everywhere, without it they do not."""
    model = faint_gradient_model()
    x, y = torch.rand(32, 3, 8, 8), torch.randint(0, 10, (32,))

    def perturbations(loss_scale, half):
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.float16, enabled=half):
            fgsm = attacks.fgsm_eval(model, x, y, EPS, EPS, loss_scale)[1]
            pgd = attacks.pgd_eval(model, x, y, EPS, EPS / 4, 3, 1, loss_scale=loss_scale)[2]
        return torch.cat([fgsm, pgd])
    exact = perturbations(1.0, half=False)
    agree = {s: (perturbations(s, half=True) == exact).double().mean().item() for s in (1.0, 2.0**16 / len(y))}
    assert agree[2.0**16 / len(y)] > 0.999 and agree[1.0] < 0.5


def test_cosines_count_zero_vectors_as_one():
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]])
    assert torch.allclose(attacks.cosines_or_one(a, b), torch.tensor([0.0, 1.0, 1.0]))


# ---------------------------------------------------------------- the original's PGD evaluation protocol

class PixelLogits(nn.Module):
    """Three-class logits that depend on pixel 0 alone through a lookup: v -> (a(v), b(v), c(v))."""

    def __init__(self, table):
        super().__init__()
        self.table = table  # function of v (a tensor) -> logits (n, 3)

    def forward(self, x):
        return self.table(x.flatten(1)[:, 0])


def fixed_starts(monkeypatch, starts):
    """Make attacks.uniform_delta return the given perturbations, one per call, in order."""
    queue = list(starts)
    monkeypatch.setattr(attacks, "uniform_delta", lambda x, eps, on_grid=False: queue.pop(0).expand_as(x).clone())


def step_logits(below, above):
    """Logits `below` for v < 1/2 and `above` from 1/2 on (constant pieces, still part of the graph of v)."""
    def table(v):
        pieces = [torch.tensor(p, dtype=v.dtype).expand(len(v), 3) + 0 * v[:, None] for p in (below, above)]
        return torch.where((v < 0.5)[:, None], *pieces)
    return table


# At v = 0.2 class 0 wins but the loss is high (a near tie of three); at v = 0.8 class 1 wins by a little, with
# lower loss: the highest-loss point is correctly classified, a lower-loss one is not.
logits_at = step_logits((2.0, 1.9, 1.9), (1.0, 1.1, -10.0))


@pytest.mark.parametrize("order", ["high_loss_first", "low_loss_first"])
def test_pgd_eval_scores_the_highest_loss_restart_not_any_misclassification(order, monkeypatch):
    model = PixelLogits(logits_at)
    x = torch.full((1, 1, 2, 2), 0.4)  # clean: class 0, correct
    y = torch.zeros(1, dtype=torch.long)
    low, high = torch.full((1, 1, 2, 2), 0.4), torch.full((1, 1, 2, 2), -0.2)  # x + start: 0.8 (wrong), 0.2
    ce = lambda v: F.cross_entropy(logits_at(torch.tensor([v])), y).item()  # noqa: E731
    assert ce(0.2) > ce(0.8) and logits_at(torch.tensor([0.8])).argmax() == 1  # the premise of the test
    fixed_starts(monkeypatch, [high, low] if order == "high_loss_first" else [low, high])
    correct, robust, delta = attacks.pgd_eval(model, x, y, eps=0.4, step=0.0, n_iters=1, n_restarts=2)
    assert correct.item() and not robust.item()  # kept: the correct point of higher loss; strict: broken
    assert torch.allclose(delta, torch.full_like(x, -0.2))


def test_pgd_eval_skips_only_examples_whose_kept_loss_exceeds_ln_k(monkeypatch):
    """ln 3 = 1.0986: an example above it after restart 1 is not attacked again; its result stands."""
    calls, table = [], step_logits((2.0, 1.9, 1.9), (1.0, 3.0, -10.0))
    model = PixelLogits(lambda v: (calls.append(len(v)), table(v))[1])
    x = torch.tensor([0.5, 0.5]).view(2, 1, 1, 1)
    y = torch.tensor([0, 1])
    ce = F.cross_entropy(table(torch.tensor([0.8, 0.8])), y, reduction="none")
    assert ce[0] > math.log(3) > ce[1]  # at v = 0.8 example 0 is lost for good, example 1 is not
    fixed_starts(monkeypatch, [torch.full((1, 1, 1, 1), 0.3)] * 3)
    monkeypatch.setattr(attacks, "ACTIVE_BUCKET", 1)  # no padding of the attacked subset
    correct, robust, _ = attacks.pgd_eval(model, x, y, eps=0.3, step=0.0, n_iters=1, n_restarts=3)
    assert correct.tolist() == [False, True] and robust.tolist() == [False, True]
    assert calls == [2, 2, 2, 1, 1, 1, 1]  # clean; restart 1 (gradient, final); restarts 2-3 on example 1 only


@pytest.mark.parametrize("skip_lost", [True, False])
def test_pgd_eval_equals_closed_form_of_two_class_linear_model(skip_lost):
    """Enough steps reach the worst case from any start: robust iff margin > eps ||w_y - w_o||_1."""
    model, (x, y) = linear_model(scale=0.3), interior_batch(n=64)
    w = model[1].weight
    expected = margin(model, x, y) - EPS * (w[y] - w[1 - y]).abs().sum(1) > 0
    assert 0 < expected.sum() < len(y)  # the check means something only if both outcomes occur
    correct, robust, _ = attacks.pgd_eval(model, x, y, EPS, EPS / 4, n_iters=10, n_restarts=3, skip_lost=skip_lost)
    assert torch.equal(correct, expected) and torch.equal(robust, expected)


@pytest.mark.parametrize("n_iters, n_restarts", [(0, 3), (10, 0)])
def test_pgd_eval_without_iterations_or_restarts_scores_the_clean_point(n_iters, n_restarts):
    """The original's attack returns a zero perturbation for 0 iterations and keeps its zero one for 0 restarts:
    accuracy is clean accuracy, and no random start is drawn."""
    model, (x, y) = linear_model(scale=0.3), interior_batch(n=64)
    clean = margin(model, x, y) > 0
    assert 0 < clean.sum() < len(y)
    rng = torch.get_rng_state()
    correct, robust, delta = attacks.pgd_eval(model, x, y, EPS, EPS / 4, n_iters=n_iters, n_restarts=n_restarts)
    assert torch.equal(correct, clean) and torch.equal(robust, clean) and not delta.any()
    assert torch.equal(torch.get_rng_state(), rng)


def test_attacked_subset_is_padded_to_few_batch_sizes(monkeypatch):
    """Batch sizes the model sees: the full batch, then multiples of ACTIVE_BUCKET; results equal unpadded ones."""
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    sizes = []
    model = lambda v: (sizes.append(len(v)), conv(v))[1]  # noqa: E731
    x, y = torch.rand(150, 3, 8, 8), torch.randint(0, 10, (150,))
    results = {}
    for bucket in (1, 64):
        monkeypatch.setattr(attacks, "ACTIVE_BUCKET", bucket)
        sizes.clear()
        torch.manual_seed(1)
        results[bucket] = attacks.pgd_eval(model, x, y, 8 / 255, 2 / 255, n_iters=3, n_restarts=4)
        seen = set(sizes)
        if bucket == 1:
            assert len(seen - {150}) >= 2  # the premise: the subset shrinks over the restarts
        else:
            assert seen <= {64, 128, 150} and len(seen) >= 2
    assert all(torch.equal(a, b) for a, b in zip(results[1], results[64], strict=True))


def test_skipping_lost_examples_changes_no_result():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    x, y = torch.rand(128, 3, 8, 8), torch.randint(0, 10, (128,))
    for seed in range(3):
        results = []
        for skip in (True, False):
            torch.manual_seed(seed)
            results.append(attacks.pgd_eval(model, x, y, 4 / 255, 1 / 255, n_iters=5, n_restarts=3, skip_lost=skip))
        (fast_c, fast_r, _), (plain_c, plain_r, _) = results
        assert torch.equal(fast_c, plain_c) and torch.equal(fast_r, plain_r)
        assert not (plain_r & ~plain_c).any()  # the strict rule is never above the original one


def test_batched_restarts_equal_the_restart_loop_and_leave_the_same_random_stream():
    """One pass of n_restarts x batch: per example the same correctness, strict rule and kept perturbation as the
    loop without the skip (and the same correctness as with it), and the random stream where the loop leaves it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    x, y = torch.rand(96, 3, 8, 8), torch.randint(0, 10, (96,))
    for seed in range(3):
        results, after = {}, {}
        for mode in ("loop", "skip", "batched"):
            torch.manual_seed(seed)
            results[mode] = attacks.pgd_eval(model, x, y, 4 / 255, 1 / 255, n_iters=5, n_restarts=4,
                                             skip_lost=mode == "skip", batched=mode == "batched")
            after[mode] = torch.rand(1)
        assert all(torch.equal(a, b) for a, b in zip(results["loop"], results["batched"], strict=True))
        assert torch.equal(results["skip"][0], results["batched"][0])
        assert torch.equal(results["skip"][1], results["batched"][1])
        assert torch.equal(after["loop"], after["batched"]) and torch.equal(after["skip"], after["batched"])
        assert 0 < results["batched"][0].sum() < len(y)  # some examples hold, some break: the premise


def test_batched_restarts_keep_the_later_restart_on_a_tie():
    """A model blind to its input: every restart's loss ties, and the loop's >= keeps the last restart's point."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 10)).eval()
    nn.init.zeros_(model[1].weight)
    x, y = torch.rand(8, 3, 4, 4), torch.randint(0, 10, (8,))
    torch.manual_seed(5)
    _, _, delta = attacks.pgd_eval(model, x, y, 8 / 255, 2 / 255, 2, 3, batched=True)
    torch.manual_seed(5)
    starts = [attacks.uniform_delta(x, 8 / 255) for _ in range(3)]
    last = attacks.clip_image(x, attacks.project_pgd(x, starts[-1], 8 / 255))  # no step: a zero gradient
    assert torch.equal(delta, last) and not torch.equal(delta, attacks.clip_image(x, starts[0]))


def original_attack_pgd(model, X, y, eps, alpha, attack_iters, n_restarts, rs=True):
    """The original's utils.attack_pgd at 9b877ea, re-typed for the CPU (its L-inf branch, fp32, no apex)."""
    def clamp(X, lower, upper):
        return torch.max(torch.min(X, torch.FloatTensor(1).fill_(upper)), torch.FloatTensor(1).fill_(lower))
    max_loss = torch.zeros(y.shape[0])
    max_delta = torch.zeros_like(X)
    for _ in range(n_restarts):
        delta = torch.zeros_like(X)
        if attack_iters == 0:
            return delta.detach()
        if rs:
            delta.uniform_(-eps, eps)
        delta.requires_grad = True
        for _ in range(attack_iters):
            output = model(X + delta)
            loss = F.cross_entropy(output, y)
            loss.backward()
            grad = delta.grad.detach()
            delta.data = delta + alpha * torch.sign(grad)
            delta.data = clamp(X + delta.data, 0, 1) - X
            delta.data = clamp(delta.data, -eps, eps)
            delta.grad.zero_()
        with torch.no_grad():
            output = model(X + delta)
            all_loss = F.cross_entropy(output, y, reduction="none")
            max_delta[all_loss >= max_loss] = delta.detach()[all_loss >= max_loss]
            max_loss = torch.max(max_loss, all_loss)
    max_delta = clamp(X + max_delta, 0, 1) - X
    return max_delta


def original_cosines(v1, v2):
    """The original's utils.avg_cos_np before its mean: per-example cosines, nan and inf read as 1."""
    v1, v2 = v1.numpy(), v2.numpy()
    norms1 = (v1 ** 2).sum((1, 2, 3), keepdims=True) ** 0.5
    norms2 = (v2 ** 2).sum((1, 2, 3), keepdims=True) ** 0.5
    cos_vals = ((v1 / norms1) * (v2 / norms2)).sum((1, 2, 3))
    cos_vals[~np.isfinite(cos_vals)] = 1.0
    return torch.from_numpy(cos_vals)


def test_periodic_cosine_is_the_originals_where_restarts_replace_a_lost_examples_perturbation():
    """The logged cos_fgsm_pgd reads the kept PGD perturbation: with 3 restarts and examples lost above ln K after
    the first, the periodic evaluation keeps the original's perturbation bit for bit (its `all_loss >= max_loss`
    over every example), where the ln K skip would keep an earlier restart's; accuracies are the same either way."""
    import evaluation
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 10)).eval()
    with torch.no_grad():
        model[3].weight.mul_(8)  # confident, often wrong: many examples lost above ln 10 at once
    x, y = torch.rand(64, 3, 8, 8), torch.randint(0, 10, (64,))
    eps, alpha, iters, restarts = 8 / 255, 2 / 255, 3, 3
    torch.manual_seed(1)
    original = original_attack_pgd(model, x, y, eps, alpha, iters, restarts)
    fgsm = original_attack_pgd(model, x, y, eps, eps, 1, 1, rs=False)
    results = {}
    for skip in (False, True):
        torch.manual_seed(1)
        results[skip] = attacks.pgd_eval(model, x, y, eps, alpha, iters, restarts, skip_lost=skip)
    assert torch.equal(results[False][2], original)
    assert torch.equal(results[True][0], results[False][0])  # the skip changes no accuracy...
    replaced = (results[True][2] != original).flatten(1).any(1)
    assert replaced.sum() >= 5  # ...but it does change perturbations: the premise
    torch.manual_seed(1)
    logged = evaluation.periodic_test_stats(model, eps, iters, restarts)(x, y)
    expected = original_cosines(fgsm, original)
    assert torch.allclose(logged["cos_fgsm_pgd"], expected, rtol=0, atol=1e-6)  # numpy's sums, torch's sums
    assert not torch.allclose(attacks.cosines_or_one(fgsm, results[True][2])[replaced], expected[replaced],
                              rtol=0, atol=1e-3)  # the skip's would not be
