"""Benchmark: what each training method and the evaluation cost, measured side by side in one run.

Prints (1) the time of one training iteration of each method as a ratio to a plain (no attack) iteration, on the
same model, batch, data, precision and memory format, methods interleaved round by round (the regularisers also
with autograd's double backwards, and under --half_prec with BatchNorm in fp32); (2) the number of operators (each
at least one kernel launch on a GPU) in one iteration of each; (3) the throughput of the final PGD-50-10
evaluation (the original protocol), images/s, with and without skipping the examples whose kept loss already
exceeds ln(K), with both accuracies; (4) the share of wall time that periodic evaluation takes with the README
flags (PGD-50-10 on 256 test and 256 training points every 200 iterations); (5) the data pipeline; (6) GradSum-FD's
error against exact GradSum on the batch, value and parameter gradient, as its step shrinks.

    python bench.py                                   # CPU: PreActResNet-18, batch 32, random weights
    python bench.py --run runs/X                      # a trained run's model on its test images
    python bench.py --device cuda --batch_size 256 --half_prec --channels_last
    python bench.py --device cuda --batch_size 256 --profile FGSM+GradSum   # where one iteration's time goes

On random weights PGD breaks every example, at losses that may stay below ln K for several restarts; pass a
trained run (--run) for evaluation figures that mean something.
"""
import argparse
import shlex
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode  # what torch.utils.flop_counter builds on

import attacks
import config
import data
import evaluation
import methods
import models
import runs
import utils
from models import build_model

AUTOGRAD_DOUBLE_BACKWARD = "--preset={} --bn_double_backward=autograd --conv_double_backward=autograd"
METHODS = {  # name: train.py flags (presets from methods.PRESETS: docs/iteration.md#presets)
    "none": "--preset=standard",
    "FGSM": "--preset=fgsm",
    "FGSM+VFSAT": "--preset=vfsat",
    "FGSM+GradSum": "--preset=gradsum",
    "FGSM+GradSum, autograd's BN double backward": "--preset=gradsum --bn_double_backward=autograd",
    "FGSM+GradSum, autograd's conv double backward": "--preset=gradsum --conv_double_backward=autograd",
    "FGSM+GradSum, autograd's double backward": AUTOGRAD_DOUBLE_BACKWARD.format("gradsum"),
    "FGSM+GradAlign": "--preset=gradalign",
    "FGSM+GradAlign, autograd's BN double backward": "--preset=gradalign --bn_double_backward=autograd",
    "FGSM+GradAlign, autograd's conv double backward": "--preset=gradalign --conv_double_backward=autograd",
    "FGSM+GradAlign, autograd's double backward": AUTOGRAD_DOUBLE_BACKWARD.format("gradalign"),
    "FGSM-RS+GradSum (fixed)": "--preset=gradsum --attack_init=random --fix_gradsum",
    "FGSM-RS+GradAlign": "--preset=gradalign --attack_init=random",
    "PGD-2": "--preset=pgd --pgd_train_n_iters=2 --pgd_alpha_train=4",
    "PGD-10": "--preset=pgd",
    "N-FGSM": "--preset=n_fgsm",
    "FGSM+ELLE": "--preset=elle",
    "FGSM+ELLE-A": "--preset=elle_a",
    "FGSM+GradSum-FD": "--preset=gradsum_fd",
}
HALF_PREC_METHODS = {  # added under --half_prec
    "FGSM+GradSum, fp32 BN": "--preset=gradsum --bn_float32",
    "FGSM+GradAlign, fp32 BN": "--preset=gradalign --bn_float32",
}
ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")  # no kernel runs
SECTIONS = ("methods", "ops", "eval", "data", "fd")
FD_STEPS_PX = (4, 2, 1, 0.5, 0.25, 0.1, 0.01)  # GradSum-FD's moves compared with exact GradSum, pixels/255 RMS
WARMUP_ITERS = 2  # the first creates the optimiser's state; under --cuda_graph the second captures the graph
README_EVAL = {"eval_iter_freq": 200, "n_eval_every_k_iter": 256, "attack_iters": 50, "n_restarts": 10}


def method_args(flags, base, device):
    args = config.build_parser().parse_args(shlex.split(f"{base} --preset=fgsm {flags}"))
    args.device = device
    return args


def radii(eps):
    return methods.StepRadii(eps=eps, fgsm_eps=eps, pgd_eps=eps, fgsm_alpha=1.0, reg_eps=eps)


def time_iterations(model, setup, x, y, eps, n_iters):
    """Seconds per training iteration, over n_iters iterations."""
    step, args = setup
    models.configure_double_backward(model, args, methods.uses_double_backprop(args))
    utils.sync(x.device)
    start = time.perf_counter()
    for _ in range(n_iters):
        step(x, y, radii(eps))
    utils.sync(x.device)
    return (time.perf_counter() - start) / n_iters


def bench_methods(model, x, y, eps, base_flags, device, n_iters, rounds, presets):
    """Median seconds per iteration of each preset; warm-up iterations each, then interleaved rounds."""
    setups = {}
    for name, flags in presets.items():
        setups[name] = training_setup(model, method_args(flags, base_flags, device))
        time_iterations(model, setups[name], x, y, eps, WARMUP_ITERS)
    times = {name: [] for name in presets}
    for _ in range(rounds):
        for name, setup in setups.items():
            times[name].append(time_iterations(model, setup, x, y, eps, n_iters))
    return {name: statistics.median(t) for name, t in times.items()}


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators that do work (views and bare allocations apart, and what returns no tensor): on a
    GPU each launches at least one kernel, and a step of many small ones is bound by the host's launch time."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        returns_tensor = any(isinstance(t, torch.Tensor) for t in (out if isinstance(out, (tuple, list)) else [out]))
        self.n += returns_tensor and not func.is_view and name not in ALLOCATIONS
        return out


def count_operators(model, x, y, eps, base_flags, device, presets):
    """Operators per training iteration of each preset, counted after the warm-up iterations (a graph's replay
    counts none)."""
    counts = {}
    for name, flags in presets.items():
        setup = training_setup(model, method_args(flags, base_flags, device))
        time_iterations(model, setup, x, y, eps, WARMUP_ITERS)
        with OperatorCount() as count:
            time_iterations(model, setup, x, y, eps, 1)
        counts[name] = count.n
    return counts


def training_setup(model, args):
    """(the training iteration as a function of x, y and the radii, args): train.py's TrainingStep, from the same
    StepSettings."""
    return methods.TrainingStep(model, methods.StepSettings.from_flags(args), args.device), args


def profile_method(model, x, y, eps, args, n_rows=25):
    """torch.profiler's table of the operators and kernels of one training iteration, after the warm-up ones."""
    setup = training_setup(model, args)
    time_iterations(model, setup, x, y, eps, WARMUP_ITERS)
    cuda = x.device.type == "cuda"
    activities = [torch.profiler.ProfilerActivity.CPU] + [torch.profiler.ProfilerActivity.CUDA] * cuda
    with torch.profiler.profile(activities=activities) as prof:
        time_iterations(model, setup, x, y, eps, 1)
    return prof.key_averages().table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
                                     row_limit=n_rows)


EVAL_MODES = {"every restart on every example": dict(skip_lost=False),
              "skip examples whose loss > ln K": dict(skip_lost=True),
              "every restart in one batch (--batched_restarts)": dict(batched=True)}


def bench_eval(model, x_u8, y, eps, batch_size, mode):
    """(images/s, accuracy under the original protocol) of PGD-50-10 with step eps/4 over x_u8, in one of
    EVAL_MODES."""
    model.eval()
    torch.manual_seed(0)
    utils.sync(x_u8.device)
    start = time.perf_counter()
    stats = evaluation.pgd_stats(model, eps, README_EVAL["attack_iters"], README_EVAL["n_restarts"],
                                 **EVAL_MODES[mode])
    acc = evaluation.fractions(stats, ("pgd",), data.eval_batches(x_u8, y, batch_size))[0]["pgd"]
    utils.sync(x_u8.device)
    model.train()
    return len(y) / (time.perf_counter() - start), acc


def bench_data_pipeline(device, batch_size, n_iters):
    """Images/s of the batch pipeline (shuffle, crop, flip, to float) against images/s of an FGSM training step,
    for CIFAR-10 (PreActResNet-18, 32 px) and Tiny ImageNet (PreActResNet-34, 64 px) shapes."""
    rows = []
    for name, model_name, size, n_classes in (("CIFAR-10", "resnet18", 32, 10), ("Tiny ImageNet", "resnet34", 64, 200)):
        n = 8 * batch_size
        x_u8 = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
        y = torch.randint(0, n_classes, (n,), device=device)
        gen = data.epoch_generator(0, 0, device)
        utils.sync(device)
        start = time.perf_counter()
        for _ in data.train_batches(x_u8, y, batch_size, gen):
            pass
        utils.sync(device)
        pipeline = n // batch_size * batch_size / (time.perf_counter() - start)
        model = build_model(model_name, n_classes, 3, size).to(device)
        setup = training_setup(model, method_args("", f"--model={model_name} --eps=8", device))
        xb, yb = data.to_unit(x_u8[:batch_size]), y[:batch_size]
        time_iterations(model, setup, xb, yb, 8 / 255, WARMUP_ITERS)
        step = batch_size / time_iterations(model, setup, xb, yb, 8 / 255, n_iters)
        rows.append((name, model_name, size, pipeline, step))
    return rows


def fd_errors(model, x, y, eps, steps_px=FD_STEPS_PX, seed=0):
    """{step px: (relative error of the value, of the parameter gradient, their cosine)} of GradSum-FD against
    exact GradSum at the same random point (drawn from seed), the model in the mode it is in."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = lambda grads: torch.cat([g.flatten() for g in grads])  # noqa: E731
    torch.manual_seed(seed)
    exact = attacks.grad_sum_penalty(model, x, y, eps)
    g_exact = flat(torch.autograd.grad(exact, params))
    out = {}
    for px in steps_px:
        torch.manual_seed(seed)  # the same random grid point
        fd = attacks.grad_sum_fd_penalty(model, x, y, eps, px / 255)
        g_fd = flat(torch.autograd.grad(fd, params))
        out[px] = (abs(float(fd.detach() / exact.detach()) - 1), float((g_fd - g_exact).norm() / g_exact.norm()),
                   float(torch.nn.functional.cosine_similarity(g_fd, g_exact, 0)))
    return out


def load_inputs(opts, device):
    """Model, uint8 images (as train.py holds them), labels, eps and base flags: a finished run's when given, else
    random weights and images."""
    n = max(opts.batch_size, opts.eval_points)
    if opts.run:
        run = runs.load_args(opts.run)
        dataset = data.load_data(run.dataset, run.data_dir)
        model = models.model_from_args(run, dataset, methods.uses_double_backprop(run))
        model.load_state_dict(runs.load_checkpoint(opts.run, "--run")["model"])
        idx = evaluation.first_points(len(dataset.test_y), n)
        x_u8, y = dataset.test_x[idx], dataset.test_y[idx]
        base = f"--model={run.model} --n_layers={run.n_layers} --n_filters_cnn={run.n_filters_cnn} --eps={run.eps:g}"
        eps_px = run.eps
    else:
        torch.manual_seed(0)
        model = build_model(opts.model, 10, 3, opts.image_size, None, opts.n_layers, opts.n_filters)
        x_u8 = torch.randint(0, 256, (n, 3, opts.image_size, opts.image_size), dtype=torch.uint8)
        with torch.no_grad():
            y = model.eval()(data.to_unit(x_u8)).argmax(1)  # every example clean-correct: PGD attacks all of them
        model.train()
        base = f"--model={opts.model} --n_layers={opts.n_layers} --n_filters_cnn={opts.n_filters} --eps={opts.eps:g}"
        eps_px = opts.eps
    precision = f" --half_prec --amp_dtype={opts.amp_dtype}" if opts.half_prec else ""
    precision += " --cuda_graph" if opts.cuda_graph else ""
    model = model.to(device)
    if opts.channels_last:
        model, x_u8 = model.to(memory_format=torch.channels_last), x_u8.contiguous(memory_format=torch.channels_last)
    return model, x_u8.to(device), y.to(device), eps_px, base + precision


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=config.HelpFormatter)
    p.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--run", help="a finished train.py run directory: benchmark its model on its test images")
    p.add_argument("--model", default="resnet18", help="without --run: resnet18, resnet34 or cnn")
    p.add_argument("--n_layers", type=int, default=1, help="cnn: number of 3x3 conv layers")
    p.add_argument("--n_filters", type=int, default=16, help="cnn: filters per conv layer")
    p.add_argument("--image_size", type=int, default=32, help="pixels (random images)")
    p.add_argument("--eps", type=float, default=8, help="pixels/255")
    p.add_argument("--batch_size", type=int, default=32, help="training batch (images)")
    p.add_argument("--half_prec", action="store_true", help="training steps and the periodic evaluation under "
                   "autocast, as train.py (the final evaluation stays fp32)")
    p.add_argument("--amp_dtype", default="float16", choices=config.AMP_DTYPES, help="with --half_prec")
    p.add_argument("--channels_last", action="store_true", help="channels-last memory format, as train.py's flag")
    p.add_argument("--cuda_graph", action="store_true", help="on a CUDA device: training iterations and "
                   "evaluation's PGD restarts replayed from CUDA graphs, as train.py --cuda_graph")
    p.add_argument("--n_iters", type=int, default=3, help="iterations per method per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--eval_points", type=int, default=256, help="images of the PGD-50-10 throughput test")
    p.add_argument("--batch_size_eval", type=int, default=256, help="evaluation batch (images)")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated: {', '.join(SECTIONS)}")
    p.add_argument("--profile", metavar="METHOD", help="instead: torch.profiler's table of one iteration of this "
                   f"method (one of: {', '.join(METHODS)}; under --half_prec also {', '.join(HALF_PREC_METHODS)})")
    return p


def print_methods(times):
    print("\n| method | ms / iteration | × plain |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1000 * t:.1f} | {t / times['none']:.2f} |")


def print_operators(counts, device):
    print(f"\n| method | operators / iteration ({device.type}) | × plain |\n|---|---|---|")
    for name, n in counts.items():
        print(f"| {name} | {n} | {n / counts['none']:.2f} |")


def print_eval(model, x_u8, y, eps, opts):
    results = {mode: bench_eval(model, x_u8[:opts.eval_points], y[:opts.eval_points], eps, opts.batch_size_eval,
                                mode) for mode in EVAL_MODES}
    print(f"\nPGD-50-10 evaluation (the original protocol) of {opts.eval_points} images:")
    print("| mode | images / s | accuracy | speed-up |\n|---|---|---|---|")
    plain = results["every restart on every example"][0]
    for mode, (speed, acc) in results.items():
        print(f"| {mode} | {speed:.1f} | {100 * acc:.2f}% | {speed / plain:.2f}× |")


def print_periodic_eval(model, x_u8, y, eps, times, opts, base, device):
    """Seconds and accuracies of a periodic evaluation with the README flags in train.py's precision (--half_prec: the
    training's autocast): eager, with --batched_restarts and (--cuda_graph) graphed; and its share of the wall time
    of training with each method timed."""
    n = README_EVAL["n_eval_every_k_iter"]
    flags = (f"--batch_size_eval={opts.batch_size_eval} --attack_iters={README_EVAL['attack_iters']} "
             f"--n_restarts={README_EVAL['n_restarts']}")
    eval_args = method_args(flags, base, device)
    eval_sets = {"test": (x_u8[:n], y[:n]), "train": (x_u8[-n:], y[-n:])}
    n = len(eval_sets["test"][1])  # fewer when x_u8 is
    print(f"\none periodic evaluation (clean, FGSM, PGD-50-10 and gradient cosines on {n} test points, PGD-50-10 "
          f"on {n} training points) {f'under {opts.amp_dtype} autocast' if opts.half_prec else 'in fp32'}, seconds, "
          "the first (cuDNN tunes new shapes, graphs are captured) and the second:")
    variants = {"eager": (attacks.pgd_restart, eval_args),
                "--batched_restarts": (attacks.pgd_restart, method_args(f"{flags} --batched_restarts", base, device))}
    if opts.cuda_graph:
        variants["--cuda_graph"] = (evaluation.GraphedRestarts(model), eval_args)
    # the training step's autocast and, under fp16, its scaler's initial loss scale (nothing is trained)
    step = methods.TrainingStep(model, methods.StepSettings.from_flags(eval_args), device)
    precision = step.autocast, step.loss_scale()
    eval_s = {}
    for name, (restart, args) in variants.items():
        (first, _), (eval_s[name], row) = (time_periodic_eval(model, eval_sets, args, restart, *precision)
                                           for _ in range(2))
        print(f"  {name:>12}: {first:.2f}, {eval_s[name]:.2f} (test clean {100 * row['test_clean_acc']:.2f}%, PGD "
              f"{100 * row['test_pgd_acc']:.2f}%; training PGD {100 * row['train_pgd_acc']:.2f}%)")
    steady = min(eval_s.values())
    for name in eval_s.keys() - {"eager"}:
        print(f"  {name}: {eval_s['eager'] / eval_s[name]:.2f}× the eager evaluation's speed")
    if times:
        print(f"its share of wall time when it runs every {README_EVAL['eval_iter_freq']} iterations:")
    for name, t in times.items():
        print(f"  {name:>24}: {100 * steady / (steady + README_EVAL['eval_iter_freq'] * t):.1f}%")


def time_periodic_eval(model, eval_sets, args, restart, autocast=None, loss_scale=None):
    """(seconds, metrics row) of one periodic evaluation, its random starts seeded (comparable across calls)."""
    device = eval_sets["test"][0].device
    torch.manual_seed(0)
    utils.sync(device)
    protocol = evaluation.Protocol.from_flags(args)
    start = time.perf_counter()
    row = evaluation.periodic_eval(model, eval_sets, protocol, restart, autocast, loss_scale)
    utils.sync(device)
    return time.perf_counter() - start, row


def main(argv=None):
    opts = build_parser().parse_args(argv)
    sections = opts.sections.split(",")
    if not set(sections) <= set(SECTIONS):
        raise SystemExit(f"bench.py: error: --sections={opts.sections!r}: give a comma-separated list of "
                         f"{', '.join(SECTIONS)}")
    device = utils.choose_device(opts.device)
    if opts.cuda_graph and device.type != "cuda":
        raise SystemExit(f"bench.py: error: --cuda_graph needs a CUDA device, and --device gives {device}")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # as train.py
    model, x_u8, y, eps_px, base = load_inputs(opts, device)
    x, eps = data.to_unit(x_u8[:opts.batch_size]), eps_px / 255  # a training batch; evaluation converts its own
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"device {name} ({device}), torch {torch.__version__}, {base}{' --channels_last' * opts.channels_last}, "
          f"batch {opts.batch_size}, {opts.rounds} rounds of {opts.n_iters} iterations")
    presets = {**METHODS, **(HALF_PREC_METHODS if opts.half_prec else {})}
    if opts.profile:
        if opts.profile not in presets:
            raise SystemExit(f"bench.py: error: --profile={opts.profile!r}: choose one of {', '.join(presets)}")
        args = method_args(presets[opts.profile], base, device)
        print(profile_method(model, x, y[:opts.batch_size], eps, args))
        return
    if "data" in sections:
        print("\n| data | model | image px | pipeline images / s | FGSM training images / s | pipeline share |\n"
              "|---|---|---|---|---|---|")
        for row in bench_data_pipeline(device, opts.batch_size, opts.n_iters):
            print("| {} | {} | {} | {:.0f} | {:.1f} | {:.2f}% |".format(*row[:5], 100 * row[4] / row[3]))
    times = {}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    batch = model, x, y[:opts.batch_size], eps
    if "methods" in sections:
        times = bench_methods(*batch, base, device, opts.n_iters, opts.rounds, presets)
        print_methods(times)
    if "ops" in sections:
        print_operators(count_operators(*batch, base, device, presets), device)
    model.load_state_dict(state)  # the evaluation sees the given weights, not the training steps' updates
    if "fd" in sections:
        print(f"\nGradSum-FD against exact GradSum (fp32, one batch of {len(x)}; the default step is "
              f"{config.build_parser().get_default('grad_input_sum_fd_step')}/255):")
        print("| step (pixels/255 RMS) | value: relative error | parameter gradient: relative error | cosine |\n"
              "|---|---|---|---|")
        models.configure_double_backward(model, method_args("--preset=gradsum", base, device), True)  # exact GradSum's
        for px, (value, grad, cos) in fd_errors(*batch).items():
            print(f"| {px:g} | {value:.1e} | {grad:.2f} | {cos:.3f} |")
        model.load_state_dict(state)  # its forward passes moved BatchNorm's running statistics
    if "eval" in sections:
        print_eval(model, x_u8, y, eps, opts)
        print_periodic_eval(model, x_u8, y, eps, times, opts, base, device)


if __name__ == "__main__":
    main()
