"""Damaged data files, full disks and unwritable folders: one line naming the file and what to do, no traceback,
nothing lost."""
import errno
import gzip
import os
import shlex

import pytest
import torch
from test_train import TINY_RUN

import data
import train
import utils


def run(tmp_path, data_dir, extra=""):
    argv = shlex.split(f"{TINY_RUN} --attack_init=zero --data_dir={data_dir} --out_dir={tmp_path / 'runs'} "
                       f"--run_name=run {extra}")
    return train.main(argv)


@pytest.mark.parametrize("damage", ["not_an_image", "empty", "truncated_png"])
def test_a_damaged_image_is_named_in_one_line_and_no_run_directory_is_made(damage, tmp_path, tiny_data, capsys):
    path = os.path.join(tiny_data, "train", "dog", "0003.png")
    if damage == "not_an_image":
        open(path, "w").write("this is text")
    elif damage == "empty":
        open(path, "w").close()
    else:
        content = open(path, "rb").read()
        open(path, "wb").write(content[: len(content) // 2])
    assert run(tmp_path, tiny_data) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and path in err[0] and "delete or replace it" in err[0]
    assert not (tmp_path / "runs").exists()


def write_idx(path, array, gz=True, cut=0):
    header = bytes([0, 0, 8, array.dim()]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    raw = header + array.numpy().tobytes()
    raw = raw[: len(raw) - cut]
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(raw)


@pytest.mark.parametrize("damage", ["gzip_ends_early", "not_idx", "shorter_than_header"])
def test_a_damaged_mnist_file_is_named_in_one_line(damage, tmp_path):
    root = tmp_path / "mnist"
    root.mkdir()
    images, labels = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8), torch.arange(4, dtype=torch.uint8)
    for split, n in (("train", 4), ("t10k", 4)):
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images[:n])
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels[:n])
    bad = root / "train-images-idx3-ubyte.gz"
    if damage == "gzip_ends_early":
        bad.write_bytes(bad.read_bytes()[:-30])
    elif damage == "not_idx":
        with gzip.open(bad, "wb") as f:
            f.write(b"<html>not found</html>")
    else:
        write_idx(bad, images, cut=100)
    with pytest.raises(data.DataError) as caught:
        data.load_data("mnist", str(root))
    message = str(caught.value)
    assert str(bad) in message and "\n" not in message and "delete it" in message


def test_a_full_disk_at_a_checkpoint_ends_the_run_with_one_line_and_the_last_checkpoint(tmp_path, tiny_data,
                                                                                         monkeypatch, capsys):
    original, calls = torch.save, []

    def full_disk(obj, f, *a, **kw):
        if "checkpoint" in str(getattr(f, "name", f)):
            calls.append(1)
            if len(calls) == 2:
                f.write(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *a, **kw)
    monkeypatch.setattr(torch, "save", full_disk)
    assert run(tmp_path, tiny_data, "--epochs=3") == 1
    run_dir = tmp_path / "runs" / "run"
    out = capsys.readouterr().out.strip().splitlines()
    (line,) = [x for x in out if "error:" in x]
    assert "No space left on device" in line and "checkpoint.pt" in line and "intact" in line
    assert f"python train.py --resume {run_dir}" in line
    assert torch.load(run_dir / "checkpoint.pt", weights_only=True)["epoch"] == 1  # the first epoch's survives
    assert not [f for f in os.listdir(run_dir) if ".tmp" in f]
    monkeypatch.setattr(torch, "save", original)
    assert train.main(["--resume", str(run_dir)]) == 0  # and the advertised command finishes the run


def test_a_failed_write_removes_its_temporary_file_and_keeps_the_old_file(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    utils.write_jsonl([{"a": 1}], path)

    def fail(f):
        f.write("half")
        raise OSError(errno.EIO, "Input/output error")
    with pytest.raises(utils.WriteError, match="Input/output error"):
        utils.atomic_write(path, fail, binary=False)
    assert utils.read_jsonl(path) == [{"a": 1}] and os.listdir(tmp_path) == ["metrics.jsonl"]


def test_an_out_dir_that_cannot_be_made_is_a_flag_error(tmp_path, tiny_data, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    argv = shlex.split(f"{TINY_RUN} --data_dir={tiny_data} --out_dir={blocker / 'runs'} --run_name=run")
    assert train.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--out_dir=" in err[0]


def test_report_and_eval_say_in_one_line_when_their_output_cannot_be_written(tmp_path, tiny_data, monkeypatch,
                                                                             capsys):
    import eval as evaluation
    import report
    assert run(tmp_path, tiny_data) == 0
    run_dir = str(tmp_path / "runs" / "run")
    capsys.readouterr()
    assert report.main([run_dir, "--out", str(tmp_path / "a_file_not_a_folder" / "x.md")]) == 1
    assert "report.py: error: could not write" in capsys.readouterr().err
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))
    assert evaluation.main([run_dir, "--pgd", "0", "0", "--n_points", "4", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    assert len(captured.err.strip().splitlines()) == 1 and "No space left" in captured.err
    assert "| last |" in captured.out and not [f for f in os.listdir(run_dir) if f.startswith("eval-")]


def test_a_damaged_svhn_file_or_archive_is_named_in_one_line(tmp_path):
    root = tmp_path / "svhn"
    root.mkdir()
    for split in ("train", "test"):
        (root / f"{split}_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, half of it")
    with pytest.raises(data.DataError, match="train_32x32.mat is damaged"):
        data.load_data("svhn", str(root))
    archive = tmp_path / "cifar-10-python.tar.gz"
    archive.write_bytes(gzip.compress(b"x" * 5000)[:100])
    with pytest.raises(data.DataError, match="damaged archive"):
        data.safe_extract(str(archive), str(tmp_path / "out"))
