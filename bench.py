"""Benchmark: what each training method and the evaluation cost, measured side by side in one run.

Prints (1) the time of one training iteration of each method as a ratio to a plain (no attack) iteration, on the
same model, batch and data, methods interleaved round by round; (2) the share of wall time that periodic
evaluation takes with the README flags (PGD-50-10 on 256 test and 256 training points every 200 iterations);
(3) the throughput of the final PGD-50-10 evaluation, images/s, attacking every example in every restart
versus skipping examples already broken, with both robust accuracies.

    python bench.py                                   # CPU: PreActResNet-18, batch 32, random weights
    python bench.py --checkpoint runs/X/checkpoint.pt # a trained model (its flags come with it)
    python bench.py --device cuda --batch_size 256 --eval_points 1024

Random weights make evaluation look cheap (most examples are broken at once); pass a trained checkpoint for
evaluation figures that mean something.
"""
import argparse
import shlex
import statistics
import time
from contextlib import nullcontext

import torch

import attacks
import data
import train
import utils
from models import build_model

METHODS = {  # name: train.py flags on top of --attack=fgsm --attack_init=zero --fgsm_alpha=1.0
    "none": "--attack=none",
    "FGSM": "",
    "FGSM+VFSAT": "--discrete_eps",
    "FGSM+GradSum": "--grad_input_sum_coeff=10",
    "FGSM+GradAlign": "--grad_align_cos_lambda=0.2",
    "FGSM-RS+GradSum": "--attack_init=random --grad_input_sum_coeff=10",  # reuses the gradient at the start
    "FGSM-RS+GradAlign": "--attack_init=random --grad_align_cos_lambda=0.2",  # needs a gradient at x too
    "PGD-2": "--attack=pgd --pgd_train_n_iters=2 --pgd_alpha_train=4",
    "PGD-10": "--attack=pgd --pgd_train_n_iters=10 --pgd_alpha_train=2",
}
README_EVAL = {"eval_iter_freq": 200, "n_eval_every_k_iter": 256, "attack_iters": 50, "n_restarts": 10}  # train.py defaults


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def method_args(flags, base):
    return train.build_parser().parse_args(shlex.split(f"{base} --attack=fgsm --attack_init=zero "
                                                       f"--fgsm_alpha=1.0 {flags}"))


def time_iterations(model, opt, scaler, autocast, x, y, eps, args, n_iters):
    """Seconds per training iteration, over n_iters iterations."""
    sync(x.device)
    start = time.perf_counter()
    for _ in range(n_iters):
        train.train_step(model, opt, scaler, autocast, x, y, eps, args)
    sync(x.device)
    return (time.perf_counter() - start) / n_iters


def bench_methods(model, x, y, eps, base_flags, device, n_iters, rounds):
    """Median seconds per iteration of each method; one warm-up iteration each, then interleaved rounds."""
    setups = {}
    for name, flags in METHODS.items():
        args = method_args(flags, base_flags)
        opt = train.build_optimizer(model, args)
        scaler = torch.amp.GradScaler(device.type, enabled=args.half_prec)
        autocast = torch.autocast(device.type, dtype=torch.float16) if args.half_prec else nullcontext()
        setups[name] = (opt, scaler, autocast, args)
        time_iterations(model, opt, scaler, autocast, x, y, eps, args, 1)
    times = {name: [] for name in METHODS}
    for _ in range(rounds):
        for name, (opt, scaler, autocast, args) in setups.items():
            times[name].append(time_iterations(model, opt, scaler, autocast, x, y, eps, args, n_iters))
    return {name: statistics.median(t) for name, t in times.items()}


def bench_eval(model, x, y, eps, batch_size, skip_broken):
    """(images/s, robust accuracy) of PGD-50-10 with step eps/4 over x."""
    model.eval()
    torch.manual_seed(0)
    sync(x.device)
    start = time.perf_counter()
    robust = 0
    for i in range(0, len(y), batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        robust += int(attacks.pgd_robust(model, xb, yb, eps, eps / 4, README_EVAL["attack_iters"],
                                               README_EVAL["n_restarts"], skip_broken).sum())
    sync(x.device)
    model.train()
    return len(y) / (time.perf_counter() - start), robust / len(y)


def bench_data_pipeline(device, batch_size, n_iters):
    """Images/s of the batch pipeline (shuffle, crop, flip, to float) against images/s of an FGSM training step,
    for CIFAR-10 (PreActResNet-18, 32 px) and Tiny ImageNet (PreActResNet-34, 64 px) shapes."""
    rows = []
    for name, model_name, size, n_classes in (("CIFAR-10", "resnet18", 32, 10), ("Tiny ImageNet", "resnet34", 64, 200)):
        n = 8 * batch_size
        x_u8 = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=device)
        y = torch.randint(0, n_classes, (n,), device=device)
        gen = data.epoch_generator(0, 0, device)
        sync(device)
        start = time.perf_counter()
        for xb, _ in data.train_batches(x_u8, y, batch_size, gen):
            pass
        sync(device)
        pipeline = n // batch_size * batch_size / (time.perf_counter() - start)
        model = build_model(model_name, n_classes, 3, size, [0.5] * 3, [0.25] * 3).to(device)
        args = method_args("", f"--model={model_name} --eps=8")
        opt = train.build_optimizer(model, args)
        scaler = torch.amp.GradScaler(device.type, enabled=False)
        xb, yb = x_u8[:batch_size].float() / 255, y[:batch_size]
        time_iterations(model, opt, scaler, nullcontext(), xb, yb, 8 / 255, args, 1)  # warm-up
        step = batch_size / time_iterations(model, opt, scaler, nullcontext(), xb, yb, 8 / 255, args, n_iters)
        rows.append((name, model_name, size, pipeline, step))
    return rows


def load_inputs(args, device):
    """Model and images: from a checkpoint and its data when given, else random weights and random images."""
    if args.checkpoint:
        ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        run = argparse.Namespace(**ckpt["args"])
        dataset = data.load_data(run.dataset, run.data_dir)
        mean, std = dataset.mean_std()
        model = build_model(run.model, dataset.n_classes, dataset.in_channels, dataset.image_size, mean, std,
                            run.n_layers, run.n_filters_cnn)
        model.load_state_dict(ckpt["model"])
        idx = data.fixed_subset(len(dataset.test_y), max(args.batch_size, args.eval_points))
        x, y = dataset.test_x[idx].float() / 255, dataset.test_y[idx]
        base = f"--model={run.model} --n_layers={run.n_layers} --n_filters_cnn={run.n_filters_cnn} --eps={run.eps}"
        return model.to(device), x.to(device), y.to(device), run.eps, base
    torch.manual_seed(0)
    model = build_model(args.model, 10, 3, args.image_size, [0.5] * 3, [0.25] * 3, args.n_layers, args.n_filters)
    n = max(args.batch_size, args.eval_points)
    x = torch.rand(n, 3, args.image_size, args.image_size)
    with torch.no_grad():
        y = model.eval()(x).argmax(1)  # every example clean-correct, so PGD has all of them to attack
    model.train()
    base = f"--model={args.model} --n_layers={args.n_layers} --n_filters_cnn={args.n_filters} --eps={args.eps}"
    return model.to(device), x.to(device), y.to(device), args.eps, base


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--checkpoint", help="a train.py checkpoint: benchmark its model on its test images")
    p.add_argument("--model", default="resnet18", help="without --checkpoint: resnet18, resnet34 or cnn")
    p.add_argument("--n_layers", type=int, default=1)
    p.add_argument("--n_filters", type=int, default=16)
    p.add_argument("--image_size", type=int, default=32, help="pixels (random images)")
    p.add_argument("--eps", type=int, default=8, help="pixels/255")
    p.add_argument("--batch_size", type=int, default=32, help="training batch (images)")
    p.add_argument("--n_iters", type=int, default=3, help="iterations per method per round")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the median is reported")
    p.add_argument("--eval_points", type=int, default=256, help="images of the PGD-50-10 throughput test")
    p.add_argument("--batch_size_eval", type=int, default=256)
    p.add_argument("--sections", default="methods,eval,data", help="comma-separated: methods, eval (after methods), data")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    device = utils.choose_device(args.device)
    model, x, y, eps_px, base = load_inputs(args, device)
    eps = eps_px / 255
    xb, yb = x[:args.batch_size], y[:args.batch_size]
    print(f"device {device}, {base}, batch {args.batch_size}, {args.rounds} rounds of {args.n_iters} iterations")

    if "data" in sections:
        print("\n| data | model | image px | pipeline images / s | FGSM training images / s | pipeline share |\n"
              "|---|---|---|---|---|---|")
        for name, model_name, size, pipeline, step in bench_data_pipeline(device, args.batch_size, args.n_iters):
            print(f"| {name} | {model_name} | {size} | {pipeline:.0f} | {step:.1f} | {100 * step / pipeline:.2f}% |")
    if "methods" not in sections:
        return
    state = train.cpu_copy(model)
    times = bench_methods(model, xb, yb, eps, base, device, args.n_iters, args.rounds)
    model.load_state_dict(state)  # the evaluation sees the given weights, not the benchmark's updates
    print("\n| method | ms / iteration | × plain |\n|---|---|---|")
    for name, t in times.items():
        print(f"| {name} | {1000 * t:.1f} | {t / times['none']:.2f} |")

    if "eval" not in sections:
        return
    results = {mode: bench_eval(model, x[:args.eval_points], y[:args.eval_points], eps, args.batch_size_eval, mode)
               for mode in (False, True)}
    print(f"\nPGD-50-10 evaluation of {args.eval_points} images:")
    print("| mode | images / s | robust accuracy |\n|---|---|---|")
    for mode, label in ((False, "every example, every restart"), (True, "skip broken examples")):
        speed, acc = results[mode]
        print(f"| {label} | {speed:.1f} | {100 * acc:.2f}% |")
    print(f"speed-up {results[True][0] / results[False][0]:.2f}×")

    n = README_EVAL["n_eval_every_k_iter"]
    eval_args = method_args(f"--batch_size_eval={args.batch_size_eval}", base)
    eval_sets = {"test": (x[:n], y[:n]), "train": (x[-n:], y[-n:])}
    sync(device)
    start = time.perf_counter()
    train.periodic_eval(model, eval_sets, eps, eval_args)
    sync(device)
    eval_s = time.perf_counter() - start
    print(f"\none periodic evaluation (clean, FGSM, PGD-50-10 and gradient cosine on {n} test points, PGD-50-10 "
          f"on {n} training points): {eval_s:.1f} s; its share of wall time when it runs every "
          f"{README_EVAL['eval_iter_freq']} iterations:")
    for name, t in times.items():
        print(f"  {name:>15}: {100 * eval_s / (eval_s + README_EVAL['eval_iter_freq'] * t):.1f}%")

if __name__ == "__main__":
    main()
