"""surface.py: the plane and the loss over it against a linear model's closed form, the eps-ball's boundary against
brute force, and the command line."""
import os
import shlex

import numpy as np
import torch
import torch.nn as nn
from test_train import TINY_RUN

import surface
import train

EPS = 8 / 255


def test_plane_and_loss_surface_equal_a_linear_models_closed_form():
    """For logits W x + c: the FGSM direction is eps sign(W^T (softmax - onehot)), and the loss at x + a u + b v is
    logsumexp(z) - z_y with z = W (x + a u + b v) + c, computed here in numpy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(0), nn.Linear(48, 3)).double()
    x, y = torch.rand(3, 4, 4, dtype=torch.float64), torch.tensor(1)
    flat = nn.Sequential(nn.Flatten(), model[1])  # the same weights, for batches
    u, v = surface.plane(flat, x, y, EPS, torch.Generator().manual_seed(0))
    w, c = model[1].weight.detach().numpy(), model[1].bias.detach().numpy()
    z = w @ x.numpy().ravel() + c
    p = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    assert np.array_equal(u.numpy().ravel(), EPS * np.sign(w.T @ (p - np.eye(3)[1])))
    assert set(np.unique(v.numpy() / EPS)) == {-1.0, 1.0}
    coords = torch.linspace(-2, 2, 9, dtype=torch.float64)
    loss, pred = surface.loss_surface(flat, x, y, u, v, coords, batch_size=7)
    for j, b in enumerate(coords.numpy()):
        for i, a in enumerate(coords.numpy()):
            zz = w @ (x.numpy() + a * u.numpy() + b * v.numpy()).ravel() + c
            assert abs(loss[j, i] - (np.log(np.exp(zz - zz.max()).sum()) + zz.max() - zz[1])) < 1e-12
            assert pred[j, i] == zz.argmax()
    assert loss[4, 8] > loss[4, 4]  # the loss grows along the FGSM direction


def test_the_eps_balls_boundary_is_where_the_perturbations_largest_pixel_is_eps():
    g = torch.Generator().manual_seed(0)
    u = EPS * torch.randint(-1, 2, (3, 5, 5), generator=g).double()  # zero-gradient pixels give 0
    v = EPS * (torch.randint(0, 2, (3, 5, 5), generator=g).double() * 2 - 1)
    coords = torch.linspace(-2, 2, 11, dtype=torch.float64)
    linf = surface.linf_in_units(u, v, coords)
    for j, b in enumerate(coords):
        for i, a in enumerate(coords):
            assert abs(linf[j, i] - (a * u + b * v).abs().max() / EPS) < 1e-12
    assert linf[5, 10] == 2 and abs(linf[5, 5]) < 1e-12  # (a, b) = (2, 0): twice eps; the image itself: 0


def test_command_line_writes_one_png_per_image_and_model(tmp_path, tiny_data, capsys):
    run_args = shlex.split(f"{TINY_RUN} --data_dir={tiny_data} --out_dir={tmp_path} --run_name=r --preset=fgsm")
    assert train.main(run_args) == 0
    capsys.readouterr()
    out = tmp_path / "pictures"
    argv = [str(tmp_path / "r"), "--models", "last", "early_stopped", "--n_images", "2", "--grid", "5",
            "--out", str(out)]
    assert surface.main(argv) == 0
    expected = {f"{m}-image{i}.png" for m in ("last", "early_stopped") for i in (0, 1)}
    assert set(os.listdir(out)) == expected
    assert all((out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in expected)
    assert capsys.readouterr().out.split() == [str(out / f"{m}-image{i}.png")
                                              for m in ("last", "early_stopped") for i in (0, 1)]


def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys):
    for argv, named in (([str(tmp_path / "none")], "RUN_DIR"), ([str(tmp_path), "--grid", "1"], "--grid=1"),
                        ([str(tmp_path), "--range", "1", "-1"], "--range"),
                        ([str(tmp_path), "--models", "best"], "--models='best'")):
        assert surface.main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and named in err
