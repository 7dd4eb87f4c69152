"""Loss surfaces around test images, as the paper's DBD.py draws them: the cross-entropy over the plane through the
image spanned by the FGSM direction (eps times the sign of the input gradient) and a random direction (eps times a
random sign per pixel), coloured by the predicted class, with the L-inf eps-ball's boundary marked.

    python surface.py runs/RUN                                          # the last model, the first 4 test images
    python surface.py runs/RUN --models last early_stopped --n_images 8 --out figures/

Writes OUT/<model>-image<i>.png (default OUT: RUN/surfaces) and prints each path. Models run in eval mode; as in
DBD.py the points are not clipped to [0, 1] (--clip clips them). Coordinates are in units of eps.
"""
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

import attacks
import data
import runs
import utils
from config import UsageError


def plane(model, x, y, eps, generator):
    """(u, v) for one image x (C, H, W) of label y: eps times the sign of the input gradient of the loss at x (the
    FGSM direction), and eps times a random sign per pixel."""
    grad = attacks.input_grad(model, x[None], torch.zeros_like(x[None]), y[None], clip=False)[0][0]
    signs = torch.randint(0, 2, x.shape, generator=generator).to(x.device) * 2 - 1
    return eps * grad.sign(), eps * signs.to(x.dtype)


@torch.no_grad()
def loss_surface(model, x, y, u, v, coords, batch_size=1024, clip=False):
    """Cross-entropy and predicted class at x + a u + b v for a, b in coords; arrays of shape (len(coords),
    len(coords)), row j and column i holding (a, b) = (coords[i], coords[j])."""
    b, a = torch.meshgrid(coords, coords, indexing="ij")
    shape = (-1,) + (1,) * x.dim()
    points = x + a.reshape(shape).to(x) * u + b.reshape(shape).to(x) * v
    if clip:
        points = points.clamp(0, 1)
    losses, preds = [], []
    for chunk in points.split(batch_size):
        logits = model(chunk)
        losses.append(F.cross_entropy(logits, y.expand(len(chunk)), reduction="none"))
        preds.append(logits.argmax(1))
    return torch.cat(losses).view(a.shape).cpu().numpy(), torch.cat(preds).view(a.shape).cpu().numpy()


def linf_in_units(u, v, coords):
    """max over pixels of |a u + b v| for a, b in coords (same layout as loss_surface), in units of max |u|, |v|:
    the eps-ball's boundary in the plane is where this equals 1."""
    scale = max(u.abs().max(), v.abs().max()).clamp_min(1e-12)
    pairs = torch.unique(torch.stack([u.flatten(), v.flatten()], 1) / scale, dim=0).cpu().double()
    b, a = torch.meshgrid(coords.double(), coords.double(), indexing="ij")
    return (a[..., None] * pairs[:, 0] + b[..., None] * pairs[:, 1]).abs().amax(-1).numpy()


def plot(coords, loss, pred, linf, label, classes, title, path):
    """Left: the loss surface in 3-D, each cell in its predicted class's colour; right: the predicted classes seen
    from above with loss contours, the eps-ball's boundary (dashed) and the image (+)."""
    plt = utils.pyplot()
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    palette = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    colours = [palette(k % palette.N) for k in range(len(classes))]
    grid = coords.numpy()
    a, b = np.meshgrid(grid, grid)
    fig = plt.figure(figsize=(11, 4.6))
    ax3 = fig.add_subplot(1, 2, 1, projection="3d")
    ax3.plot_surface(a, b, loss, facecolors=np.array(colours)[pred], rstride=1, cstride=1, linewidth=0,
                     antialiased=False, shade=False)
    ax3.set(xlabel="FGSM direction (eps)", ylabel="random direction (eps)", zlabel="cross-entropy")
    ax = fig.add_subplot(1, 2, 2)
    half = (grid[1] - grid[0]) / 2
    ax.imshow(pred, origin="lower", cmap=ListedColormap(colours), vmin=-0.5, vmax=len(classes) - 0.5,
              extent=(grid[0] - half, grid[-1] + half, grid[0] - half, grid[-1] + half), interpolation="nearest")
    contours = ax.contour(a, b, loss, levels=8, colors="black", linewidths=0.6)
    ax.clabel(contours, fontsize=6)
    ax.contour(a, b, linf, levels=[1.0], colors="white", linestyles="--", linewidths=1.5)
    ax.plot(0, 0, "k+", markersize=10)
    ax.set(xlabel="FGSM direction (eps)", ylabel="random direction (eps)")
    shown = sorted(set(pred.flatten().tolist()) | {label})
    ax.legend(handles=[Patch(color=colours[k], label=classes[k] + (" (true)" if k == label else "")) for k in shown],
              loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=8, title="predicted")
    fig.suptitle(title, fontsize=10)
    utils.save_figure(fig, path)


def build_parser():
    p = runs.saved_run_parser(__doc__, default_models=("last",), seed_help="seed of the random direction")
    p.add_argument("--n_images", type=int, default=4, help="the first this many test images")
    p.add_argument("--range", nargs=2, type=float, default=[-2.0, 2.0], metavar=("LOW", "HIGH"),
                   help="coordinates along both directions, in units of eps")
    p.add_argument("--grid", type=int, default=41, help="points along each direction")
    p.add_argument("--clip", action="store_true", help="clip the points to [0, 1] (DBD.py does not)")
    p.add_argument("--batch_size", type=int, default=1024, help="points per forward pass")
    p.add_argument("--out", help="folder of the PNGs (default: RUN/surfaces)")
    return p


def prepare(argv):
    opts = build_parser().parse_args(argv)
    for flag in ("n_images", "grid", "batch_size"):
        if getattr(opts, flag) < (2 if flag == "grid" else 1):
            raise UsageError(f"--{flag}={getattr(opts, flag)}: must be at least {2 if flag == 'grid' else 1}")
    if not opts.range[0] < opts.range[1]:
        raise UsageError(f"--range={opts.range}: LOW must be below HIGH")
    saved = runs.open_saved_run(opts)
    opts.out = opts.out or os.path.join(opts.run, "surfaces")
    try:
        os.makedirs(opts.out, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out={opts.out!r}: cannot create it ({err.strerror})") from None
    return opts, saved


def draw_surfaces(saved, name, xs, ys, opts):
    """Draw the loaded model's surface around each image; yields each PNG's path once written."""
    coords = torch.linspace(*opts.range, opts.grid)
    generator = torch.Generator().manual_seed(opts.seed)  # the same random directions for every model
    for i, (x, y) in enumerate(zip(xs.to(saved.device), ys.to(saved.device), strict=True)):
        u, v = plane(saved.model, x, y, opts.eps / 255, generator)
        loss, pred = loss_surface(saved.model, x, y, u, v, coords.to(saved.device), opts.batch_size, opts.clip)
        title = (f"{runs.run_name(opts.run)}, {name} model, test image {i} "
                 f"({saved.dataset.classes[int(y)]}), eps {opts.eps:g}/255")
        path = os.path.join(opts.out, f"{name}-image{i}.png")
        plot(coords, loss, pred, linf_in_units(u, v, coords), int(y), saved.dataset.classes, title, path)
        yield path


def main(argv=None):
    try:
        opts, saved = prepare(sys.argv[1:] if argv is None else argv)
    except (UsageError, data.DataError) as err:
        print(f"surface.py: error: {err}", file=sys.stderr)
        return 2
    test_x, test_y = saved.dataset.test_x[:opts.n_images], saved.dataset.test_y[:opts.n_images]
    xs, ys = next(data.eval_batches(test_x, test_y, len(test_y)))
    for name in opts.models:
        if name not in saved.states:
            print(f"surface.py: {name}: not saved in this run, skipped", file=sys.stderr)
            continue
        saved.model.load_state_dict(saved.states[name])
        try:
            for path in draw_surfaces(saved, name, xs, ys, opts):
                print(path)
        except OSError as err:
            print(f"surface.py: error: could not write a picture in {opts.out} ({err.strerror or err})",
                  file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
