"""report.py on hand-made run directories: grouping, mean ± std, counts, plots."""
import json
import os

import report


def make_run(root, name, method_flags, seed, finals, wall_s=100.0, periodic=3, pgd=None, fgsm=None, extras=None):
    run = root / name
    run.mkdir()
    args = {"dataset": "cifar10", "model": "cnn", "eps": 8, "attack": "fgsm", "attack_init": "zero",
            "pgd_train_n_iters": 10, "minibatch_replay": 1, "discrete_eps": False, "grad_input_sum_coeff": 0.0,
            "grad_align_cos_lambda": 0.0, "attack_iters": 50, "n_restarts": 10, "seed": seed, **method_flags,
            **(extras or {})}
    (run / "args.json").write_text(json.dumps(args))
    pgd = pgd or [0.3 - 0.1 * i for i in range(periodic)]
    fgsm = fgsm or [0.4] * len(pgd)
    rows = [{"kind": "periodic", "iteration": 10 * (i + 1), "epoch": i + 1, "lr": 0.1, "train_eps": 8,
             "test_clean_acc": 0.5, "test_fgsm_acc": f, "test_pgd_acc": p, "train_pgd_acc": 0.3}
            for i, (p, f) in enumerate(zip(pgd, fgsm, strict=True))]
    rows += [{"kind": "final", "model": m, "clean_acc": c, "fgsm_acc": f, "pgd_acc": p, "n_points": 10000}
             for m, (c, f, p) in finals.items()]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "timing.json").write_text(json.dumps({"wall_s": wall_s, "train_s": wall_s - 1}))
    return str(run)


def cells(text, method):
    (line,) = [line for line in text.splitlines() if f"| {method} |" in line]
    return [c.strip() for c in line.strip("|").split("|")]


def test_table_groups_seeds_with_mean_and_sample_std(tmp_path, capsys):
    runs = [make_run(tmp_path, f"fgsm{s}", {}, s, {"last": (0.80, 0.60, p), "early_stopped": (0.7, 0.5, 0.4)},
                     wall_s=w) for s, p, w in ((0, 0.40, 100), (1, 0.44, 200), (2, 0.48, 300))]
    runs.append(make_run(tmp_path, "vfsat0", {"discrete_eps": True}, 0, {"last": (0.75, 0.5, 0.45)}))
    runs.append(str(tmp_path / "unfinished"))
    os.makedirs(runs[-1])
    (tmp_path / "unfinished" / "args.json").write_text(json.dumps({}))
    (tmp_path / "unfinished" / "metrics.jsonl").write_text("")
    text = report.table(runs)  # the unfinished run is left out, and named
    fgsm = cells(text, "fgsm")
    # dataset, model, method, eps, flags, seeds, clean, FGSM, PGD, ES clean, ES PGD, AutoAttack, ES AutoAttack,
    # CO at epoch, wall
    assert fgsm[3:6] == ["8", "-", "3"] and "| PGD-50-10 (step 2/255, 10,000 pts) |" in text
    assert fgsm[6] == "80.00 ± 0.00" and fgsm[8] == "44.00 ± 4.00"  # std of 40, 44, 48 (n - 1) is 4
    assert fgsm[9] == "70.00 ± 0.00" and fgsm[11:13] == ["-", "-"] and fgsm[14] == "200"  # AutoAttack not run
    vfsat = cells(text, "fgsm-vfsat")
    assert vfsat[5] == "1" and vfsat[8] == "45.00" and vfsat[9] == "-"
    assert f"left out 1 unfinished run(s) (no final evaluation yet): {runs[-1]}" in capsys.readouterr().err


def test_plots_are_written_per_run_and_per_group(tmp_path):
    runs = [make_run(tmp_path, f"r{s}", {}, s, {"last": (0.8, 0.6, 0.4)}) for s in range(2)]
    assert report.main(runs + ["--plots", str(tmp_path / "plots"), "--out", str(tmp_path / "t.md")]) == 0
    pngs = [os.path.join(r, "curves.png") for r in runs] + [str(tmp_path / "plots" / "cifar10-cnn-fgsm-eps8.png")]
    for png in pngs:
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n" and os.path.getsize(png) > 10_000
    assert "| fgsm |" in (tmp_path / "t.md").read_text()


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_a_folder_of_runs_is_searched_for_run_directories(tmp_path, capsys):
    (tmp_path / "table").mkdir()
    make_run(tmp_path / "table", "a", {}, 0, {"last": (0.8, 0.6, 0.40)})
    make_run(tmp_path / "table", "b", {}, 1, {"last": (0.8, 0.6, 0.44)})
    assert report.main([str(tmp_path)]) == 0
    assert cells(capsys.readouterr().out, "fgsm")[5] == "2"


def test_catastrophic_overfitting_column_counts_seeds_and_names_the_epoch(tmp_path):
    """PGD 20, 25, 20, 5 with FGSM 30, 30, 40, 90: at epoch 4 PGD < 25/3 and FGSM - PGD = 85 points."""
    collapse = dict(pgd=[0.20, 0.25, 0.20, 0.05], fgsm=[0.30, 0.30, 0.40, 0.90])
    runs = [make_run(tmp_path, "a", {}, 0, {"last": (0.5, 1.0, 0.0)}, **collapse),
            make_run(tmp_path, "b", {}, 1, {"last": (0.5, 0.3, 0.2)}, pgd=[0.2, 0.21, 0.22, 0.2]),
            make_run(tmp_path, "c", {"discrete_eps": True}, 0, {"last": (0.5, 0.3, 0.2)}, pgd=[0.2, 0.21])]
    text = report.table(runs)
    assert cells(text, "fgsm")[13] == "4, - (1/2)" and cells(text, "fgsm-vfsat")[13] == "-"
    assert report.main([*runs, "--plots", str(tmp_path / "plots")]) == 0


def write_eval(run, name, models, mtime):
    path = os.path.join(run, name)
    with open(path, "w") as f:
        json.dump({"run": run, "eps": 8, "n_points": 10, "seed": 0, "models": models}, f)
    os.utime(path, (mtime, mtime))


def test_fgsm_sweep_comes_from_the_newest_evaluation_that_has_one_in_step_order(tmp_path):
    run = make_run(tmp_path, "r", {}, 0, {"last": (0.8, 0.6, 0.4)})
    sweep = {f"fgsm_step{s:g}_acc": 1 - s / 20 for s in (10, 2, 9, 1)}
    write_eval(run, "eval-20260101-000000.json", {"last": {"clean_acc": 0.9, "fgsm_step1_acc": 0.1}}, 1000)
    write_eval(run, "eval-20260101-000000-2.json", {"last": {"clean_acc": 0.9, **sweep},
                                                     "early_stopped": {"clean_acc": 0.9, **sweep}}, 2000)
    write_eval(run, "eval-20260101-000001.json", {"last": {"clean_acc": 0.8, "pgd50_10_acc": 0.3}}, 3000)
    sweeps, eps = report.fgsm_sweep(run)
    assert eps == 8 and set(sweeps) == {"last", "early_stopped"}
    assert sweeps["last"] == [(1.0, 0.95), (2.0, 0.9), (9.0, 0.55), (10.0, 0.5)]
    assert report.fgsm_sweep(make_run(tmp_path, "none", {}, 0, {"last": (0.8, 0.6, 0.4)})) is None
    assert report.main([run, "--plots", str(tmp_path / "plots")]) == 0
    for png in (os.path.join(run, "fgsm_sweep.png"), tmp_path / "plots" / "fgsm_sweep.png"):
        with open(png, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_first_layer_filters_are_the_first_convolution_not_a_normalisation_buffer():
    import models

    model = models.build_model("resnet18", 10, 3, 32, mean_std=([0.5] * 3, [0.25] * 3))
    state = model.state_dict()
    assert report.first_layer_filters(state) is state["conv1.weight"]
    cnn = models.build_model("cnn", 2, 1, 8, n_filters=5)
    assert report.first_layer_filters(cnn.state_dict()).shape == (5, 1, 3, 3)


def test_filters_and_sweeps_of_a_trained_run_through_the_command_lines(tmp_path, tiny_data, capsys):
    import shlex

    from test_train import TINY_RUN

    import eval as evaluation
    import train

    assert train.main(shlex.split(f"{TINY_RUN} --data_dir={tiny_data} --out_dir={tmp_path} --run_name=r")) == 0
    run = str(tmp_path / "r")
    assert evaluation.main([run, "--pgd", "0", "0", "--fgsm_sweep", "2", "4", "6", "--n_points", "8"]) == 0
    capsys.readouterr()
    assert report.main([run, "--plots", str(tmp_path / "plots"), "--filters"]) == 0
    assert f"plot: {run}/filters.png" in capsys.readouterr().out
    for name in ("filters.png", "fgsm_sweep.png", "curves.png"):
        assert os.path.getsize(os.path.join(run, name)) > 5_000
    os.remove(os.path.join(run, "checkpoint.pt"))
    assert report.main([run, "--filters"]) == 2
    assert "checkpoint.pt" in capsys.readouterr().err


def test_runs_that_differ_in_a_flag_are_rows_of_their_own_naming_it(tmp_path):
    last = {"last": (0.8, 0.6, 0.4)}
    runs = [make_run(tmp_path, "a0", {"lr_max": 0.04, "epochs": 96}, 0, last),
            make_run(tmp_path, "a1", {"lr_max": 0.04, "epochs": 96}, 1, last),
            make_run(tmp_path, "b0", {"lr_max": 0.2, "epochs": 6}, 0, last),
            make_run(tmp_path, "c0", {"lr_max": 0.2, "epochs": 96, "device": "cuda:3", "out_dir": "x"}, 0, last)]
    rows = [line for line in report.table(runs).splitlines() if "| fgsm |" in line]
    assert len(rows) == 3
    assert {r.split(" | ")[4]: r.split(" | ")[5] for r in rows} == {
        "epochs=96, lr_max=0.04": "2", "epochs=6, lr_max=0.2": "1", "epochs=96, lr_max=0.2": "1"}


def test_the_same_seed_twice_is_refused_with_one_line_unless_allowed(tmp_path, capsys):
    runs = [make_run(tmp_path, name, {}, 0, {"last": (0.8, 0.6, 0.4)}) for name in ("a", "copy-of-a")]
    assert report.main(runs) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and runs[0] in err[0] and runs[1] in err[0] and "--allow_duplicate_seeds" in err[0]
    assert report.main(runs + ["--allow_duplicate_seeds"]) == 0
    assert cells(capsys.readouterr().out, "fgsm")[5] == "2"


def test_runs_on_data_of_other_fingerprints_are_never_pooled(tmp_path):
    data = lambda n, fp: {"_data": {"fingerprint": f"{n} train + 24 test images, sha1 {fp}"}}  # noqa: E731
    runs = [make_run(tmp_path, f"r{i}", {}, i, {"last": (0.8, 0.6, 0.4)}, extras=data(n, fp))
            for i, (n, fp) in enumerate(((48, "aaaa"), (48, "aaaa"), (48, "bbbb"), (1000, "bbbb")))]
    rows = [line.split(" | ") for line in report.table(runs).splitlines() if "| fgsm |" in line]
    # a smaller copy of the same data has the same first images, hence hash: the sizes tell it apart
    assert sorted((r[4], r[5]) for r in rows) == [
        ("data=1000+24 images, sha1 bbbb", "1"), ("data=48+24 images, sha1 aaaa", "2"),
        ("data=48+24 images, sha1 bbbb", "1")]


def test_cnn_only_flags_neither_split_nor_label_resnet_rows(tmp_path):
    last = {"last": (0.8, 0.6, 0.4)}
    runs = [make_run(tmp_path, "r0", {"model": "resnet18", "n_filters_cnn": 16}, 0, last),
            make_run(tmp_path, "r1", {"model": "resnet18", "n_filters_cnn": 6}, 1, last),
            make_run(tmp_path, "c0", {"n_filters_cnn": 16}, 0, last),
            make_run(tmp_path, "c1", {"n_filters_cnn": 6}, 0, last)]
    rows = {tuple(c.strip() for c in line.split(" | ")[1:6]) for line in report.table(runs).splitlines()
            if "| fgsm |" in line}
    assert rows == {("resnet18", "fgsm", "8", "-", "2"), ("cnn", "fgsm", "8", "n_filters_cnn=16", "1"),
                    ("cnn", "fgsm", "8", "n_filters_cnn=6", "1")}


def test_long_plot_titles_wrap_inside_the_figure(tmp_path, monkeypatch):
    import utils
    saved = []
    monkeypatch.setattr(utils, "save_figure", lambda fig, path: saved.append(fig))
    run = make_run(tmp_path, "r0", {}, 0, {"last": (0.8, 0.6, 0.4)})
    title = ", ".join(f"flag_number_{i}=value_{i}" for i in range(12))  # about 280 characters
    assert report.plot_curves([run], str(tmp_path / "c.png"), title)
    fig = saved[0]
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    box, figure = fig.axes[0].title.get_window_extent(renderer), fig.bbox
    assert figure.x0 <= box.x0 and box.x1 <= figure.x1 and box.y1 <= figure.y1


def test_a_group_without_periodic_evaluations_gets_a_message_not_a_silent_gap(tmp_path, capsys):
    run = make_run(tmp_path, "r0", {}, 0, {"last": (0.8, 0.6, 0.4)}, periodic=0, pgd=[], fgsm=[])
    assert report.main([run, "--plots", str(tmp_path / "plots")]) == 0
    err = capsys.readouterr().err
    assert f"no curves for cifar10-cnn-fgsm-eps8: {run} logged no periodic evaluation" in err
    assert "--eval_iter_freq" in err and not os.listdir(tmp_path / "plots")


def test_results_of_other_protocols_never_share_a_column(tmp_path):
    runs = [make_run(tmp_path, "r10", {}, 0, {"last": (0.8, 0.6, 0.4)}),
            make_run(tmp_path, "r3", {"final_n_restarts": 3}, 0, {"last": (0.8, 0.6, 0.5)})]
    text = report.table(runs)
    headers = [line for line in text.splitlines() if line.startswith("| dataset")]
    assert len(headers) == 2 and "PGD-50-10 (step 2/255" in headers[0] + headers[1]
    assert "PGD-50-3 (step 2/255" in headers[0] + headers[1]


def table_run_args(eps, row):
    """The computational flags of sh/cifar10_table.tsv's run of this row, as its args.json holds them."""
    import config

    rows = report.table_rows()
    common = next(r[2] for r in rows if r[1] == "common")
    flags = next(r[2] for r in rows if r[1] == row and r[0] in ("*", str(eps)))
    return vars(config.build_parser().parse_args(f"{common} --eps={eps} {flags}".split()))


OFFICIAL = {"_data": {"source": "official CIFAR-10", "fingerprint": "50000 train + 10000 test images, sha1 x"}}


def test_compare_paper_sets_the_originals_numbers_beside_a_matching_row(tmp_path, capsys):
    gradsum = {**table_run_args(8, "gradsum"), **OFFICIAL}
    runs = [make_run(tmp_path, f"g{s}", {}, s, {"last": (0.7398 + d, 0.49, 0.4419 + d)}, extras={**gradsum, "seed": s})
            for s, d in ((0, 0.01), (1998, -0.01))]
    runs.append(make_run(tmp_path, "other", {"lr_max": 0.1}, 0, {"last": (0.8, 0.6, 0.4)},
                         extras={**gradsum, "lr_max": 0.1}))
    assert report.main(runs + ["--compare", "paper"]) == 0
    out = capsys.readouterr().out
    (ours,) = [line for line in out.splitlines() if "| GradSum (3 runs) |" in line]
    assert "| 73.98 ± 0.22 | 44.19 ± 0.21 | +0.00 | +0.00 |" in ours and "| 73.98 ± 1.41 |" in ours
    (other,) = [line for line in out.splitlines() if "lr_max=0.1" in line]
    assert "| no paper row |" in other


def test_the_papers_numbers_stand_beside_official_cifar10_only_and_speed_flags_keep_the_match(tmp_path, capsys):
    """A run on an image folder (or one saved before sources) names its paper row and the data, with no number
    beside it; a run with the GPU check's speed flags keeps its paper row, which names them."""
    gradsum = table_run_args(8, "gradsum")
    folder = {**gradsum, "_data": {"source": "image folder", "fingerprint": "50000 train + 10000 test images, sha1 y"}}
    fast = {**gradsum, **OFFICIAL, "half_prec": True, "channels_last": True, "cuda_graph": True}
    runs = [make_run(tmp_path, "folder", {}, 0, {"last": (0.75, 0.5, 0.45)}, extras=folder),
            make_run(tmp_path, "old", {}, 0, {"last": (0.75, 0.5, 0.45)}, extras={**gradsum, "lr_max": 0.04}),
            make_run(tmp_path, "fast", {}, 0, {"last": (0.7498, 0.5, 0.4519)}, extras=fast)]
    assert report.main(runs + ["--compare", "paper"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "GradSum (3 runs" in line]
    assert len(lines) == 3
    (on_folder,) = [line for line in lines if "image folder" in line]
    assert "| GradSum (3 runs), other data (image folder) | - | - | - | - |" in on_folder
    (unrecorded,) = [line for line in lines if "unrecorded)" in line]
    assert "| - | - | - | - |" in unrecorded
    (speedy,) = [line for line in lines if "--cuda_graph" in line]
    assert ("| GradSum (3 runs; --channels_last --cuda_graph --half_prec) | 73.98 ± 0.22 | 44.19 ± 0.21 | +1.00 "
            "| +1.00 |") in speedy


def test_the_gpu_checks_run_gets_the_papers_gradsum_row():
    """sh/gpu_check.sh's run, the README's GradSum line with the script's GPU speed flags, matches the paper's
    GradSum eps-8 row on its method (its shared image-folder data then say 'other data')."""
    import re
    import shlex

    import config

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    readme = open(os.path.join(root, "README.md")).read()
    (line,) = [x for x in readme.splitlines() if x.startswith("python train.py") and "--grad_input_sum_coeff=10 " in x]
    speed = re.search(r"device=cuda speed=\(([^)]*)\)", open(os.path.join(root, "sh", "gpu_check.sh")).read())[1]
    args = config.build_parser().parse_args(shlex.split(line.removeprefix("python train.py ") + " " + speed))
    flags = report.computational_flags(args)
    assert report.method_flags(flags) == report.method_flags(report.table_commands()[(8.0, "GradSum")])
    assert flags != report.table_commands()[(8.0, "GradSum")]  # the premise: the speed flags differ


def write_autoattack(run, stamp, label, accs):
    """An eval.py --autoattack result file, as eval.py writes it (the fields report.py reads)."""
    result = {"autoattack_protocol": {"label": label}, "models": {m: {"clean_acc": 0.8, "autoattack_acc": a}
                                                                   for m, a in accs.items()}}
    with open(os.path.join(run, f"eval-{stamp}.json"), "w") as f:
        json.dump(result, f)


def test_autoattack_columns_read_each_runs_newest_result_named_by_its_protocol(tmp_path):
    standard = "AutoAttack standard (pyautoattack 0.2.0), seed 0, 10,000 pts"
    runs = [make_run(tmp_path, f"r{s}", {}, s, {"last": (0.8, 0.6, 0.4), "early_stopped": (0.7, 0.5, 0.45)})
            for s in range(3)]
    write_autoattack(runs[0], "20260101-000000", standard, {"last": 0.30, "early_stopped": 0.50})
    write_autoattack(runs[0], "20260102-000000", standard, {"last": 0.36})  # newer: its last, the older's ES
    write_autoattack(runs[1], "20260101-000000", standard, {"last": 0.40, "early_stopped": 0.60})
    other = make_run(tmp_path, "vfsat", {"discrete_eps": True}, 0, {"last": (0.75, 0.5, 0.45)})
    text = report.table(runs + [other])
    header = next(line for line in text.splitlines() if line.startswith("| dataset"))
    assert f"| ES PGD-50-10 (step 2/255, 10,000 pts) | {standard} | ES {standard} | CO at epoch |" in header
    # the mean of 36 and 40 (sample std 2.83), two of the three seeds; ES: 50 and 60
    assert cells(text, "fgsm")[11:13] == ["38.00 ± 2.83 (2 of 3)", "55.00 ± 7.07 (2 of 3)"]
    assert cells(text, "fgsm-vfsat")[11:13] == ["-", "-"]
