"""The launch scripts: valid bash, and every command they launch is one train.py accepts."""
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
from test_train import ROOT

import config
import kernels

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "sh", "*.sh")) + glob.glob(os.path.join(ROOT, "sh", "*.sbatch")))


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_script_is_valid_bash(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0


def dry_run(*cmd, env=None):
    done = subprocess.run(["bash", *cmd], cwd=ROOT, env=dict(os.environ, DRY_RUN="1", **(env or {})),
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def check_train_command(line, tmp_path):
    argv = shlex.split(line[line.index("train.py") + len("train.py"):])
    args = config.build_parser().parse_args(argv)
    args.data_dir = str(tmp_path)  # checked here without the GPUs and data it names
    config.check_args(args)
    return args


PEERS = ("n-fgsm", "elle", "elle-a", "gradsum-fd")  # sh/cifar10_table.tsv's rows beyond the paper's
# the original results file's rows: (PGD iterations, step, GradSum lambda) of the PGD rows, GradAlign's lambda
RESULTS_FILE = {8: ({(2, 4, 0), (2, 6, 0), (8, 1, 0), (10, 1.6, 0), (2, 4, 1.7), (10, 1.6, 1.0)}, 20),
                16: ({(2, 8, 0), (10, 3.2, 0), (10, 3.2, 1.4)}, 24)}


@pytest.mark.parametrize("eps", [8, 16])
def test_table_scripts_launch_the_results_files_rows_for_every_seed(eps, tmp_path):
    paper = dry_run(os.path.join("sh", f"cifar10_eps{eps}.sh"), "0,1,2", "runs/t")
    lines = dry_run(os.path.join("sh", f"cifar10_eps{eps}.sh"), "0,1,2", "runs/t", env={"ROWS": "all"})
    assert paper == [line for line in lines if not any(f"--run_name={p}-" in line for p in PEERS)]
    name = lambda line: line.split("--run_name=")[1].split()[0]  # noqa: E731
    peers = dry_run(os.path.join("sh", f"cifar10_eps{eps}.sh"), "0", "runs/t", env={"ROWS": "peers"})
    assert [name(line) for line in peers] == [name(line) for line in lines if line not in paper]
    parsed = [check_train_command(line, tmp_path) for line in lines]
    pgd_rows, gradalign = RESULTS_FILE[eps]
    assert len(paper) == 3 * (4 + len(pgd_rows)) and len(lines) == 3 * (4 + len(pgd_rows) + len(PEERS))
    assert {a.seed for a in parsed} == {0, 1998, 2022} and {a.eps for a in parsed} == {eps}
    assert len({a.run_name for a in parsed}) == len(lines)
    assert len({config.method_name(a) for a in parsed}) == len(lines) // 3  # no two rows merge in the report
    assert {line.split("]")[0] for line in lines} == {"[gpu 0", "[gpu 1", "[gpu 2"}
    pgd = [a for a in parsed if a.attack == "pgd"]
    assert {(a.pgd_train_n_iters, a.pgd_alpha_train, a.grad_input_sum_coeff) for a in pgd} == pgd_rows
    assert all(a.attack_init == "zero" for a in parsed if a.attack != "n_fgsm")
    peers = {(a.attack, a.n_fgsm_noise if a.attack == "n_fgsm" else 0, a.elle_lambda, a.elle_adaptive,
              a.grad_input_sum_fd_coeff) for a in parsed if a.attack == "n_fgsm" or a.elle_lambda
             or a.grad_input_sum_fd_coeff}
    assert peers == {("n_fgsm", 2, 0, False, 0), ("fgsm", 0, {8: 1000, 16: 5000}[eps], False, 0),
                     ("fgsm", 0, 4000, True, 0), ("fgsm", 0, 0, False, 10)}
    assert {a.grad_align_cos_lambda for a in parsed} == {0, gradalign}
    assert sum(a.discrete_eps for a in parsed) == 3


def test_slurm_script_launches_torchrun(tmp_path):
    (line,) = dry_run(os.path.join("sh", "slurm_multinode.sbatch"), "runs/x", "data", "gradsum8")
    # torchrun of the PYTHON that runs train.py, on what Slurm gives the node, else 1 GPU
    assert line.startswith("python -m torch.distributed.run --nnodes=1 --nproc_per_node=1")
    args = check_train_command(line, tmp_path)
    assert (args.run_name, args.resume_existing, args.preset) == ("gradsum8", True, "gradsum")


def test_tiny_imagenet_script_launches_torchrun_on_every_gpu(tmp_path):
    lines = dry_run(os.path.join("sh", "tiny_imagenet_resnet34.sh"), "0,1,2,3", "runs/tiny")
    assert len(lines) == 4 * 3
    for line in lines:
        assert line.startswith("CUDA_VISIBLE_DEVICES=0,1,2,3 torchrun --standalone --nproc_per_node=4 train.py")
        args = check_train_command(line, tmp_path)
        assert (args.dataset, args.model, args.lr_max, args.batch_size) == ("tiny_imagenet", "resnet34", 0.05, 64)
        assert (args.attack_iters, args.n_restarts, args.final_attack_iters, args.final_n_restarts) == (7, 1, 50, 10)


USAGE_ERRORS = {  # a wrong argument list for each script: too few arguments, and an option where a path goes
    "binary_study.sh": ([], ["--data_dir", "x"]),
    "cifar10_eps16.sh": (["0"], ["0", "--help-me"]),
    "cifar10_eps8.sh": (["0"], ["-1", "runs/x"]),
    "cifar10_table.sh": (["8", "0"], ["8", "--help=0", "runs/x"]),
    "cpu_experiment.sh": ([], ["-d"]),
    "cpu_peers.sh": ([], ["data", "--out"]),
    "estimate_check.sh": ([], ["-x"]),
    "gpu_check.sh": (["data"], ["data", "--out"]),
    "slurm_multinode.sbatch": (["runs/x", "data"], ["--out", "data", "name"]),
    "slurm_table.sbatch": (["8", "runs/x"], ["8", "-o", "data"]),
    "slurm_table.sh": (["8"], ["8", "--partition=gpu", "data"]),
    "tiny_imagenet_resnet34.sh": (["0"], ["0", "-o"]),
}


def run_script(script, *args, env=None, **kw):
    return subprocess.run(["bash", os.path.join(ROOT, "sh", script), *args], capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), **kw)


@pytest.mark.parametrize("script", [os.path.basename(s) for s in SCRIPTS])
def test_every_script_answers_help_and_refuses_wrong_arguments(script, tmp_path):
    done = run_script(script, "--help", cwd=tmp_path)
    assert done.returncode == 0 and "Usage:" in done.stdout and not os.listdir(tmp_path)
    for args in USAGE_ERRORS[script]:
        done = run_script(script, *args, cwd=tmp_path)
        assert done.returncode == 2 and "Usage:" in done.stderr, (args, done.stderr)
        assert not os.listdir(tmp_path)  # nothing made: no folder called --help, no run started


def test_table_script_refuses_a_bad_eps_and_gpu_list(tmp_path):
    assert run_script("cifar10_table.sh", "12", "0", "runs/x").returncode == 2
    done = run_script("cifar10_table.sh", "8", "0;1", "runs/x")
    assert done.returncode == 2 and "GPU_IDS" in done.stderr


WRAPPER = """#!{python}
# A stand-in python for the sh/ scripts: records each call, shrinks train.py's runs to tiny data, fails the run
# (or RUN.autoattack, its eval.py step) named by FAIL_ONCE on its first attempt, and ends the run named in
# EXIT_WITH (NAME:STATUS) with that status.
import os, sys
args = sys.argv[1:]
with open(os.environ["CALLS"], "a") as f:
    f.write(" ".join(args) + "\\n")
if args[:1] == ["eval.py"]:
    marker = os.environ["CALLS"] + "." + os.path.basename(args[1]) + ".autoattack.failed"
    if os.path.basename(args[1]) + ".autoattack" == os.environ.get("FAIL_ONCE") and not os.path.exists(marker):
        open(marker, "w").close()
        sys.exit("failing on purpose")
if args[:1] == ["train.py"]:
    name = next(a.split("=", 1)[1] for a in args if a.startswith("--run_name="))
    marker = os.environ["CALLS"] + "." + name + ".failed"
    if name == os.environ.get("FAIL_ONCE") and not os.path.exists(marker):
        open(marker, "w").close()
        sys.exit("failing on purpose")
    exit_name, _, status = os.environ.get("EXIT_WITH", "").partition(":")
    if name == exit_name:
        sys.exit(int(status))
    args += os.environ["SHRINK"].split() + ["--data_dir=" + os.environ["TINY_DATA"]]
os.execv(sys.executable, [sys.executable] + args)
"""


@pytest.fixture
def stand_in(tmp_path, tiny_data):
    """(env for the sh/ scripts: PYTHON the wrapper, ROWS and SEEDS a part of the table; the calls file)."""
    from test_train import TINY_RUN
    wrapper = tmp_path / "python"
    wrapper.write_text(WRAPPER.replace("{python}", sys.executable))
    wrapper.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {"PYTHON": str(wrapper), "CALLS": str(calls), "TINY_DATA": tiny_data, "SHRINK": TINY_RUN,
           "ROWS": "fgsm gradsum pgd2-a4", "SEEDS": "0 1", "OMP_NUM_THREADS": "1", "AA": "0"}
    return env, calls


def train_calls(calls):
    return [line for line in calls.read_text().splitlines() if line.startswith("train.py")] if calls.exists() else []


def test_table_script_isolates_a_failed_run_and_a_rerun_completes_the_table(stand_in, tmp_path):
    env, calls = stand_in
    out = tmp_path / "table"
    env = {**env, "ROWS": "fgsm gradsum"}
    first = run_script("cifar10_table.sh", "8", "cpu,cpu", str(out), env={**env, "FAIL_ONCE": "fgsm-eps8-seed0"},
                       cwd=tmp_path)
    assert first.returncode == 1
    runs = [f"{row}-eps8-seed{seed}" for row in ("fgsm", "gradsum") for seed in (0, 1)]
    assert len(train_calls(calls)) == 4  # every run ran, the failed one's queue went on to its next run
    finished = [r for r in runs if (out / r / "timing.json").exists()]
    assert finished == [r for r in runs if r != "fgsm-eps8-seed0"]
    assert "3 of 4 runs finished" in first.stdout
    assert f"not finished: fgsm-eps8-seed0 (failed, exit 1): {out}/logs/fgsm-eps8-seed0.log" in first.stdout
    assert "failing on purpose" in (out / "logs" / "fgsm-eps8-seed0.log").read_text()
    assert (out / "table.md").exists()  # the table of what finished
    kept = {r: (out / r / "metrics.jsonl").read_bytes() for r in finished}
    stamps = {r: os.stat(out / r / "metrics.jsonl").st_mtime_ns for r in finished}
    calls.write_text("")
    second = run_script("cifar10_table.sh", "8", "cpu,cpu", str(out), env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert [c.split("--run_name=")[1].split()[0] for c in train_calls(calls)] == ["fgsm-eps8-seed0"]
    assert "4 of 4 runs finished (1 now, 3 before)" in second.stdout
    assert all((out / r / "metrics.jsonl").read_bytes() == kept[r] for r in finished)
    assert all(os.stat(out / r / "metrics.jsonl").st_mtime_ns == stamps[r] for r in finished)
    assert "| fgsm-gradsum10 |" in (out / "table.md").read_text() and "| 2 |" in (out / "table.md").read_text()


def test_table_script_stops_its_queue_after_a_stopped_run_and_names_a_run_held_elsewhere(stand_in, tmp_path):
    """A run stopped by a signal stops the queue (also where the script's own shell could not trap the signal: a
    background job of a script ignores SIGINT, its train.py does not); a run whose folder another process holds
    is reported as such, neither failed nor finished."""
    env, calls = stand_in
    out, env = tmp_path / "table", {**env, "ROWS": "fgsm", "SEEDS": "0 1"}
    done = run_script("cifar10_table.sh", "8", "cpu", str(out), env={**env, "EXIT_WITH": "fgsm-eps8-seed0:130"})
    assert done.returncode == 1 and len(train_calls(calls)) == 1
    assert "not finished: fgsm-eps8-seed0 (stopped by a signal, exit 130: it continues when rerun)" in done.stdout
    assert "not finished: fgsm-eps8-seed1 (not run)" in done.stdout
    done = run_script("cifar10_table.sh", "8", "cpu", str(out), env={**env, "EXIT_WITH": "fgsm-eps8-seed0:75"})
    assert done.returncode == 1 and (out / "fgsm-eps8-seed1" / "timing.json").exists()
    assert "fgsm-eps8-seed0 (running elsewhere: another process holds its folder)" in done.stdout


def test_a_failed_autoattack_is_isolated_like_a_run_and_a_rerun_runs_it_alone(stand_in, tmp_path):
    env, calls = stand_in
    out = tmp_path / "table"
    env = {**env, "ROWS": "fgsm", "AA": "1", "AA_POINTS": "4"}
    first = run_script("cifar10_table.sh", "8", "cpu", str(out), env={**env, "FAIL_ONCE": "fgsm-eps8-seed0.autoattack"},
                       cwd=tmp_path)
    assert first.returncode == 1  # both runs trained; seed 0's AutoAttack failed and the queue went on
    assert "2 of 2 runs finished (2 now, 0 before)" in first.stdout
    assert "AutoAttack (4 points): 1 of 2 finished runs evaluated" in first.stdout
    assert (f"AutoAttack not finished: fgsm-eps8-seed0 (failed, exit 1): {out}/logs/fgsm-eps8-seed0.autoattack.log"
            in first.stdout)
    assert "--models last early_stopped --pgd 0 0 --autoattack --n_points 4" in calls.read_text()
    calls.write_text("")
    second = run_script("cifar10_table.sh", "8", "cpu", str(out), env=env, cwd=tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr
    assert not train_calls(calls)
    assert [c.split()[1] for c in calls.read_text().splitlines() if c.startswith("eval.py")] == [
        f"{out}/fgsm-eps8-seed0"]  # seed 1's AutoAttack had finished: skipped
    assert "AutoAttack (4 points): 2 of 2 finished runs evaluated" in second.stdout
    assert "| AutoAttack standard (pyautoattack 0.2.0), seed 0, 4 pts |" in (out / "table.md").read_text()
    bad = run_script("cifar10_table.sh", "8", "cpu", str(out), env={**env, "AA_POINTS": "all"}, cwd=tmp_path)
    assert bad.returncode == 2 and "AA_POINTS=all" in bad.stderr


def test_tiny_runs_every_script_on_a_cpu_in_minutes(tiny_data, tmp_path):
    """TINY=1 with the real train.py: the table's runs shrunk to a smoke test; EXTRA_ARGS come last and win."""
    env = {"TINY": "1", "ROWS": "gradsum", "EXTRA_ARGS": "--batch_size=16", "OMP_NUM_THREADS": "1",
           "PYTHON": sys.executable}
    done = run_script("cifar10_table.sh", "8", "cpu", str(tmp_path / "t"), tiny_data, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "1 of 1 runs finished (1 now, 0 before)" in done.stdout  # one seed under TINY
    args = json.loads((tmp_path / "t" / "gradsum-eps8-seed0" / "args.json").read_text())
    assert (args["model"], args["epochs"], args["batch_size"], args["grad_input_sum_coeff"]) == ("cnn", 1, 16, 10)
    table = (tmp_path / "t" / "table.md").read_text()  # the official AutoAttack of the last and early-stopped models
    header = next(line for line in table.splitlines() if line.startswith("| dataset"))
    assert "| AutoAttack standard (pyautoattack 0.2.0), seed 0, 16 pts | ES AutoAttack standard (" in header
    aa = header.strip("|").split("|").index(" AutoAttack standard (pyautoattack 0.2.0), seed 0, 16 pts ")
    assert re.fullmatch(r"\d+\.\d\d", table.splitlines()[2].strip("|").split("|")[aa].strip())
    again = run_script("cifar10_table.sh", "8", "cpu", str(tmp_path / "t"), tiny_data, env=env, cwd=tmp_path)
    assert again.returncode == 0 and "1 of 1 runs finished (0 now, 1 before)" in again.stdout
    assert (tmp_path / "t" / "logs" / "gradsum-eps8-seed0.autoattack.status").read_text() == "skipped\n"
    assert (tmp_path / "t" / "table.md").read_text() == table
    done = run_script("cpu_experiment.sh", tiny_data, str(tmp_path / "c"), env={**env, "METHODS": "vfsat"},
                      cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert json.loads((tmp_path / "c" / "vfsat-seed0" / "args.json").read_text())["n_final_eval"] == 64


def test_table_estimate_projects_every_row_and_the_table_on_its_queues(tiny_data, tmp_path):
    env = {"TINY": "1", "ESTIMATE": "1", "ROWS": "fgsm gradsum", "SEEDS": "0 1 2", "EXTRA_ARGS": "--batch_size=16",
           "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    done = run_script("cifar10_table.sh", "8", "cpu,cpu", str(tmp_path / "t"), tiny_data, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    rows = {line.split(":")[0]: int(line.split()[4]) for line in done.stdout.splitlines()
            if line.split(":")[0] in ("fgsm", "gradsum")}
    total = 3 * sum(rows.values())  # each row's three seeds; two queues take 3 and 3 runs in turn
    longest = max(2 * rows["fgsm"] + rows["gradsum"], rows["fgsm"] + 2 * rows["gradsum"])
    assert f"table eps 8: 6 run(s), projected {total} s" in done.stdout and f"(cpu,cpu): {longest} s" in done.stdout
    assert not (tmp_path / "t").exists()  # nothing ran, nothing was written


def test_cpu_peers_runs_the_six_methods_and_writes_their_table(stand_in, tmp_path):
    env, calls = stand_in
    out = tmp_path / "cpu"
    env = {**env, "SEEDS": "", "SHRINK": env["SHRINK"] + " --epochs=1"}  # the original's one seed, one epoch each
    done = run_script("cpu_peers.sh", "data", str(out), env=env, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    names = sorted(c.split("--run_name=")[1].split()[0] for c in train_calls(calls))  # two at a time: any order
    assert names == sorted(f"{m}-seed2022" for m in ("fgsm", "vfsat", "gradsum", "n-fgsm", "elle", "gradsum-fd"))
    assert all("--n_filters_cnn=6 " in c and "--eps=10 " in c for c in train_calls(calls))  # the original's CNN
    table = (out / "peers.md").read_text()
    assert all(f"| {m} |" in table for m in ("nfgsm2", "fgsm-elle5000", "fgsm-gradsumfd20"))
    assert not (out / "table.md").exists() and (out / "plots_peers").is_dir()
    bad = run_script("cpu_experiment.sh", "data", str(out), env={**env, "METHODS": "fgsm pgd"}, cwd=ROOT)
    assert bad.returncode == 2 and "METHODS: pgd is not one of" in bad.stderr
    for var, value in (("THREADS", "0"), ("JOBS", "two"), ("SEEDS", "0 x"), ("EXPERIMENT", "big"),
                       ("PIN_KERNELS", "yes")):
        bad = run_script("cpu_experiment.sh", "data", str(out), env={**env, var: value}, cwd=ROOT)
        assert bad.returncode == 2 and f"{var}" in bad.stderr.splitlines()[0], (var, bad.stderr)


def test_cpu_experiment_runs_methods_times_seeds_at_the_thread_count_it_records(stand_in, tmp_path):
    env, calls = stand_in
    out = tmp_path / "cpu"
    env = {**env, "SEEDS": "0 1", "METHODS": "fgsm gradsum-fd", "THREADS": "2", "JOBS": "2"}
    unpinned = {k: v for k, v in os.environ.items() if k not in kernels.PINNED}  # conftest's pins: the script's own
    done = subprocess.run(["bash", os.path.join(ROOT, "sh", "cpu_experiment.sh"), "data", str(out)], cwd=ROOT,
                          env={**unpinned, **env}, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    has_avx2 = "avx2" in open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else False
    runs = sorted(f"{m}-seed{s}" for m in ("fgsm", "gradsum-fd") for s in (0, 1))
    assert sorted(c.split("--run_name=")[1].split()[0] for c in train_calls(calls)) == runs
    for run in runs:
        args = json.loads((out / run / "args.json").read_text())
        assert args["seed"] == int(run[-1]) and args["_provenance"]["cpu_threads"] == 2  # THREADS reached torch
        kernels_used = args["_provenance"]["cpu_kernels"]  # PIN_KERNELS=1, the default, reached torch's libraries
        assert kernels_used == {"aten": "AVX2" if has_avx2 else kernels_used["aten"], "onednn_max_isa": "AVX2",
                                "mkl_cbwr": "AVX2", "pinned": has_avx2}
        assert (args["n_filters_cnn"], args["eps"], args["lr_max"], args["attack_init"]) == (4, 4, 0.01, "zero")
        assert f"= {run}: exit 0 (log: {out}/logs/{run}.log)" in done.stdout and (out / "logs" / f"{run}.log").exists()
    assert "--n_filters_cnn=8 --lr_max=0.003 --n_train=10000 --eps=16 --epochs=12" in train_calls(calls)[0]
    table = (out / "table.md").read_text()
    assert "| fgsm |" in table and "| fgsm-gradsumfd10 |" in table and "| 2 |" in table
    calls.write_text("")
    again = run_script("cpu_experiment.sh", "data", str(out), env=env, cwd=ROOT)
    assert again.returncode == 0 and not train_calls(calls) and again.stdout.count("finished already") == 4


SLURM_STAND_IN = """#!/usr/bin/env bash
# a stand-in for Slurm's {name}: records what it was asked{reply}
printf '%s\\n' "$*" >> "{record}"
{reply_line}
"""


@pytest.fixture
def slurm(tmp_path):
    """A folder with stand-in sbatch (answers job ids 4242, 4243, ...) and scontrol; the records they write."""
    bin_dir, records = tmp_path / "bin", tmp_path / "slurm"
    bin_dir.mkdir()
    records.mkdir()
    for name, reply in (("sbatch", 'echo $((4242 + $(wc -l < "{record}") - 1))'), ("scontrol", ""),
                        ("sinfo", "printf '%s\\n' 'cpu 64 (null) infinite' 'gpu* 32 gpu:a100:4(S:0-1) 2-00:00:00' "
                         "'gpu* 64 gpu:8 2-00:00:00'")):
        record = records / f"{name}.txt"
        note = ", answers an id" if reply else ""
        (bin_dir / name).write_text(SLURM_STAND_IN.format(name=name, record=record, reply=note,
                                                          reply_line=reply.format(record=record)))
        (bin_dir / name).chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, records


def test_slurm_table_submits_one_array_task_per_run_and_a_table_job_after_them(stand_in, slurm, tmp_path):
    env, _ = stand_in
    path, records = slurm
    done = run_script("slurm_table.sh", "8", "runs/t", "data", cwd=tmp_path,
                      env={**env, **path, "PARTITION": "gpu", "ACCOUNT": "mylab", "TIME_LIMIT": "8:00:00"})
    assert done.returncode == 0, done.stderr
    array, table = (records / "sbatch.txt").read_text().splitlines()
    for opt in ("--array=0-5", "--signal=B:USR1@300", "--requeue", "--partition=gpu", "--account=mylab",
                "--time=8:00:00", "--gpus-per-task=1", f"{tmp_path}/runs/t/logs/slurm-%A_%a.out"):
        assert opt in array
    assert array.endswith(f"sh/slurm_table.sbatch 8 {tmp_path}/runs/t {tmp_path}/data")
    assert "--dependency=afterany:4242" in table and table.endswith(f"--table 8 {tmp_path}/runs/t {tmp_path}/data")
    assert "submitted array job 4242 (6 runs) and table job 4243" in done.stdout
    dry = run_script("slurm_table.sh", "8", "runs/t", "data", cwd=tmp_path, env={**env, **path, "DRY_RUN": "1"})
    assert [line.split()[1] for line in dry.stdout.splitlines()] == ["sbatch", "sbatch"]  # the table job too
    assert "--dependency=afterany:JOBS" in dry.stdout.splitlines()[1]
    (records / "sbatch.txt").unlink()
    done = run_script("slurm_table.sh", "8", "runs/t", "data", cwd=tmp_path,
                      env={**env, **path, "AA": "1", "GPUS_PER_RUN": "2", "AA_TIME_LIMIT": "2:00:00"})
    assert done.returncode == 0, done.stderr
    array, autoattack, table = (records / "sbatch.txt").read_text().splitlines()
    for opt in ("--array=0-5", "--dependency=aftercorr:4242", "--kill-on-invalid-dep=yes", "--time=2:00:00",
                "--gpus-per-task=1", "--signal=B:USR1@300", "--requeue", "slurm-autoattack-%A_%a.out"):
        assert opt in autoattack, opt
    assert "--gpus-per-task=2" in array and "--time=12:00:00" in array
    assert autoattack.endswith(f"sh/slurm_table.sbatch --autoattack 8 {tmp_path}/runs/t {tmp_path}/data")
    assert "--dependency=afterany:4242:4243" in table  # after every training and AutoAttack task
    assert "AutoAttack array job 4243 (each task after its run's) and table job 4244" in done.stdout


@pytest.mark.parametrize("request_env, expected", [
    ({"GPUS_PER_RUN": "16"}, "GPUS_PER_RUN=16: the nodes of partition gpu have at most 8 GPUs"),
    ({"GPUS_PER_RUN": "8", "CPUS_PER_GPU": "10"}, "a task would ask for 80 CPUs and the nodes of partition gpu have "
     "at most 64; set CPUS_PER_GPU=8"),
    ({"TIME_LIMIT": "3-00:00:00"}, "TIME_LIMIT=3-00:00:00: partition gpu allows at most 2-00:00:00"),
    ({"AA": "1", "AA_TIME_LIMIT": "3-00:00:00"}, "AA_TIME_LIMIT=3-00:00:00: partition gpu allows at most 2-00:00:00"),
    ({"PARTITION": "a100"}, "PARTITION=a100: sinfo lists no such partition"),
    ({"PARTITION": "cpu", "GPUS_PER_RUN": "1"}, "the nodes of partition cpu have at most 0 GPUs"),
])
def test_slurm_table_refuses_what_the_partition_cannot_run_before_queueing(request_env, expected, stand_in, slurm,
                                                                           tmp_path):
    env, _ = stand_in
    path, records = slurm
    done = run_script("slurm_table.sh", "8", "runs/t", "data", cwd=tmp_path, env={**env, **path, **request_env})
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and expected in err[0], done.stderr
    assert not (records / "sbatch.txt").exists() and not (tmp_path / "runs").exists()
    cpu = run_script("slurm_table.sh", "8", "runs/t", "data", cwd=tmp_path,
                     env={**env, **path, "PARTITION": "cpu", "GPUS_PER_RUN": "0", "TIME_LIMIT": "30-0"})
    assert cpu.returncode == 0, cpu.stderr
    assert "--gpus-per-task" not in (records / "sbatch.txt").read_text().splitlines()[0]


def test_slurm_task_checkpoints_and_requeues_before_its_time_limit_then_finishes_and_then_exits_at_once(
        stand_in, slurm, tmp_path):
    env, calls = stand_in
    path, records = slurm
    out = tmp_path / "runs"
    env = {**env, **path, "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "2", "SLURM_SUBMIT_DIR": ROOT,
           "SHRINK": env["SHRINK"] + " --epochs=60"}
    task = ["bash", os.path.join(ROOT, "sh", "slurm_table.sbatch"), "8", str(out), str(tmp_path / "data")]
    proc = subprocess.Popen(task, env=dict(os.environ, **env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    run_dir = out / "gradsum-eps8-seed0"  # task 2 of the plan: rows fgsm, gradsum, pgd2-a4 x seeds 0, 1
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 sends the batch shell
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, output
    assert (records / "scontrol.txt").read_text() == "requeue 4242_2\n"
    assert not (run_dir / "timing.json").exists() and "stopped by SIGTERM" in (run_dir / "log.txt").read_text()
    requeued = subprocess.run(task, env=dict(os.environ, **env), capture_output=True, text=True)
    assert requeued.returncode == 0 and (run_dir / "timing.json").exists(), requeued.stdout + requeued.stderr
    assert "resumed" in (run_dir / "log.txt").read_text()
    n_calls = len(train_calls(calls))
    again = subprocess.run(task, env=dict(os.environ, **env), capture_output=True, text=True)
    assert again.returncode == 0 and "finished already" in again.stdout and len(train_calls(calls)) == n_calls
    assert (records / "scontrol.txt").read_text() == "requeue 4242_2\n"  # no second requeue
    failing = dict(os.environ, **{**env, "SLURM_ARRAY_TASK_ID": "3", "FAIL_ONCE": "gradsum-eps8-seed1"})
    failed = subprocess.run(task, env=failing, capture_output=True, text=True)
    assert failed.returncode == 1 and "gradsum-eps8-seed1: failed, exit 1" in failed.stdout  # FAILED in sacct


def test_slurm_autoattack_task_evaluates_its_runs_models_once(stand_in, tmp_path):
    env, calls = stand_in
    out = tmp_path / "runs"
    env = dict(os.environ, **{**env, "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "0", "SLURM_SUBMIT_DIR": ROOT,
                              "AA": "1", "AA_POINTS": "4", "GPUS_PER_RUN": "0"})
    sbatch = ["bash", os.path.join(ROOT, "sh", "slurm_table.sbatch")]
    trained = subprocess.run(sbatch + ["8", str(out), str(tmp_path / "data")], env=env, capture_output=True, text=True)
    assert trained.returncode == 0 and "fgsm-eps8-seed0: finished" in trained.stdout, trained.stdout + trained.stderr
    for attempt in ("fgsm-eps8-seed0.autoattack: finished", "fgsm-eps8-seed0.autoattack: finished already"):
        done = subprocess.run(sbatch + ["--autoattack", "8", str(out), str(tmp_path / "data")], env=env,
                              capture_output=True, text=True)
        assert done.returncode == 0 and attempt in done.stdout, done.stdout + done.stderr
    evals = [c for c in calls.read_text().splitlines() if c.startswith("eval.py")]
    assert evals == [f"eval.py {out}/fgsm-eps8-seed0 --models last early_stopped --pgd 0 0 --autoattack --n_points 4 "
                     "--device=cpu"]  # once: the second task found it done


def test_gpu_check_runs_every_step_at_a_tiny_scale_on_the_cpu(tiny_data, tmp_path):
    """TINY=1: the script a GPU session runs, on the CPU in seconds, its data packed as it travels (a .tgz)."""
    import tarfile
    with tarfile.open(tmp_path / "data.tgz", "w:gz") as tar:
        tar.add(tiny_data, arcname="cifar10")
    out = tmp_path / "gpu"
    done = run_script("gpu_check.sh", str(tmp_path / "data.tgz"), str(out), cwd=tmp_path,
                      env={"TINY": "1", "OMP_NUM_THREADS": "1", "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "skipped" in (out / "tests.txt").read_text()  # the GPU-only tests, skipped without a GPU
    bench = (out / "bench.txt").read_text()
    assert "| FGSM+GradSum |" in bench and "--batched_restarts" in bench
    args = json.loads((out / "gradsum-eps8-seed0" / "args.json").read_text())
    assert (args["grad_input_sum_coeff"], args["half_prec"], args["channels_last"]) == (10, True, True)
    assert "--grad_input_sum_coeff=10" in args["_provenance"]["command"]  # the README's line, word for word
    assert set(json.loads((out / "gradsum-eps8-seed0" / "timing.json").read_text())) >= {"wall_s", "periodic_eval_s"}
    assert "no paper row" in (out / "table.md").read_text()  # TINY's CNN; the GPU's run gets GradSum's (test_report)
    assert "timing (s):" in done.stdout
    assert "weights changed by training:" in done.stdout and args["amp_dtype"] == "bfloat16"  # real steps on a CPU
    estimates = (out / "estimate.txt").read_text()
    assert estimates.count("table eps 8: 1 run(s), projected") == 2
