"""Every training method end to end through the command line, on tiny generated data."""
import json
import os
import re
import shlex

import pytest
import torch

import train
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_RUN = ("--model=cnn --n_filters_cnn=4 --lr_max=0.01 --eps=4 --epochs=2 --batch_size=16 --batch_size_eval=8 "
            "--eval_iter_freq=3 --n_eval_every_k_iter=8 --attack_iters=2 --n_restarts=2 --n_final_eval=12 "
            "--eval_early_stopped_model --device=cpu")

METHODS = {
    "standard": "--attack=none",
    "fgsm": "--attack=fgsm --fgsm_alpha=1.0",
    "fgsm_rs": "--attack=fgsm --attack_init=random --fgsm_alpha=1.25",
    "vfsat": "--attack=fgsm --discrete_eps --fgsm_alpha=1.0",
    "vfsat_rs": "--attack=fgsm --discrete_eps --attack_init=random",
    "gradsum": "--attack=fgsm --grad_input_sum_coeff=10",
    "gradsum_rs": "--attack=fgsm --attack_init=random --grad_input_sum_coeff=10",
    "gradalign": "--attack=fgsm --grad_align_cos_lambda=0.2",
    "gradalign_rs": "--attack=fgsm --attack_init=random --grad_align_cos_lambda=0.2",
    "pgd2": "--attack=pgd --pgd_train_n_iters=2 --pgd_alpha_train=2 --attack_init=random",
    "pgd2_gradsum": "--attack=pgd --pgd_train_n_iters=2 --grad_input_sum_coeff=1",
    "free": "--attack=fgsm --minibatch_replay=2",
    "half_prec": "--attack=fgsm --half_prec --grad_input_sum_coeff=1 --grad_align_cos_lambda=0.2",
    "resnet18_piecewise": "--model=resnet18 --lr_schedule=piecewise --lr_max=0.05 --attack=fgsm --discrete_eps",
    "pgd2_compiled_channels_last": "--attack=pgd --pgd_train_n_iters=2 --compile --channels_last",
}


def run_cli(flags, tmp_path, data_dir, name="run"):
    argv = shlex.split(f"{TINY_RUN} --data_dir={data_dir} --out_dir={tmp_path / 'runs'} --run_name={name} {flags}")
    return train.main(argv), str(tmp_path / "runs" / name)


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_end_to_end(method, tmp_path, tiny_data):
    code, run_dir = run_cli(METHODS[method], tmp_path, tiny_data)
    assert code == 0
    rows = utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    periodic = [r for r in rows if r["kind"] == "periodic"]
    iters_per_epoch = 3 * (2 if method == "free" else 1)  # 48 images / batch 16, times the replays
    assert [r["iteration"] for r in periodic] == list(range(3, 2 * iters_per_epoch + 1, 3))
    assert all(0 <= r[k] <= 1 for r in periodic for k in ("test_clean_acc", "test_pgd_acc", "train_pgd_acc"))
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in periodic)
    regularised = "grad_" in METHODS[method]
    assert all((r["train_reg"] > 0) == regularised for r in periodic)
    final = [r for r in rows if r["kind"] == "final"]
    assert [r["model"] for r in final] == ["last", "early_stopped", "best_test"]
    assert all(r["n_points"] == 12 for r in final)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 2 * iters_per_epoch
    assert {"model", "optimizer", "scaler", "kept", "metrics", "processes"} <= set(ckpt)
    assert json.load(open(os.path.join(run_dir, "args.json")))["epochs"] == 2


def test_vfsat_logs_the_epoch_eps(tmp_path, tiny_data):
    code, run_dir = run_cli(METHODS["vfsat"] + " --epochs=3 --eps=5 --eval_iter_freq=3", tmp_path, tiny_data)
    assert code == 0
    rows = [r for r in utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "periodic"]
    assert [r["train_eps"] for r in rows] == [2, 4, 5]  # one evaluation per epoch, at its end


def test_standard_training_learns_the_tiny_task(tmp_path, tiny_data):
    """The tiny classes differ by mean colour: a working pipeline gets them nearly all right."""
    code, run_dir = run_cli("--attack=none --epochs=15 --lr_max=0.05 --eval_iter_freq=1000", tmp_path, tiny_data)
    assert code == 0
    last = [r for r in utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "final"][0]
    assert last["clean_acc"] >= 0.9


def readme_train_lines():
    text = open(os.path.join(ROOT, "README.md")).read()
    return [line.strip() for line in text.splitlines() if line.strip().startswith("python train.py") and
            "--epoch=96" in line]


def test_both_paper_command_lines_in_the_readme_parse():
    lines = readme_train_lines()
    assert len(lines) == 2
    parsed = [train.build_parser().parse_args(shlex.split(line)[2:]) for line in lines]
    for args in parsed:
        train.check_args(args)
        assert (args.epochs, args.batch_size, args.attack_iters, args.n_restarts) == (96, 256, 50, 10)
        assert (args.lr_max, args.n_final_eval, args.eval_early_stopped_model) == (0.04, -1, True)
    vfsat, gradsum = parsed
    assert (vfsat.eps, vfsat.discrete_eps, vfsat.grad_input_sum_coeff) == (16, True, 0.0)
    assert (gradsum.eps, gradsum.discrete_eps, gradsum.grad_input_sum_coeff) == (8, False, 10.0)


@pytest.mark.parametrize("flags, named", [
    ("--eps=-1", "--eps=-1"),
    ("--attack=fgsn", "--attack='fgsn'"),
    ("--model=resnet50", "--model='resnet50'"),
    ("--lr_schedule=cosine", "--lr_schedule='cosine'"),
    ("--minibatch_replay=4 --attack=pgd", "--minibatch_replay=4"),
    ("--batch_size=0", "--batch_size=0"),
    ("--n_train=5", "--n_train=5"),
    ("--run_name=a:b", "--run_name='a:b'"),
    ("--epochs=ten", "--epochs"),
    ("--no_such_flag=1", "--no_such_flag"),
    ("--compile --grad_align_cos_lambda=0.2", "--compile"),
    ("--resume=/nonexistent", "--resume='/nonexistent'"),
])
def test_bad_flags_exit_2_with_one_line_and_no_files(flags, named, tmp_path, tiny_data, capsys):
    code, run_dir = run_cli(flags, tmp_path, tiny_data)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and named in err
    assert not os.path.exists(tmp_path / "runs")


def test_existing_run_directory_is_never_overwritten(tmp_path, tiny_data, capsys):
    os.makedirs(tmp_path / "runs" / "run")
    marker = tmp_path / "runs" / "run" / "metrics.jsonl"
    marker.write_text("keep me\n")
    code, _ = run_cli(METHODS["fgsm"], tmp_path, tiny_data)
    assert code == 2 and "already exists" in capsys.readouterr().err
    assert marker.read_text() == "keep me\n"


def test_default_run_name_has_no_spaces_or_colons():
    args = train.build_parser().parse_args(shlex.split("--discrete_eps --grad_input_sum_coeff=0.5"))
    name = train.method_name(args)
    assert name == "fgsm-vfsat-gradsum0.5" and re.match(train.RUN_NAME_PATTERN, name)


def test_missing_data_exits_2_with_one_line_and_no_files(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_url", lambda *a, **kw: (_ for _ in ()).throw(OSError("offline")))
    missing = tmp_path / "no_data_here"
    assert train.main(shlex.split(f"{TINY_RUN} --data_dir={missing} --out_dir={tmp_path / 'runs'}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "cifar-10-batches-py" in err[0]
    assert not missing.exists() and not (tmp_path / "runs").exists()
