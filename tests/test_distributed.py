"""Data-parallel training under torchrun: 2 CPU processes (gloo) against one process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest
import torch
from test_train import ROOT, TINY_RUN

import utils


def launch(tmp_path, data_dir, name, flags, n_procs):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n_procs}",
           os.path.join(ROOT, "train.py")] + f"{TINY_RUN} --data_dir={data_dir} --out_dir={tmp_path} " \
        f"--run_name={name} {flags}".split()
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp_path / name, done.stdout


@pytest.fixture(scope="module")
def tiny_data_module(tmp_path_factory):
    from conftest import make_image_folder
    return make_image_folder(str(tmp_path_factory.mktemp("data") / "data"))


@pytest.mark.parametrize("method", ["--attack=fgsm --grad_input_sum_coeff=1 --attack_init=random --fix_gradsum",
                                    "--attack=fgsm --minibatch_replay=2", "--model=resnet18 --discrete_eps",
                                    "--attack=pgd --pgd_train_n_iters=2 --grad_align_cos_lambda=0.2 --half_prec"])
def test_two_processes_train_one_model(method, tmp_path, tiny_data_module):
    run_dir, out = launch(tmp_path, tiny_data_module, "ddp", method, 2)
    assert "2 processes hold identical weights and buffers" in out
    rows = utils.read_jsonl(run_dir / "metrics.jsonl")
    assert all(r["n_eval_points"] == 16 for r in rows if r["kind"] == "periodic")  # each point counted once
    assert [r["n_points"] for r in rows if r["kind"] == "final"] == [12, 12, 12]
    assert sorted(os.listdir(run_dir)) == [".lock", "args.json", "checkpoint.pt", "log.txt", "metrics.jsonl",
                                           "timing.json"]
    assert len(torch.load(run_dir / "checkpoint.pt", weights_only=True)["processes"]) == 2


def test_two_processes_match_one_process_without_batchnorm(tmp_path, tiny_data_module):
    """The cnn has no BatchNorm and zero-init FGSM draws nothing random: only the split differs."""
    flags = "--attack=fgsm --attack_init=zero --fgsm_alpha=1.0 --epochs=3"
    one, _ = launch(tmp_path, tiny_data_module, "one", flags, 1)
    two, _ = launch(tmp_path, tiny_data_module, "two", flags, 2)
    rows = [[r for r in utils.read_jsonl(d / "metrics.jsonl") if r["kind"] == "periodic"] for d in (one, two)]
    assert len(rows[0]) == len(rows[1]) == 3
    for a, b in zip(*rows, strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-5)
        assert a["train_acc"] == b["train_acc"]
    weights = [torch.load(d / "checkpoint.pt", weights_only=True)["model"] for d in (one, two)]
    for k in weights[0]:
        assert torch.allclose(weights[0][k], weights[1][k], atol=1e-5)


def test_a_two_process_runs_reported_numbers_are_its_saved_models(tmp_path, tiny_data_module, capsys):
    """Each process updates its own BatchNorm statistics from its half of the batch; every evaluation uses process
    0's, the saved ones: eval.py in one process gives the final rows' clean and FGSM accuracy of every model."""
    import eval as evaluation
    run_dir, _ = launch(tmp_path, tiny_data_module, "bn", "--model=resnet18 --attack=fgsm --attack_init=zero "
                        "--fgsm_alpha=1.0 --epochs=3", 2)
    finals = {r["model"]: r for r in utils.read_jsonl(run_dir / "metrics.jsonl") if r["kind"] == "final"}
    buffers = [k for k in torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"] if "running_var" in k]
    assert buffers and finals["last"]["iteration"] != finals["early_stopped"]["iteration"]
    assert evaluation.main([str(run_dir), "--pgd", "0", "0", "--fgsm_sweep", "4", "--fgsm_sweep_projected",
                            "--n_points", "12", "--batch_size", "8", "--device", "cpu"]) == 0
    result = json.load(open(next(run_dir.glob("eval-*.json"))))["models"]
    for name, row in finals.items():
        assert (result[name]["clean_acc"], result[name]["fgsm_step4_acc"]) == (row["clean_acc"], row["fgsm_acc"])
