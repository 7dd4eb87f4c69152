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
            fail_on_call(m, methods.TrainingStep, "__call__", 6)  # in epoch 2, after one checkpoint
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
        fail_on_call(m, methods.TrainingStep, "__call__", 6)  # in epoch 2, after one checkpoint
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
    original = methods.TrainingStep.__call__
    calls = []

    def poisoned(*a, **kw):
        calls.append(1)
        stats = original(*a, **kw)
        if len(calls) == 6:  # the original's step-less epoch 0 is call 1, so this is iteration 5
            stats = {**stats, "loss": stats["loss"] * float("nan")}
        return stats
    monkeypatch.setattr(methods.TrainingStep, "__call__", poisoned)
    assert train.main(argv(tmp_path, tiny_data, "nan")) == 1
    log = open(tmp_path / "nan" / "log.txt").read()
    assert "non-finite training loss at iteration 5" in log
    ckpt = torch.load(tmp_path / "nan" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and ckpt["iteration"] == 3
    rows = utils.read_jsonl(tmp_path / "nan" / "metrics.jsonl")
    assert [r["iteration"] for r in rows] == [2, 4]  # evaluation at 4 ran before the poisoned step 5


def signal_on_call(monkeypatch, module, name, n, signum=signal.SIGTERM, times=1):
    """Deliver signum to this process (times times) when module.name is called for the n-th time."""
    original, calls = getattr(module, name), []

    def wrapper(*a, **kw):
        calls.append(1)
        if len(calls) == n:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return original(*a, **kw)
    monkeypatch.setattr(module, name, wrapper)


STOPS = {  # where the signal comes: (function, its call, the checkpoint's epoch and batch within the next epoch)
    "mid_epoch": (methods.TrainingStep, "__call__", 5, 1, 1),  # call 1 is epoch 0's step-less batch: the first of
    # epoch 2
    "during_evaluation": (evaluation, "periodic_eval", 2, 1, 1),  # iteration 4: batch 1 of epoch 2
    "end_of_epoch": (methods.TrainingStep, "__call__", 4, 1, 0),  # the last batch of epoch 1: its own checkpoint
    "during_final_evaluation": (evaluation, "final_stats", 1, 3, 0),
}


@pytest.mark.parametrize("where", list(STOPS))
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGUSR1], ids=lambda s: s.name)
def test_stop_signal_checkpoints_where_it_is_and_resumes_to_identical_metrics(where, signum, reference, tmp_path,
                                                                              tiny_data, monkeypatch, capsys):
    if signum != signal.SIGTERM and where != "mid_epoch":
        pytest.skip("the signals are handled alike: one place each is enough")
    module, name, n, epoch, batch = STOPS[where]
    run_dir = tmp_path / "stopped"
    with monkeypatch.context() as m:
        signal_on_call(m, module, name, n, signum)
        assert train.main(argv(tmp_path, tiny_data, "stopped")) == 128 + signum
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    assert (ckpt["epoch"], ckpt["batch_in_epoch"]) == (epoch, batch)
    line = [ln for ln in capsys.readouterr().out.splitlines() if "stopped by" in ln]
    assert len(line) == 1 and signum.name in line[0] and f"python train.py --resume {run_dir}" in line[0]
    assert signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL)  # handlers given back
    first_s = torch.load(run_dir / "checkpoint.pt", weights_only=True)["time"]["train_s"]
    assert train.main(["--resume", str(run_dir)]) == 0
    assert metrics_text(run_dir) == reference
    timing = json.loads((run_dir / "timing.json").read_text())  # the wall time of both processes, not the last's
    assert timing["segments"] == 2 and timing["train_s"] >= round(first_s, 1)  # the sum: test_run_clock_...
    within = f"batch {batch}/3 of epoch {epoch + 1}" if batch else f"the end of epoch {epoch}"
    assert f"resumed at iteration {3 * epoch + batch}/9, {within}" in (run_dir / "log.txt").read_text()


def test_run_clock_sums_the_seconds_of_every_process_that_trained_the_run(monkeypatch):
    """timing.json's train_s: the earlier processes' seconds (from the checkpoint) plus this one's, from its start
    to the end of training; on a clock that reads what the test says, not how fast the machine is."""
    now = [1000.0]
    monkeypatch.setattr(train.time, "time", lambda: now[0])
    clock = train.RunClock()
    clock.load_state_dict({"time": {"train_s": 12.5, "segments": 2}, "periodic_eval_s": 3.0})
    now[0] = 1004.25
    assert clock.elapsed() == {"train_s": 16.75, "segments": 3}  # still training: up to now
    clock.end, now[0] = 1006.0, 1100.0
    assert clock.elapsed() == {"train_s": 18.5, "segments": 3} and clock.periodic_eval_s == 3.0
    fresh = train.RunClock()
    now[0] = 1102.0
    assert fresh.elapsed() == {"train_s": 2.0, "segments": 1}


def test_a_second_writer_is_refused_with_one_line_and_a_status_of_its_own(tmp_path, tiny_data, monkeypatch, capsys):
    """One writer per run folder: while a process holds it (here this test, as a train.py would), --resume and
    --resume_existing are refused with one line naming the holder, exit 75, nothing written."""
    with monkeypatch.context() as m:
        signal_on_call(m, methods.TrainingStep, "__call__", 5)
        assert train.main(argv(tmp_path, tiny_data, "held")) == 128 + signal.SIGTERM
    run_dir = tmp_path / "held"
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != ".lock"}
    capsys.readouterr()
    with utils.RunLock(str(run_dir)):
        for again in (["--resume", str(run_dir)], argv(tmp_path, tiny_data, "held") + ["--resume_existing"]):
            assert train.main(again) == train.RUN_LOCKED_EXIT == 75
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and f"is in use by {os.uname().nodename} pid {os.getpid()}" in err[0]
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.name != ".lock"} == before
    assert train.main(["--resume", str(run_dir)]) == 0  # the lock went with its holder


def test_free_at_stopped_within_an_epoch_resumes_with_its_replayed_batch_and_perturbation(tmp_path, tiny_data,
                                                                                         monkeypatch):
    flags = ["--minibatch_replay=2", "--attack_init=zero", "--grad_input_sum_coeff=0"]
    assert train.main(argv(tmp_path, tiny_data, "free") + flags) == 0
    with monkeypatch.context() as m:
        signal_on_call(m, methods.TrainingStep, "__call__", 5)  # batch 1 of epoch 2, whose batch 2 replays it
        assert train.main(argv(tmp_path, tiny_data, "stopped") + flags) == 128 + signal.SIGTERM
    assert train.main(["--resume", str(tmp_path / "stopped")]) == 0
    assert metrics_text(tmp_path / "stopped") == metrics_text(tmp_path / "free")


def test_elle_a_stopped_within_an_epoch_resumes_with_its_lambda_and_error_history(tmp_path, tiny_data, monkeypatch):
    flags = ["--preset=elle_a", "--elle_lambda=5"]
    assert train.main(argv(tmp_path, tiny_data, "elle_a") + flags) == 0
    with monkeypatch.context() as m:
        signal_on_call(m, methods.TrainingStep, "__call__", 5)  # stops after iteration 4
        assert train.main(argv(tmp_path, tiny_data, "stopped") + flags) == 128 + signal.SIGTERM
    own = torch.load(tmp_path / "stopped" / "checkpoint.pt", weights_only=True)["processes"][0]
    schedule = own["schedules"]["elle_lambda"]
    assert schedule["count"] == 4 and schedule["mean"] > 0  # the errors of iterations 1 to 4
    assert train.main(["--resume", str(tmp_path / "stopped")]) == 0
    assert metrics_text(tmp_path / "stopped") == metrics_text(tmp_path / "elle_a")


def test_a_second_ctrl_c_stops_at_once_with_one_line(tmp_path, tiny_data, monkeypatch, capsys):
    with monkeypatch.context() as m:
        signal_on_call(m, methods.TrainingStep, "__call__", 5, signal.SIGINT, times=2)
        assert train.main(argv(tmp_path, tiny_data, "twice")) == 130
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    assert [ln for ln in out.out.splitlines() if "second Ctrl-C" in ln and "--resume" in ln]
    assert torch.load(tmp_path / "twice" / "checkpoint.pt", weights_only=True)["epoch"] == 1  # epoch 1's, intact


def test_sigterm_to_a_process_stops_it_with_a_checkpoint_and_the_resume_command(reference, tmp_path, tiny_data):
    run_dir = tmp_path / "terminated"
    cmd = [sys.executable, os.path.join(ROOT, "train.py")] + argv(tmp_path, tiny_data, "terminated") + ["--epochs=30"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out and f"continue with: python train.py --resume {run_dir}" in out
    resumed = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--resume", str(run_dir)], cwd=ROOT,
                             env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert train.main(argv(tmp_path, tiny_data, "whole") + ["--epochs=30"]) == 0
    assert metrics_text(run_dir) == metrics_text(tmp_path / "whole")


def test_resume_from_another_folder_with_its_data_moved(tmp_path, tiny_data, monkeypatch):
    """A relative --data_dir is saved absolute (and as given); --resume takes --data_dir, and data with another
    fingerprint is refused with one line naming both."""
    import shutil

    from conftest import make_image_folder
    monkeypatch.chdir(tmp_path)
    args = argv("runs", os.path.relpath(tiny_data, tmp_path), "moved")
    with monkeypatch.context() as m:
        signal_on_call(m, methods.TrainingStep, "__call__", 5)
        assert train.main(args) == 128 + signal.SIGTERM
    saved = json.loads((tmp_path / "runs" / "moved" / "args.json").read_text())
    assert saved["data_dir"] == str(tiny_data) and saved["_data"]["data_dir_given"] == "data"
    assert saved["_data"]["fingerprint"].startswith("50 train + 30 test images, sha1 ")
    assert saved["_data"]["source"] == "image folder"  # not the paper's data: report.py sets no numbers beside it
    moved = shutil.move(tiny_data, tmp_path / "elsewhere")
    other = make_image_folder(str(tmp_path / "other"), seed=1)
    monkeypatch.chdir(ROOT)
    run_dir = str(tmp_path / "runs" / "moved")
    assert train.main(["--resume", run_dir]) == 2  # not there any more: refused, not downloaded
    assert train.main(["--resume", run_dir, f"--data_dir={other}"]) == 2
    assert train.main(["--resume", run_dir, f"--data_dir={moved}"]) == 0
    assert train.main(argv(tmp_path, moved, "whole")) == 0
    assert metrics_text(run_dir) == metrics_text(tmp_path / "whole")


def test_other_data_is_refused_by_resume_eval_and_surface_with_one_line(tmp_path, tiny_data, capsys):
    from conftest import make_image_folder
    assert train.main(argv(tmp_path, tiny_data, "run") + ["--epochs=1"]) == 0
    other = make_image_folder(str(tmp_path / "other"), seed=1)
    run_dir = str(tmp_path / "run")
    capsys.readouterr()
    for tool, extra in (("eval.py", []), ("surface.py", ["--n_images=1"])):
        done = subprocess.run([sys.executable, os.path.join(ROOT, tool), run_dir, f"--data_dir={other}", *extra],
                              cwd=ROOT, capture_output=True, text=True)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 2 and len(err) == 1, done.stderr
        assert err[0].count("sha1") == 2 and "is not the run's" in err[0]


def test_resume_existing_continues_skips_starts_or_refuses(reference, tmp_path, tiny_data, monkeypatch, capsys):
    again = argv(tmp_path, tiny_data, "reference") + ["--resume_existing"]
    before = {p.name: p.read_bytes() for p in (tmp_path / "reference").iterdir()}
    assert train.main(again) == 0  # finished: nothing to do, nothing written
    assert {p.name: p.read_bytes() for p in (tmp_path / "reference").iterdir()} == before
    assert train.main(again + ["--lr_max=0.02"]) == 2  # other flags: refused, naming the flag
    assert "--lr_max 0.01 there, 0.02 here" in capsys.readouterr().err
    with monkeypatch.context() as m:
        signal_on_call(m, methods.TrainingStep, "__call__", 5)
        assert train.main(argv(tmp_path, tiny_data, "requeued") + ["--resume_existing"]) == 128 + signal.SIGTERM
    assert train.main(argv(tmp_path, tiny_data, "requeued") + ["--resume_existing", "--device=cpu"]) == 0
    assert metrics_text(tmp_path / "requeued") == reference
    (tmp_path / "early").mkdir()  # stopped before any checkpoint: it starts again there
    (tmp_path / "early" / "log.txt").write_text("an earlier attempt\n")
    assert train.main(argv(tmp_path, tiny_data, "early") + ["--resume_existing"]) == 0
    assert metrics_text(tmp_path / "early") == reference
    assert train.main([a for a in again if not a.startswith("--run_name")]) == 2  # it needs the name


def test_progress_lines_off_a_terminal(tmp_path, tiny_data):
    assert train.main(argv(tmp_path, tiny_data, "lines") + ["--progress_every_s=0"]) == 0
    log = open(tmp_path / "lines" / "log.txt").read()
    lines = [ln for ln in log.splitlines() if "progress: iter" in ln]
    assert len(lines) == 9 and "iter 9/9 epoch 3/3 (batch 3/3)" in lines[-1]  # every tenth of 3 batches: each
    assert all(" it/s | " in ln and "ETA " in ln and "loss 0.0000" not in ln for ln in lines)
    # after each evaluation (every 2 iterations) the running sums start again: those lines have none to show
    assert [" it/s | loss " in ln and " acc " in ln for ln in lines] == [True, False] * 4 + [True]
    assert "final evaluation: last: 2/2 (100%), ETA 0s" in log
    quiet = argv(tmp_path, tiny_data, "quiet")  # the default: a line a minute, none in this short run
    assert train.main(quiet) == 0 and "progress:" not in open(tmp_path / "quiet" / "log.txt").read()
