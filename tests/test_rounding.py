"""The original's operations in the original's order, bit for bit: the projections of its FGSM and PGD steps,
its 1/255 grid, and its uint8-to-float conversion. Each reference below is the original's line re-typed
(9b877ea: utils.clamp is torch.max(torch.min(X, u), l) with one-element float32 bounds)."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

import attacks
import data

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU"))]


def original_clamp(t, low, high):
    bound = lambda v: torch.full((1,), v, dtype=torch.float32, device=t.device)  # noqa: E731  FloatTensor(1).fill_
    return torch.max(torch.min(t, bound(high)), bound(low))


def original_pgd_step(x, delta, grad, eps, alpha):
    """utils.attack_pgd / attack_pgd_training: the step, the image to [0, 1], then the ball."""
    delta = delta + alpha * torch.sign(grad)
    delta = original_clamp(x + delta, 0, 1) - x
    return original_clamp(delta, -eps, eps)


def original_fgsm_step(x, delta, grad, eps, fgsm_alpha):
    """train.py's FGSM branch: the ball first, then the image to [0, 1]."""
    argmax_delta = eps * torch.sign(grad)
    delta = original_clamp(delta + fgsm_alpha * argmax_delta, -eps, eps)
    return original_clamp(x + delta, 0, 1) - x


def hard_cases(device, eps):
    """Every pixel value, with perturbations at and beside the ball's bounds and the image's: ties included."""
    g = torch.Generator().manual_seed(0)
    x = torch.arange(256, dtype=torch.float32).div(255).repeat_interleave(64)
    delta = torch.cat([torch.full((len(x) // 4,), v) for v in (eps, -eps)] +
                      [(torch.rand(len(x) // 2, generator=g) * 2 - 1) * 3 * eps])
    delta = delta[torch.randperm(len(x), generator=g)]
    delta[:256] = 1 - x[:256]  # x + delta exactly 1, and exactly 0 just after
    delta[256:512] = -x[256:512]
    grad = torch.randn(len(x), generator=g)
    grad[::7] = 0  # sign 0: no step
    return (t.view(-1, 4, 4, 4).to(device) for t in (x, delta, grad))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps_px, step_px", [(8, 2), (16, 4), (10, 2.5)])
def test_pgd_step_is_the_originals_bit_for_bit(device, eps_px, step_px):
    eps, step = eps_px / 255, step_px / 255
    x, delta, grad = hard_cases(device, eps)
    expected = original_pgd_step(x, delta, grad, eps, step)
    assert torch.equal(attacks.pgd_step(x, delta, grad, eps, step), expected)
    # the other order is the same set, rounded otherwise: these cases tell the two apart
    assert not torch.equal(attacks.project(x, delta + step * torch.sign(grad), eps), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("eps_px, fgsm_alpha", [(8, 1.0), (16, 1.25), (10, 1.0), (6, 1.1)])
def test_fgsm_step_is_the_originals_bit_for_bit(device, eps_px, fgsm_alpha):
    eps = eps_px / 255
    x, delta, grad = hard_cases(device, eps)
    assert torch.equal(attacks.fgsm_step(x, delta, grad, eps, eps, fgsm_alpha),
                       original_fgsm_step(x, delta, grad, eps, fgsm_alpha))


@pytest.mark.parametrize("device", DEVICES)
def test_grid_is_the_originals_mul_round_div_for_every_level(device):
    k = torch.arange(-255, 256, dtype=torch.float32)
    offsets = torch.tensor([-0.49, -0.25, 0.0, 0.25, 0.49])  # in levels: all round to k
    delta = ((k[:, None] + offsets) / 255).to(device)
    expected = delta.clone().mul_(255).round_().div_(255)  # utils.tensor_discrete
    assert torch.equal(attacks.to_grid(delta), expected)
    if device == "cpu":  # a CPU division: exactly fl32(k / 255), which k * fl32(1/255) is not for some k
        assert torch.equal(attacks.to_grid(delta), (k / 255)[:, None].expand_as(delta))
        assert not torch.equal(torch.round(delta * 255) * (1 / 255), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_uniform_delta_is_the_originals_draw(device):
    """utils.get_uniform_delta: zeros, uniform_(-eps, eps), then the grid; the same values and the same state of
    the random stream after it."""
    x = torch.rand(8, 3, 4, 4, device=device)
    eps = 16 / 255
    torch.manual_seed(3)
    ours = attacks.uniform_delta(x, eps, on_grid=True)
    after = torch.rand(1, device=device)
    torch.manual_seed(3)
    theirs = torch.zeros(x.shape, device=device).uniform_(-eps, eps).mul_(255).round_().div_(255)
    assert torch.equal(ours, theirs) and torch.equal(after, torch.rand(1, device=device))


@pytest.mark.parametrize("device", DEVICES)
def test_image_conversion_is_totensor_for_all_256_values(device):
    """The original converts with torchvision's ToTensor on the CPU, before the batch moves to the device."""
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = transforms.ToTensor()(Image.fromarray(np.stack([pixels] * 3, axis=2)))
    x_u8 = torch.from_numpy(np.stack([pixels] * 3))[None].to(device)
    assert torch.equal(data.to_unit(x_u8).cpu(), expected[None])
    (batch, _), = data.eval_batches(x_u8, torch.zeros(1, dtype=torch.long, device=device), 1)
    assert torch.equal(batch.cpu(), expected[None])


def test_pgd_evaluation_returns_the_originals_reclamped_perturbation():
    """attack_pgd ends with clamp(x + delta, 0, 1) - x: the same image, a delta rounded anew."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 10)).eval()
    x = torch.randint(0, 256, (64, 3, 4, 4)).float().div(255)
    y = torch.randint(0, 10, (64,))
    torch.manual_seed(1)
    _, _, delta = attacks.pgd_eval(model, x, y, 8 / 255, 2 / 255, 3, 1)
    torch.manual_seed(1)
    start = attacks.uniform_delta(x, 8 / 255)
    last = attacks.pgd_restart(model, x, y, start, 8 / 255, 2 / 255, 3)[0]
    assert torch.equal(delta, original_clamp(x + last, 0, 1) - x) and not torch.equal(delta, last)


def test_cosines_and_norms_are_the_originals_formulas():
    """GradAlign's cosine (train.py: the rows with two non-zero gradients, each divided by its l2_norm_batch,
    products summed) and GradSum's norm ((g * g).sum() ** 0.5), bit for bit; also with a zero gradient's
    row, whose gradients stay finite."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(64, 3, 8, 8, generator=g, requires_grad=True)
    b = torch.randn(64, 3, 8, 8, generator=g)
    b[3] = 0
    cos, valid = attacks.gradient_cosines(a, b)
    norms = lambda v: (v**2).sum([1, 2, 3]) ** 0.5  # noqa: E731  utils.l2_norm_batch
    idx = (norms(a) != 0) * (norms(b) != 0)
    a1, b1 = a[idx], b[idx]
    expected = torch.sum((a1 / norms(a1)[:, None, None, None]) * (b1 / norms(b1)[:, None, None, None]), (1, 2, 3))
    assert torch.equal(valid, idx) and torch.equal(cos[valid], expected)
    (grad,) = torch.autograd.grad(cos[valid].sum(), a)
    assert torch.isfinite(grad).all() and grad[3].abs().max() == 0
    assert torch.equal(attacks.l2_norm(a), (a * a).sum() ** 0.5)
    assert not torch.equal(attacks.l2_norm(a), a.norm())  # the formulas round apart: this input tells them apart
