"""The launch scripts: valid bash, and every command they launch is one train.py accepts."""
import glob
import os
import shlex
import subprocess

import pytest

import train
from test_train import ROOT

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
    args = train.build_parser().parse_args(argv)
    args.device, args.data_dir = "cpu", str(tmp_path)  # checked here without the GPUs and data it names
    train.check_args(args)
    return args


@pytest.mark.parametrize("eps", [8, 16])
def test_table_scripts_launch_every_method_and_seed(eps, tmp_path):
    lines = dry_run(os.path.join("sh", f"cifar10_eps{eps}.sh"), "0,1,2", "runs/t")
    assert len(lines) == 7 * 3
    parsed = [check_train_command(line, tmp_path) for line in lines]
    assert {a.seed for a in parsed} == {0, 1998, 2022} and {a.eps for a in parsed} == {eps}
    assert len({a.run_name for a in parsed}) == 21
    assert {line.split("]")[0] for line in lines} == {"[gpu 0", "[gpu 1", "[gpu 2"}
    assert sum(a.discrete_eps for a in parsed) == 3 and sum(a.attack == "pgd" for a in parsed) == 9


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
        assert (args.dataset, args.model, args.sync_bn) == ("tiny_imagenet", "resnet34", True)
