"""The launch scripts: valid bash, and every command they launch is one train.py accepts."""
import glob
import os
import shlex
import subprocess

import pytest
from test_train import ROOT

import config

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "sh", "*.sh")) + glob.glob(os.path.join(ROOT, "sh", "*.sbatch")))


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_is_valid_bash(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0


def dry_run(*cmd):
    done = subprocess.run(["bash", *cmd], cwd=ROOT, env=dict(os.environ, DRY_RUN="1"), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def check_train_command(line, tmp_path):
    argv = shlex.split(line[line.index("train.py") + len("train.py"):])
    args = config.build_parser().parse_args(argv)
    args.data_dir = str(tmp_path)  # checked here without the GPUs and data it names
    config.check_args(args)
    return args


# the original results file's rows: (PGD iterations, step, GradSum lambda) of the PGD rows, GradAlign's lambda
RESULTS_FILE = {8: ({(2, 4, 0), (2, 6, 0), (8, 1, 0), (10, 1.6, 0), (2, 4, 1.7), (10, 1.6, 1.0)}, 20),
                16: ({(2, 8, 0), (10, 3.2, 0), (10, 3.2, 1.4)}, 24)}


@pytest.mark.parametrize("eps", [8, 16])
def test_table_scripts_launch_the_results_files_rows_for_every_seed(eps, tmp_path):
    lines = dry_run(os.path.join("sh", f"cifar10_eps{eps}.sh"), "0,1,2", "runs/t")
    parsed = [check_train_command(line, tmp_path) for line in lines]
    pgd_rows, gradalign = RESULTS_FILE[eps]
    assert len(lines) == 3 * (4 + len(pgd_rows))
    assert {a.seed for a in parsed} == {0, 1998, 2022} and {a.eps for a in parsed} == {eps}
    assert len({a.run_name for a in parsed}) == len(lines)
    assert len({config.method_name(a) for a in parsed}) == len(lines) // 3  # no two rows merge in the report
    assert {line.split("]")[0] for line in lines} == {"[gpu 0", "[gpu 1", "[gpu 2"}
    pgd = [a for a in parsed if a.attack == "pgd"]
    assert {(a.pgd_train_n_iters, a.pgd_alpha_train, a.grad_input_sum_coeff) for a in pgd} == pgd_rows
    assert all(a.attack_init == "zero" for a in parsed)
    assert {a.grad_align_cos_lambda for a in parsed} == {0, gradalign}
    assert sum(a.discrete_eps for a in parsed) == 3


def test_slurm_script_launches_torchrun(tmp_path):
    (line,) = dry_run(os.path.join("sh", "slurm_multinode.sbatch"), "runs/x", "data")
    assert line.startswith("torchrun --nnodes=1 --nproc_per_node=4")
    check_train_command(line, tmp_path)


def test_tiny_imagenet_script_launches_torchrun_on_every_gpu(tmp_path):
    lines = dry_run(os.path.join("sh", "tiny_imagenet_resnet34.sh"), "0,1,2,3", "runs/tiny")
    assert len(lines) == 4 * 3
    for line in lines:
        assert line.startswith("CUDA_VISIBLE_DEVICES=0,1,2,3 torchrun --standalone --nproc_per_node=4 train.py")
        args = check_train_command(line, tmp_path)
        assert (args.dataset, args.model, args.lr_max, args.batch_size) == ("tiny_imagenet", "resnet34", 0.05, 64)
        assert (args.attack_iters, args.n_restarts, args.final_attack_iters, args.final_n_restarts) == (7, 1, 50, 10)
