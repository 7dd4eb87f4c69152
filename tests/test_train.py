"""Every training method end to end through the command line, on tiny generated data."""
import hashlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import torch

import config
import kernels
import methods
import runs
import train
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY_RUN = ("--model=cnn --n_filters_cnn=4 --lr_max=0.01 --eps=4 --epochs=2 --batch_size=16 --batch_size_eval=8 "
            "--eval_iter_freq=3 --n_eval_every_k_iter=16 --attack_iters=2 --n_restarts=2 --n_final_eval=12 "
            "--final_attack_iters=3 --final_n_restarts=2 --eval_early_stopped_model --device=cpu")

ZERO = "--attack=fgsm --attack_init=zero"
VARIANTS = {  # edge cases beside the presets
    "vfsat_rs_fixed": "--attack=fgsm --discrete_eps --attack_init=random --fix_vfsat_start --fix_vfsat_list",
    "mast_weight_clip": f"{ZERO} --mast --weight_clip",
    "gradsum_rs": "--attack=fgsm --attack_init=random --grad_input_sum_coeff=10",
    "gradsum_rs_fixed": "--attack=fgsm --attack_init=random --grad_input_sum_coeff=10 --fix_gradsum",
    "gradalign_rs": "--attack=fgsm --attack_init=random --grad_align_cos_lambda=0.2",
    "gradalign_gradsum_fixed": f"{ZERO} --grad_align_cos_lambda=0.2 --grad_input_sum_coeff=1 --fix_gradsum",
    "gradsum_autograd_bn": "--preset=gradsum --model=resnet18 --lr_max=0.05 --bn_double_backward=autograd",
    "gradalign_autograd_conv": "--preset=gradalign --conv_double_backward=autograd",
    "pgd2": "--attack=pgd --pgd_train_n_iters=2 --pgd_alpha_train=2 --attack_init=random",
    "pgd2_corner": "--attack=pgd_corner --pgd_train_n_iters=2 --pgd_alpha_train=2 --attack_init=zero",
    "pgd2_gradsum": "--attack=pgd --attack_init=zero --pgd_train_n_iters=2 --grad_input_sum_coeff=1",
    "pgd2_gradalign": "--attack=pgd --pgd_train_n_iters=2 --grad_align_cos_lambda=0.2",
    "free2": f"{ZERO} --minibatch_replay=2",
    "half_prec": f"{ZERO} --half_prec --grad_input_sum_coeff=1 --grad_align_cos_lambda=0.2 --fix_gradsum",
    "bfloat16": f"{ZERO} --half_prec --amp_dtype=bfloat16 --grad_input_sum_coeff=1",
    "resnet18_piecewise": f"--model=resnet18 --lr_schedule=piecewise --lr_max=0.05 {ZERO} --discrete_eps",
    "pgd2_compiled_channels_last": "--attack=pgd --pgd_train_n_iters=2 --compile --channels_last",
    "input_normalization": f"{ZERO} --input_normalization=dataset --print_g_i_s",
}
METHODS = {**{name: f"--preset={name}" for name in methods.PRESETS}, **VARIANTS}


def run_cli(flags, tmp_path, data_dir, name="run"):
    argv = shlex.split(f"{TINY_RUN} --data_dir={data_dir} --out_dir={tmp_path / 'runs'} --run_name={name} {flags}")
    return train.main(argv), str(tmp_path / "runs" / name)


DIGESTS = os.path.join(ROOT, "tests", "metrics_digests.json")


def check_digest(method, metrics_path):
    """metrics.jsonl bit for bit as recorded before (RECORD_DIGESTS=1 pytest tests/test_train.py records them): a
    restructuring must leave every method's numbers unchanged. The key names what else the bits depend on
    (kernels.key: torch's build, the pinned CPU kernels, the thread count); a machine without recorded digests for
    its key skips the comparison, saying so; under a recorded key a method without a digest fails."""
    digest = hashlib.sha256(open(metrics_path, "rb").read()).hexdigest()
    stored = json.load(open(DIGESTS)) if os.path.exists(DIGESTS) else {}
    key = kernels.key()
    if os.environ.get("RECORD_DIGESTS") == "1":
        stored.setdefault(key, {})[method] = digest
        with open(DIGESTS, "w") as f:
            json.dump(stored, f, indent=1, sort_keys=True)
        return
    if key not in stored:
        pytest.skip(f"no recorded digests for '{key}' (tests/metrics_digests.json holds {sorted(stored)}): the "
                    "digests compare on x86-64 CPUs with AVX2 under kernels.PINNED")
    assert method in stored[key], f"{method}: no digest recorded under '{key}'; record it with RECORD_DIGESTS=1"
    assert digest == stored[key][method], f"{method}: metrics.jsonl differs from the recorded run"


def test_a_changed_metrics_file_fails_its_recorded_digest(tmp_path, monkeypatch):
    import sys
    module = sys.modules[__name__]
    monkeypatch.setattr(module, "DIGESTS", str(tmp_path / "digests.json"))
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"kind": "final", "pgd_acc": 0.5}\n')
    monkeypatch.setenv("RECORD_DIGESTS", "1")
    check_digest("m", str(metrics))
    monkeypatch.delenv("RECORD_DIGESTS")
    check_digest("m", str(metrics))
    metrics.write_text('{"kind": "final", "pgd_acc": 0.50000001}\n')
    with pytest.raises(AssertionError, match="m: metrics.jsonl differs"):
        check_digest("m", str(metrics))
    with pytest.raises(AssertionError, match="n: no digest recorded under"):  # a method added without its digest
        check_digest("n", str(metrics))
    monkeypatch.setenv("MKL_CBWR", "AVX512")  # other kernels: another key, compared nowhere, skipped with its name
    with pytest.raises(pytest.skip.Exception, match="no recorded digests for .*MKL_CBWR AVX512"):
        check_digest("m", str(metrics))


def test_the_suite_runs_the_pinned_kernels_where_the_cpu_has_avx2():
    """conftest.py pins them before torch's first kernel: on an x86-64 CPU with AVX2 the digests' key is the
    pinned one (tests/metrics_digests.json's), and elsewhere it names what runs instead."""
    flags = open("/proc/cpuinfo").read().split() if os.path.exists("/proc/cpuinfo") else []
    state = kernels.state()
    as_pinned = all(os.environ[name] == value for name, value in kernels.PINNED.items())  # not overridden by the user
    assert state["pinned"] == ("avx2" in flags and as_pinned), state
    assert (f"ATen {state['aten']}, oneDNN {state['onednn_max_isa']}, MKL_CBWR {state['mkl_cbwr']}, 1 thread"
            in kernels.key())


def test_pinned_processes_compile_into_an_inductor_cache_of_their_own():
    """torch.compile's cache keys ignore ATEN_CPU_CAPABILITY: a pinned and an unpinned process sharing torch's
    default folder load each other's kernels (one aborted on an AVX-512 CPU). pin() names one per capability beside
    torch's default, the shell gets the same from `python kernels.py`, and a folder the user set is kept."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir
    for capability in ("avx2", "default"):
        environ = {"ATEN_CPU_CAPABILITY": capability} if capability != "avx2" else {}
        kernels.pin(environ)
        assert environ["TORCHINDUCTOR_CACHE_DIR"] == f"{default_cache_dir()}_aten_{capability}" != default_cache_dir()
    unset = {k: v for k, v in os.environ.items() if k not in (*kernels.PINNED, "TORCHINDUCTOR_CACHE_DIR")}
    shell = subprocess.run(["bash", "-c", f'eval "$({sys.executable} kernels.py)"; echo "$TORCHINDUCTOR_CACHE_DIR"'],
                           cwd=ROOT, env=unset, capture_output=True, text=True)
    assert shell.stdout.strip() == f"{default_cache_dir()}_aten_avx2", shell.stderr
    chosen = {"TORCHINDUCTOR_CACHE_DIR": "/somewhere/else"}
    kernels.pin(chosen)
    assert chosen["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"


@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_end_to_end(method, tmp_path, tiny_data):
    code, run_dir = run_cli(METHODS[method], tmp_path, tiny_data)
    assert code == 0
    check_digest(method, os.path.join(run_dir, "metrics.jsonl"))
    rows = utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    periodic = [r for r in rows if r["kind"] == "periodic"]
    iters_per_epoch = 3  # 50 images / batch 16, the last part-batch dropped (Free-AT replays within the epoch)
    assert [r["iteration"] for r in periodic] == [3, 6]
    assert all(0 <= r[k] <= 1 for r in periodic for k in ("test_clean_acc", "test_pgd_acc", "train_pgd_acc"))
    assert all(r["test_pgd_any_acc"] <= r["test_pgd_acc"] for r in periodic)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in periodic)
    args = runs.load_args(run_dir)
    for stat in methods.stat_keys():  # each logged statistic is non-zero exactly where a term of it is computed
        computed = any(r.computed(args) for r in methods.REGULARISERS if r.stat == stat)
        assert all((row[f"train_{stat}"] > 0) == computed for row in periodic)
    final = [r for r in rows if r["kind"] == "final"]
    assert [r["model"] for r in final] == ["last", "early_stopped", "best_test"]
    fp16 = "--half_prec" in METHODS[method] and "bfloat16" not in METHODS[method]
    assert all(set(r) == readme_metrics_keys(r["kind"], fp16, args.elle_adaptive) for r in rows)
    assert all(r["n_points"] == 12 for r in final)
    ckpt = torch.load(os.path.join(run_dir, "checkpoint.pt"), weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["iteration"] == 2 * iters_per_epoch
    assert {"model", "optimizer", "scaler", "kept", "metrics", "processes"} <= set(ckpt)
    saved = json.load(open(os.path.join(run_dir, "args.json")))
    assert saved["epochs"] == 2 and saved["_provenance"]["torch"] == torch.__version__
    assert saved["_provenance"]["cpu_threads"] == torch.get_num_threads() == 1  # conftest's
    timing = json.load(open(os.path.join(run_dir, "timing.json")))
    assert 0 <= timing["periodic_eval_s"] <= timing["train_s"] <= timing["wall_s"]  # evaluations inside training
    assert vars(runs.load_args(run_dir)).keys() == vars(config.build_parser().parse_args([])).keys()


def test_provenance_records_the_thread_count_that_cpu_results_depend_on():
    import subprocess
    import sys
    code = "import torch, utils; p = utils.provenance(torch.device('cpu'), []); print(p['cpu_threads'], p['cpu'])"
    for threads in ("1", "2"):
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": threads},
                             capture_output=True, text=True, check=True).stdout.split(" ", 1)
        assert out[0] == threads and out[1].strip()


def readme_metrics_keys(kind, fp16, elle_a=False):
    """The keys the table of metrics.jsonl (docs/outputs.md) documents for rows of this kind."""
    text = open(os.path.join(ROOT, "docs", "outputs.md")).read()
    table = text.split("The keys of a `metrics.jsonl` row")[1].split("\n\n")[1]
    keys = set()
    for line in table.splitlines()[2:]:
        names, rows = line.split(" | ")[:2]
        if (rows.split(",")[0].strip() in (kind, "both") and (fp16 or "fp16 only" not in rows)
                and (elle_a or "ELLE-A only" not in rows)):
            keys |= set(re.findall(r"`(\w+)`", names))
    return keys


@pytest.mark.parametrize("fix, expected", [("", [2, 4, 6]), ("--fix_vfsat_list", [2, 4, 5])])
def test_vfsat_logs_the_epoch_eps(fix, expected, tmp_path, tiny_data):
    """eps 5: the original's list ramps to 8 whatever eps is; --fix_vfsat_list ramps to eps."""
    code, run_dir = run_cli(f"{METHODS['vfsat']} --epochs=3 --eps=5 --eval_iter_freq=3 {fix}", tmp_path, tiny_data)
    assert code == 0
    rows = [r for r in utils.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if r["kind"] == "periodic"]
    assert [r["train_eps"] for r in rows] == expected  # one evaluation per epoch, at its end
    assert ("--fix_vfsat_list" in open(os.path.join(run_dir, "log.txt")).read()) == (not fix)


def test_a_cnn_at_the_resnets_default_learning_rate_is_noted_at_start():
    parse = lambda line: config.build_parser().parse_args(shlex.split(line))  # noqa: E731
    (note,) = [n for n in config.notes(parse("--model=cnn")) if "--lr_max" in n]
    assert "--lr_max=0.2" in note and "--lr_max=0.003" in note and "constant classifier" in note
    assert not [n for n in config.notes(parse("--model=cnn --lr_max=0.003")) if "--lr_max" in n]
    assert not [n for n in config.notes(parse("--model=resnet18")) if "--lr_max" in n]
    assert "--lr_max=0.003" in open(os.path.join(ROOT, "sh", "cpu_experiment.sh")).read()  # the note's claim


def test_a_preset_stands_for_its_flags_in_place():
    """Flags after --preset override it, flags before it are overridden; both spellings work."""
    parse = lambda line: config.build_parser().parse_args(shlex.split(line))  # noqa: E731
    gradsum = parse("--preset=gradsum")
    assert (gradsum.attack, gradsum.attack_init, gradsum.fgsm_alpha, gradsum.grad_input_sum_coeff) == \
        ("fgsm", "zero", 1.0, 10.0)
    assert parse("--preset gradsum --grad_input_sum_coeff=5").grad_input_sum_coeff == 5
    assert parse("--grad_input_sum_coeff=5 --preset=gradsum").grad_input_sum_coeff == 10
    assert vars(parse("--preset=pgd --preset=fgsm")) == {**vars(parse("--preset=fgsm")), "pgd_train_n_iters": 10,
                                                         "pgd_alpha_train": 2.0}


def test_standard_training_learns_the_tiny_task(tmp_path):
    """The tiny classes differ by mean colour: a working pipeline gets them nearly all right (with input
    normalisation: 15 epochs of 10 steps are too few for the raw [0, 1] input of the original network)."""
    from conftest import make_image_folder
    data_dir = make_image_folder(str(tmp_path / "data"), n_train_per_class=16)
    flags = "--attack=none --epochs=15 --lr_max=0.05 --eval_iter_freq=1000 --input_normalization=dataset"
    code, run_dir = run_cli(flags, tmp_path, data_dir)
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
    parsed = [config.build_parser().parse_args(shlex.split(line)[2:]) for line in lines]
    for args in parsed:
        config.check_args(args)
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
    ("--batch_size=0", "--batch_size=0"),
    ("--n_train=5", "--n_train=5"),
    ("--run_name=a:b", "--run_name='a:b'"),
    ("--epochs=ten", "--epochs"),
    ("--no_such_flag=1", "--no_such_flag"),
    ("--compile --grad_align_cos_lambda=0.2", "--compile"),
    ("--attack_init=zero --grad_align_cos_lambda=0.2 --grad_input_sum_coeff=1", "--fix_gradsum"),
    ("--attack_init=zero --grad_align_cos_lambda=0.2 --print_g_i_s", "--print_g_i_s=True"),
    ("--n_eval_every_k_iter=8", "--n_eval_every_k_iter=8"),
    ("--batch_size=5000 --n_eval_every_k_iter=256", "--batch_size=5000"),  # the flag given, not its neighbour
    ("--batch_size=64 --n_eval_every_k_iter=64", "--batch_size=64: "),  # 48 training images: not one batch
    ("--eps=0.031", "--eps=8"),  # the [0, 1] convention, refused, naming what it would be
    ("--eps=0.5 --eps_below_one_pixel --epochs=0", "--epochs=0"),  # accepted when asked: the next check speaks
    ("--amp_dtype=float8", "--amp_dtype='float8'"),
    ("--load_model=/nonexistent", "--load_model='/nonexistent'"),
    ("--resume=/nonexistent", "--resume='/nonexistent'"),
    ("--preset=gradsun", "--preset='gradsun'"),
    ("--preset", "--preset=''"),
    ("--bn_double_backward=cudnn", "--bn_double_backward='cudnn'"),
    ("--conv_double_backward=cudnn", "--conv_double_backward='cudnn'"),
    ("--cuda_graph --minibatch_replay=2", "--cuda_graph=True"),
    ("--cuda_graph --device=cpu", "--cuda_graph"),
    ("--grad_input_sum_coeff=1 --grad_input_sum_fd_coeff=1", "--grad_input_sum_fd_coeff=1.0"),  # one GradSum
    ("--elle_adaptive", "--elle_adaptive=True"),  # ELLE-A without its maximum lambda
    ("--attack=n_fgsm --mast", "--mast=True"),
    ("--n_fgsm_noise=-1", "--n_fgsm_noise=-1.0"),
    ("--grad_input_sum_fd_step=0", "--grad_input_sum_fd_step=0.0"),
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
    args = config.build_parser().parse_args(shlex.split("--discrete_eps --grad_input_sum_coeff=0.5"))
    name = config.method_name(args)
    assert name == "fgsm-rs-vfsat-gradsum0.5" and re.match(config.RUN_NAME_PATTERN, name)


@pytest.mark.parametrize("present", ["train", "test"])
def test_half_an_image_folder_is_named_as_such(present, tmp_path, tiny_data, capsys):
    import shutil
    shutil.rmtree(os.path.join(tiny_data, {"train": "test", "test": "train"}[present]))
    code, _ = run_cli("", tmp_path, tiny_data)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and f"has {present}/ but no" in err[0]
    assert not os.path.exists(tmp_path / "runs")


def test_missing_data_exits_2_with_one_line_and_no_files(tmp_path, monkeypatch, capsys):
    import torchvision.datasets.utils as tv_utils

    monkeypatch.setattr(tv_utils, "download_url", lambda *a, **kw: (_ for _ in ()).throw(OSError("offline")))
    missing = tmp_path / "no_data_here"
    assert train.main(shlex.split(f"{TINY_RUN} --data_dir={missing} --out_dir={tmp_path / 'runs'}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(missing) in err[0] and "cifar-10-batches-py" in err[0]
    assert not missing.exists() and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("tool", ["train", "eval", "surface", "report", "bench"])
def test_help_gives_every_flag_a_text_and_its_default(tool):
    import importlib
    parser = config.build_parser() if tool == "train" else importlib.import_module(tool).build_parser()
    assert parser.formatter_class is config.HelpFormatter
    formatter = config.HelpFormatter(tool)
    for action in parser._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{tool} {action.option_strings[0]} has no help"
            assert "%(default)s" in formatter._get_help_string(action), f"{tool} {action.option_strings[0]}"
    assert "(default: 8.0)" in " ".join(parser.format_help().split()) or tool != "train"


INERT_CASES = {  # (a run, flags that do nothing for it): config.INERT, every flag of every rule
    "pgd: FGSM's and N-FGSM's": ("--attack=pgd --pgd_train_n_iters=2",
                                 "--fgsm_alpha=0.5 --n_fgsm_noise=3 --n_fgsm_clip=1"),
    "fgsm: PGD's": ("--attack=fgsm", "--pgd_train_n_iters=3 --pgd_alpha_train=1"),
    "n_fgsm: its start": ("--attack=n_fgsm", "--attack_init=zero"),
    "none: a start and a step": ("--attack=none", "--attack_init=zero --fgsm_alpha=0.5"),
    "fp32: precision's own, one process": (ZERO, "--amp_dtype=bfloat16 --periodic_eval_fp32 --sync_bn"),
    "resnet18: the CNN's": ("--attack=fgsm --model=resnet18 --epochs=1", "--n_layers=2 --n_filters_cnn=4"),
}


@pytest.mark.parametrize("case", list(INERT_CASES))
def test_a_flag_that_does_nothing_for_a_run_changes_no_number_gets_a_note_and_splits_no_group(case, tmp_path,
                                                                                              tiny_data):
    """Each of config.INERT's flags, off its default where its rule applies: the same metrics bit for bit, one
    note each in the log, and the same computational flags (report.py groups the two runs and matches them alike)."""
    import report
    base, inert = INERT_CASES[case]
    assert run_cli(base, tmp_path, tiny_data, "base")[0] == 0
    assert run_cli(f"{base} {inert}", tmp_path, tiny_data, "inert")[0] == 0
    metrics = [open(tmp_path / "runs" / name / "metrics.jsonl", "rb").read() for name in ("base", "inert")]
    assert metrics[0] == metrics[1]
    log = open(tmp_path / "runs" / "inert" / "log.txt").read()
    for flag in inert.split():
        assert f"note: {flag} does nothing for this run (" in log, flag
    flags = [report.computational_flags(runs.load_args(str(tmp_path / "runs" / name))) for name in ("base", "inert")]
    assert flags[0] == flags[1]


def test_every_inert_flag_is_tried():
    tried = {tok.split("=")[0].removeprefix("--") for _, inert in INERT_CASES.values() for tok in inert.split()}
    assert tried == {flag for rule in config.INERT for flag in rule.flags}
