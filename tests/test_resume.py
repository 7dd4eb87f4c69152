"""Interrupted runs resume to the same metrics; bad checkpoints and non-finite losses stop cleanly."""
import inspect
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import ROOT, TINY_RUN

import evaluation
import methods
import train
import utils

# random starts and GradSum's random points make every random generator matter
RESUMABLE = "--attack=fgsm --attack_init=random --grad_input_sum_coeff=1 --fix_gradsum --epochs=3 --eval_iter_freq=2"


def argv(tmp_path, data_dir, name):
    return shlex.split(f"{TINY_RUN} {RESUMABLE} --data_dir={data_dir} --out_dir={tmp_path} --run_name={name}")


def metrics_text(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return f.read()


@pytest.fixture
def reference(tmp_path, tiny_data):
    assert train.main(argv(tmp_path, tiny_data, "reference")) == 0
    return metrics_text(tmp_path / "reference")


class Killed(BaseException):
    """Stands for SIGKILL inside the process: nothing after it runs."""


def fail_on_call(monkeypatch, module, name, n):
    """Make module.name raise Killed on its n-th call."""
    original, calls = getattr(module, name), []

    def wrapper(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            raise Killed
        return original(*a, **kw)
    monkeypatch.setattr(module, name, wrapper)


def tear_checkpoint_write(monkeypatch, n):
    """Make the n-th checkpoint write die half-way through writing its file."""
    original, calls = torch.save, []

    def torn(obj, f, *a, **kw):
        if "checkpoint" in str(getattr(f, "name", f)):
            calls.append(1)
            if len(calls) == n:
                f.write(b"PK\x03\x04 half a checkpoint")
                raise Killed
        return original(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", torn)


@pytest.mark.parametrize("where", ["between_steps", "during_evaluation", "during_checkpoint_write"])
def test_interrupted_run_resumes_to_identical_metrics(where, reference, tmp_path, tiny_data, monkeypatch):
    run_dir = tmp_path / "interrupted"
    with monkeypatch.context() as m:
        if where == "between_steps":
            fail_on_call(m, methods, "train_step", 6)  # in epoch 2, after one checkpoint
        elif where == "during_evaluation":
            fail_on_call(m, evaluation, "periodic_eval", 4)
        else:
            tear_checkpoint_write(m, 2)
        with pytest.raises(Killed):
            train.main(argv(tmp_path, tiny_data, "interrupted"))
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] >= 1  # the good one survived
    assert train.main(["--resume", str(run_dir)]) == 0
    assert metrics_text(run_dir) == reference
    assert not [f for f in os.listdir(run_dir) if ".tmp" in f]  # a torn temporary file is cleaned up


def test_sigkilled_process_resumes_to_identical_metrics(reference, tmp_path, tiny_data):
    run_dir = tmp_path / "killed"
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + argv(tmp_path, tiny_data, "killed")
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as the in-process reference: sums depend on the thread count
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", str(run_dir)], cwd=ROOT,
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert metrics_text(run_dir) == reference


def test_same_command_and_seed_give_the_same_metrics_file(reference, tmp_path, tiny_data):
    assert train.main(argv(tmp_path, tiny_data, "again")) == 0
    assert metrics_text(tmp_path / "again") == reference


def test_resuming_a_finished_run_changes_nothing(reference, tmp_path):
    before = open(tmp_path / "reference" / "checkpoint.pt", "rb").read()
    assert train.main(["--resume", str(tmp_path / "reference")]) == 0
    assert metrics_text(tmp_path / "reference") == reference
    assert open(tmp_path / "reference" / "checkpoint.pt", "rb").read() == before


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_damaged_checkpoint_is_refused_with_one_line(damage, tmp_path, tiny_data, capsys):
    assert train.main(argv(tmp_path, tiny_data, "run") + ["--epochs=1"]) == 0
    path = tmp_path / "run" / "checkpoint.pt"
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:1000])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:
        path.unlink()
    before = {p: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume=" in err[0] and "checkpoint.pt" in err[0]
    assert {p: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before


def test_an_fp16_run_saved_before_periodic_eval_fp32_resumes_with_the_fp32_evaluations_it_had(tmp_path, tiny_data,
                                                                                            monkeypatch):
    """Periodic evaluations under --half_prec were fp32 until the flag came and made the training's precision the
    default: such a run, resumed, must go on evaluating as it started."""
    run_dir = tmp_path / "old"
    with monkeypatch.context() as m:
        fail_on_call(m, methods, "train_step", 6)  # in epoch 2, after one checkpoint
        with pytest.raises(Killed):
            train.main(argv(tmp_path, tiny_data, "old") + ["--half_prec"])
    saved = json.loads((run_dir / "args.json").read_text())
    del saved["periodic_eval_fp32"]  # as args.json was written before the flag existed
    (run_dir / "args.json").write_text(json.dumps(saved))
    precisions, periodic_eval = [], evaluation.periodic_eval

    def recording(*a, **kw):
        call = inspect.signature(periodic_eval).bind(*a, **kw)
        call.apply_defaults()
        precisions.append((call.arguments["autocast"], call.arguments["loss_scale"]))
        return periodic_eval(*a, **kw)
    monkeypatch.setattr(evaluation, "periodic_eval", recording)
    assert train.main(["--resume", str(run_dir)]) == 0
    assert precisions and all(p == (None, None) for p in precisions)  # fp32, no loss scale
    precisions.clear()
    assert train.main(argv(tmp_path, tiny_data, "new") + ["--half_prec", "--epochs=1"]) == 0
    assert precisions and all(autocast is not None and scale > 0 for autocast, scale in precisions)


def test_resume_refuses_training_flags(tmp_path, tiny_data, capsys):
    assert train.main(argv(tmp_path, tiny_data, "run") + ["--epochs=1"]) == 0
    assert train.main(["--resume", str(tmp_path / "run"), "--eps=4"]) == 2
    assert "--eps" in capsys.readouterr().err


def test_non_finite_loss_stops_with_the_iteration_and_keeps_good_state(tmp_path, tiny_data, monkeypatch):
    original = methods.train_step
    calls = []

    def poisoned(*a, **kw):
        calls.append(1)
        stats, delta = original(*a, **kw)
        if len(calls) == 6:  # the original's step-less epoch 0 is call 1, so this is iteration 5
            stats = {**stats, "loss": stats["loss"] * float("nan")}
        return stats, delta
    monkeypatch.setattr(methods, "train_step", poisoned)
    assert train.main(argv(tmp_path, tiny_data, "nan")) == 1
    log = open(tmp_path / "nan" / "log.txt").read()
    assert "non-finite training loss at iteration 5" in log
    ckpt = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 3
    rows = utils.read_jsonl(tmp_path / "nan" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [2, 4]  # evaluation at 4 ran before the poisoned step 5
