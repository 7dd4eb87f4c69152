"""The original code's method edge cases, one test each: what its train.py computes for these flags."""
import logging
import os
import shlex

import pytest
import torch
from test_train import TINY_RUN, run_cli

import attacks
import config
import data
import methods
import train
import utils

EPS_PX = 8


def make_trainer(tmp_path, tiny_data, flags=""):
    args = config.build_parser().parse_args(shlex.split(f"{TINY_RUN} --eps={EPS_PX} --data_dir={tiny_data} {flags}"))
    config.check_args(args)
    args.device = torch.device("cpu")
    torch.manual_seed(0)
    return train.Trainer(args, data.load_data(args.dataset, args.data_dir), str(tmp_path), logging.getLogger("t"))


def batch(trainer):
    return next(trainer.batches(1))


def perturb(trainer, x, y, radii):
    """The run's training perturbation and attack gradient, at loss scale 1."""
    return methods.perturb(trainer.model, x, y, radii, trainer.settings.attack, trainer.settings.differentiable, 1.0)


def test_vfsat_random_start_is_drawn_in_the_full_ball_on_the_grid(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path, tiny_data, "--discrete_eps --attack_init=random")
    x, _ = batch(trainer)
    radii = trainer.radii(epoch=1)  # VFSAT's first value: 2/255
    assert radii.fgsm_eps == pytest.approx(2 / 255) and radii.eps == pytest.approx(8 / 255)
    start = methods.fgsm_start(x, radii, trainer.settings.attack, None)
    assert (start.abs().max() * 255).round() == 8  # the full eps-ball, not the epoch's
    assert torch.allclose(start * 255, (start * 255).round(), atol=1e-4)
    fixed = make_trainer(tmp_path, tiny_data, "--discrete_eps --attack_init=random --fix_vfsat_start")
    assert (methods.fgsm_start(x, fixed.radii(1), fixed.settings.attack, None).abs().max() * 255).round() == 2


@pytest.mark.parametrize("flags, reg_px, pgd_px", [("--discrete_eps", 8, 8), ("--discrete_eps --vfsat_reg_eps", 2, 8),
                                                   ("--discrete_eps --attack=pgd", 8, 8)])
def test_regularisers_and_pgd_use_the_full_eps_under_vfsat(flags, reg_px, pgd_px, tmp_path, tiny_data):
    radii = make_trainer(tmp_path, tiny_data, flags).radii(epoch=1)
    assert radii.reg_eps * 255 == pytest.approx(reg_px) and radii.pgd_eps * 255 == pytest.approx(pgd_px)


def test_svhn_ramps_eps_and_fgsm_alpha_over_five_epochs_of_iterations(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path, tiny_data, "--fgsm_alpha=1.25")
    trainer.args.dataset = "svhn"  # the warm-up keys on the dataset name; the data can stay tiny
    trainer.radii_schedule = methods.RadiiSchedule.from_flags(trainer.args, trainer.data.n_full)
    n_max = 5 * 48 // 16  # 5 epochs of the full training set, in batches (the original's formula)
    for iteration, fraction in ((0, 0.0), (3, 0.2), (15, 1.0), (40, 1.0)):
        trainer.iteration = iteration
        radii = trainer.radii(epoch=1)
        assert radii.fgsm_alpha == pytest.approx(1.25 * iteration / n_max if iteration < n_max else 1.25)
        assert radii.pgd_eps == pytest.approx(fraction * 8 / 255)


def grad_sum_is_trained(tmp_path, tiny_data, flags):
    trainer = make_trainer(tmp_path, tiny_data, f"--grad_input_sum_coeff=1 {flags}")
    x, y = batch(trainer)
    radii = trainer.radii(1)
    _, grad = perturb(trainer, x, y, radii)
    grad_sum = next(t for t in trainer.settings.terms if t.row.name == "GradSum")
    return grad_sum(trainer.model, x, y, radii, grad, 1.0).requires_grad


@pytest.mark.parametrize("flags, trained", [
    ("--attack_init=zero", True),
    ("--attack_init=random", False),  # the FGSM gradient at the random start, detached
    ("--attack_init=random --fix_gradsum", True),
    ("--attack=pgd --attack_init=random", False),  # the clean gradient, detached
    ("--attack=pgd --attack_init=random --grad_align_cos_lambda=0.1", True),  # GradAlign keeps its graph
    ("--attack=none --attack_init=random --fix_gradsum", True),
    ("--attack=pgd --attack_init=zero", True),
])
def test_grad_sum_is_a_constant_exactly_where_the_original_detaches_it(flags, trained, tmp_path, tiny_data):
    assert grad_sum_is_trained(tmp_path, tiny_data, flags) == trained


class Counter(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, 0

    def forward(self, x):
        self.calls += 1
        return self.model(x)


@pytest.mark.parametrize("flags, n_forwards", [
    ("--attack=none", 2),  # the original's extra gradient at x, then the training pass
    ("--attack=fgsm --attack_init=zero", 2),
    ("--attack=fgsm --attack_init=zero --grad_input_sum_coeff=1", 3),
    ("--attack=pgd --pgd_train_n_iters=2", 4),
    ("--attack=pgd --pgd_train_n_iters=2 --grad_align_cos_lambda=1", 5),
])
def test_forward_passes_per_iteration_are_the_originals(flags, n_forwards, tmp_path, tiny_data):
    trainer = make_trainer(tmp_path, tiny_data, flags)
    x, y = batch(trainer)
    counter = Counter(trainer.model)
    methods.losses(counter, x, y, trainer.radii(1), trainer.settings, 1.0)
    assert counter.calls == n_forwards


def test_epoch_zero_moves_batchnorm_statistics_but_not_weights(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path, tiny_data, "--model=resnet18 --attack_init=zero")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.epoch_zero()
    after = trainer.model.state_dict()
    assert trainer.iteration == 0
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("running" in k or "num_batches" in k for k in changed)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_minibatch_replay_replays_batches_within_an_epoch_of_the_loaders_length(attack, tmp_path, tiny_data,
                                                                                monkeypatch):
    """The original replays batches for any attack; only FGSM (Free-AT) carries its perturbation on."""
    seen, updates = [], []
    original, original_step = methods.losses, methods.TrainingStep.__call__

    def recording(model, x, y, radii, settings, loss_scale, carried=None, *rest):
        total, stats, delta = original(model, x, y, radii, settings, loss_scale, carried, *rest)
        seen.append((x.clone(), None if carried is None else carried.clone(), delta.clone(), updates[-1]))
        return total, stats, delta

    def step(self, x, y, radii, update=True):
        updates.append(update)
        return original_step(self, x, y, radii, update)
    monkeypatch.setattr(methods, "losses", recording)
    monkeypatch.setattr(methods.TrainingStep, "__call__", step)
    code, run_dir = run_cli(f"--attack={attack} --pgd_train_n_iters=2 --minibatch_replay=2 --epochs=2", tmp_path,
                            tiny_data)
    assert code == 0
    assert [u for *_, u in seen] == [False] + [True] * 6  # epoch 0, then 2 epochs of 3 iterations (not 6)
    steps = seen[1:]
    for i in (1, 4):  # the second iteration of each pair replays the first's batch
        assert torch.equal(steps[i][0], steps[i - 1][0])
    assert not torch.equal(steps[2][0], steps[1][0])  # the loader's batch 1 was dropped, batch 2 taken
    if attack == "fgsm":
        for i in range(1, 6):
            assert torch.equal(steps[i][1], steps[i - 1][2])  # each iteration starts from the last perturbation
        assert torch.equal(steps[0][1], seen[0][2])  # carried on from epoch 0
    else:
        assert all(carried is None for _, carried, *_ in seen)
    assert ("without carrying a perturbation" in open(os.path.join(run_dir, "log.txt")).read()) == (attack == "pgd")


def test_mast_has_no_effect_on_pgd_training(tmp_path, tiny_data):
    """The original draws MAST's magnitudes in its FGSM branch only: PGD training ignores --mast."""
    pgd = "--attack=pgd --pgd_train_n_iters=2 --attack_init=random --epochs=1"
    runs = [run_cli(f"{pgd} {mast}", tmp_path, tiny_data, name=f"run{i}") for i, mast in enumerate(("", "--mast"))]
    assert [code for code, _ in runs] == [0, 0]
    metrics = [utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) for _, run_dir in runs]
    assert metrics[0] == metrics[1]
    assert "--mast has no effect" in open(os.path.join(runs[1][1], "log.txt")).read()


def test_evaluation_runs_only_on_its_period_and_uses_the_first_points(tmp_path, tiny_data):
    code, run_dir = run_cli("--attack=fgsm --epochs=2 --eval_iter_freq=4", tmp_path, tiny_data)
    assert code == 0
    rows = utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    assert [r["iteration"] for r in rows if r["kind"] == "periodic"] == [4]  # not at the last iteration, 6
    trainer = make_trainer(tmp_path, tiny_data, "--n_eval_every_k_iter=20 --batch_size=16")
    ds = data.load_data("cifar10", tiny_data)
    assert torch.equal(trainer.data.eval_sets["test"][0], ds.test_x[:20])
    assert torch.equal(trainer.data.eval_sets["train"][0], ds.train_x[:16])  # in full training batches


@pytest.mark.parametrize("flag", ["--attack_iters=0", "--n_restarts=0"])
def test_periodic_pgd_without_iterations_or_restarts_is_clean_accuracy(flag, tmp_path, tiny_data):
    """The original's attack_pgd returns a zero perturbation: PGD accuracy is clean accuracy, and the cosine
    between the FGSM and the zero PGD perturbation counts as 1 (its nan -> 1 rule)."""
    code, run_dir = run_cli(f"--attack=fgsm --epochs=2 {flag}", tmp_path, tiny_data)
    assert code == 0
    rows = [r for r in utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "periodic"]
    assert rows and all(r["test_pgd_acc"] == r["test_pgd_any_acc"] == r["test_clean_acc"] for r in rows)
    assert all(r["cos_fgsm_pgd"] == 1.0 for r in rows)


def test_pgd_training_without_iterations_trains_at_its_start(tmp_path, tiny_data):
    """The original's PGD-0 returns its start: from zero it is --attack=none (same passes, same random draws)."""
    runs = [run_cli(f"--epochs=2 {flags}", tmp_path, tiny_data, name=f"run{i}")
            for i, flags in enumerate(("--attack=pgd --pgd_train_n_iters=0 --attack_init=zero", "--attack=none"))]
    assert [code for code, _ in runs] == [0, 0]
    metrics = [utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) for _, run_dir in runs]
    assert metrics[0] == metrics[1] and metrics[0][0]["train_delta_abs"] == 0


def test_early_stopping_starts_from_the_initial_weights_at_zero(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path, tiny_data)
    initial = train.cpu_copy(trainer.model)
    for kept in trainer.monitor.kept.values():
        assert kept["iteration"] == 0 and kept["acc"] == 0.0
        assert all(torch.equal(kept["state"][k], initial[k]) for k in initial)


def test_weight_clip_is_the_originals():
    layer = torch.nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[0.5, 0.19, -0.3]]))
    methods.clip_weights(layer)
    assert torch.allclose(layer.weight, torch.tensor([[0.1, 0.19, -0.1]]))


def test_mast_steps_have_random_grid_magnitudes(tmp_path, tiny_data):
    trainer = make_trainer(tmp_path, tiny_data, "--attack_init=zero --mast --fgsm_alpha=1.0")
    x, y = batch(trainer)
    delta, _ = perturb(trainer, x, y, trainer.radii(1))
    inside = (x > 8 / 255) & (x < 1 - 8 / 255)
    magnitudes = (delta[inside].abs() * 255).round().unique()
    assert len(magnitudes) == 9 and magnitudes.max() == 8  # 0, 1, ..., 8: the grid, not only eps


def test_fgsm_random_start_gradient_feeds_gradalign(tmp_path, tiny_data):
    """FGSM-RS + GradAlign: the first gradient is the one at the random start, through the clamp."""
    trainer = make_trainer(tmp_path, tiny_data, "--attack_init=random --grad_align_cos_lambda=1")
    x, y = batch(trainer)
    torch.manual_seed(4)
    _, grad = perturb(trainer, x, y, trainer.radii(1))
    torch.manual_seed(4)
    start = attacks.uniform_delta(x, 8 / 255)
    expected, _ = attacks.input_grad(trainer.model, x, start, y)
    assert torch.allclose(grad, expected)


@pytest.mark.parametrize("flags, periodic_dtype, scaled", [
    ("--half_prec", torch.float16, True),  # apex O1 with its loss scale, as the original
    ("--half_prec --amp_dtype=bfloat16", torch.bfloat16, False),
    ("--half_prec --periodic_eval_fp32", torch.float32, False),
    ("", torch.float32, False),
])
def test_periodic_evaluation_runs_in_the_training_precision_and_the_final_in_fp32(flags, periodic_dtype, scaled,
                                                                                  tmp_path, tiny_data, monkeypatch):
    """The original's periodic evaluation runs under apex O1 with the training's loss scale on its batch-mean loss;
    its final one under amp.disable_casts, in fp32. Every evaluation input gradient is recorded with its phase."""
    seen, phase, original, final = [], ["periodic"], attacks.input_grad, train.evaluation.final_eval

    def recording(model, x, delta, y, clip=True, create_graph=False, loss_scale=1.0, reduction="mean"):
        grad, logits = original(model, x, delta, y, clip, create_graph, loss_scale, reduction)
        if not model.training:  # an evaluation's, not a training step's
            seen.append((phase[0], logits.dtype, float(loss_scale), reduction))
        return grad, logits

    def final_eval(*args, **kwargs):
        phase[0] = "final"
        return final(*args, **kwargs)
    monkeypatch.setattr(attacks, "input_grad", recording)
    monkeypatch.setattr(train.evaluation, "final_eval", final_eval)
    code, run_dir = run_cli(f"--attack=fgsm --epochs=1 {flags}", tmp_path, tiny_data)
    assert code == 0
    periodic = [r for r in utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "periodic"]
    assert len(periodic) == 1
    scale = periodic[0]["loss_scale"] if scaled else 1.0  # the training's at the evaluation
    eval_batch = 8  # --batch_size_eval: the sum over a batch of 8 at scale/8 is its mean at the scale
    expected = {("periodic", periodic_dtype, scale / eval_batch if scaled else 1.0, "sum"),
                ("periodic", periodic_dtype, scale, "mean"),  # the gradient cosines, of the batch-mean loss
                ("final", torch.float32, 1.0, "sum")}
    assert set(seen) == expected and (scale >= 2**10) == scaled
