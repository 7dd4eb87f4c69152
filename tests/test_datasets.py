"""Miniature copies of every supported on-disk layout, loaded through the real code."""
import gzip
import hashlib
import io
import os
import pickle
import shlex
import struct
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
import utils


def constant_image(value, size, path, fmt="PNG"):
    """A one-colour image: its pixels say which file it came from, whatever the format's compression."""
    Image.new("RGB", (size, size), (value, value, value)).save(path, format=fmt)


def make_tiny_imagenet(root, wnids=("n03", "n01", "n02"), n_train=4, n_val=6, size=64):
    base = os.path.join(root, "tiny-imagenet-200")
    os.makedirs(os.path.join(base, "val", "images"))
    with open(os.path.join(base, "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    for k, wnid in enumerate(wnids):
        os.makedirs(os.path.join(base, "train", wnid, "images"))
        for i in range(n_train):
            constant_image(20 * k + i, size, os.path.join(base, "train", wnid, "images", f"{wnid}_{i}.JPEG"))
    rows = []
    for i in range(n_val):
        wnid = wnids[(i * 2) % len(wnids)]
        constant_image(200 + i, size, os.path.join(base, "val", "images", f"val_{i}.JPEG"))
        rows.append(f"val_{i}.JPEG\t{wnid}\t0\t0\t{size - 1}\t{size - 1}")
    with open(os.path.join(base, "val", "val_annotations.txt"), "w") as f:
        f.write("\n".join(rows) + "\n")
    return root


def test_tiny_imagenet_is_in_the_originals_image_folder_order(tmp_path):
    """As torchvision's ImageFolder (the original's loader): classes sorted by wnid, images by class and name,
    so the first evaluation points are those of the first classes."""
    ds = data.load_data("tiny_imagenet", make_tiny_imagenet(str(tmp_path)))
    assert ds.classes == ("n01", "n02", "n03") and ds.image_size == 64 and ds.in_channels == 3
    assert ds.train_x.shape == (12, 3, 64, 64) and ds.test_x.shape == (6, 3, 64, 64)
    assert ds.train_y.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert [int(x[0, 0, 0]) for x in ds.train_x] == [20, 21, 22, 23, 40, 41, 42, 43, 0, 1, 2, 3]
    assert ds.test_y.tolist() == [0, 0, 1, 1, 2, 2]  # val_i belongs to wnids[2i mod 3]
    assert [int(x[0, 0, 0]) for x in ds.test_x] == [202, 205, 201, 204, 200, 203]
    assert ds.flip and ds.crop_padding == 4


def write_cifar(root, folder, files, label_key, n_per_file=6, n_classes=10):
    os.makedirs(os.path.join(root, folder))
    for name, offset in files:
        labels = [(offset + i) % n_classes for i in range(n_per_file)]
        pixels = np.stack([np.full(3072, offset + i, dtype=np.uint8) for i in range(n_per_file)])
        with open(os.path.join(root, folder, name), "wb") as f:
            pickle.dump({"data": pixels, label_key: labels}, f, protocol=2)


def test_cifar10_python_pickles_and_the_binary_subset(tmp_path):
    write_cifar(str(tmp_path), "cifar-10-batches-py",
                [(f"data_batch_{i}", 10 * i) for i in range(1, 6)] + [("test_batch", 100)], "labels")
    ds = data.load_data("cifar10", str(tmp_path))
    assert ds.train_x.shape == (30, 3, 32, 32) and ds.test_x.shape == (6, 3, 32, 32)
    assert ds.train_y.tolist() == [(10 * b + i) % 10 for b in range(1, 6) for i in range(6)]
    assert [int(x[2, 31, 31]) for x in ds.train_x[:6]] == list(range(10, 16))
    binary = data.load_data("cifar10_binary", str(tmp_path))
    assert binary.classes == ("deer", "ship")
    deer, ship = ds.train_y == 4, ds.train_y == 8
    assert binary.train_y.tolist() == [int(y == 8) for y in ds.train_y.tolist() if y in (4, 8)]
    assert torch.equal(binary.train_x, ds.train_x[deer | ship])


def test_only_cifar10_files_passing_torchvisions_check_are_official(tmp_path, monkeypatch):
    """torchvision's own list of CIFAR-10's files and md5s decides: our tiny files fail it; with the list made of
    their md5s (hashlib's, computed here) they pass; one byte changed fails again; an image folder is one."""
    from torchvision.datasets import CIFAR10

    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    write_cifar(str(tmp_path), "cifar-10-batches-py", [(n, 10 * k) for k, n in enumerate(names)], "labels")
    assert data.source("cifar10", str(tmp_path)) == "CIFAR-10 files failing torchvision's integrity check"
    md5 = {n: hashlib.md5((tmp_path / "cifar-10-batches-py" / n).read_bytes()).hexdigest() for n in names}
    monkeypatch.setattr(CIFAR10, "train_list", [[n, md5[n]] for n in names[:5]])
    monkeypatch.setattr(CIFAR10, "test_list", [["test_batch", md5["test_batch"]]])
    assert data.source("cifar10", str(tmp_path)) == data.OFFICIAL_CIFAR10 == "official CIFAR-10"
    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "r+b") as f:
        f.seek(-1, os.SEEK_END)
        f.write(b"\x00")
    assert data.source("cifar10", str(tmp_path)) != data.OFFICIAL_CIFAR10
    from conftest import make_image_folder
    assert data.source("cifar10", make_image_folder(str(tmp_path / "folder"))) == "image folder"


def test_cifar100_fine_labels_and_names(tmp_path):
    write_cifar(str(tmp_path), "cifar-100-python", [("train", 0), ("test", 50)], "fine_labels", n_classes=100)
    names = [f"class{i}" for i in range(100)]
    with open(tmp_path / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({"fine_label_names": names}, f, protocol=2)
    ds = data.load_data("cifar100", str(tmp_path))
    assert ds.n_classes == 100 and ds.test_y.tolist() == list(range(50, 56))


def test_dataset_pickles_cannot_run_code(tmp_path):
    write_cifar(str(tmp_path), "cifar-100-python", [("train", 0), ("test", 50)], "fine_labels")

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))
    with open(tmp_path / "cifar-100-python" / "meta", "wb") as f:
        pickle.dump({"fine_label_names": Evil()}, f)
    with pytest.raises(data.DataError, match="damaged"):
        data.load_data("cifar100", str(tmp_path))
    assert not (tmp_path / "pwned").exists()


def test_svhn_mat_files_map_label_10_to_digit_0(tmp_path):
    from scipy.io import savemat
    for split, n in (("train", 5), ("test", 3)):
        x = np.stack([np.full((32, 32, 3), 7 * i, dtype=np.uint8) for i in range(n)], axis=3)
        savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": np.array([[10], [1], [2], [3], [9]][:n])})
    ds = data.load_data("svhn", str(tmp_path))
    assert ds.train_x.shape == (5, 3, 32, 32) and ds.train_y.tolist() == [0, 1, 2, 3, 9]
    assert [int(x[1, 5, 5]) for x in ds.train_x] == [0, 7, 14, 21, 28]
    assert not ds.flip  # digits are not mirror-symmetric


def write_idx(path, array):
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", 4), ("t10k", 2)):
        write_idx(raw / f"{prefix}-images-idx3-ubyte.gz", np.arange(n * 784).reshape(n, 28, 28) % 256)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte.gz", np.arange(n) + 3)
    ds = data.load_data("mnist", str(tmp_path))
    assert ds.train_x.shape == (4, 1, 28, 28) and ds.in_channels == 1 and ds.image_size == 28
    assert ds.train_y.tolist() == [3, 4, 5, 6] and int(ds.train_x[1, 0, 0, 0]) == 784 % 256
    assert ds.crop_padding == 0 and not ds.flip  # no augmentation


def test_generic_image_folder_reads_classes_and_size(tmp_path):
    for split in ("train", "test"):
        for cls in ("b", "a"):
            os.makedirs(tmp_path / split / cls)
            constant_image(5, 12, tmp_path / split / cls / "0.png")
    ds = data.load_data("imagefolder", str(tmp_path))
    assert ds.classes == ("a", "b") and ds.image_size == 12


def test_archive_with_escaping_member_is_refused(tmp_path):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n01\n")
        zf.writestr("../escaped.txt", "outside")
    (tmp_path / "target").mkdir()
    with pytest.raises(data.DataError, match="outside"):
        data.safe_extract(str(archive), str(tmp_path / "target"))
    assert not (tmp_path / "escaped.txt").exists() and not os.listdir(tmp_path / "target")
    tar_path = tmp_path / "evil.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tf:
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = 7
        tf.addfile(info, io.BytesIO(b"outside"))
    with pytest.raises(data.DataError, match="outside"):
        data.safe_extract(str(tar_path), str(tmp_path / "target"))


def test_safe_extract_unpacks_a_good_archive(tmp_path):
    archive = tmp_path / "good.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n01\n")
    data.safe_extract(str(archive), str(tmp_path))
    assert (tmp_path / "tiny-imagenet-200" / "wnids.txt").read_text() == "n01\n"


def test_missing_dataset_without_network_names_folder_layout_and_source(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(url, *a, **kw):
        raise OSError("network unreachable")
    monkeypatch.setattr(tv_utils, "download_url", offline)
    with pytest.raises(data.DataError) as err:
        data.load_data("tiny_imagenet", str(tmp_path / "none"))
    message = str(err.value)
    assert str(tmp_path / "none") in message and "wnids.txt" in message and "cs231n" in message
    assert "\n" not in message
    assert not (tmp_path / "none").exists()  # the folder made for the download is gone again


def test_resnet34_trains_on_64px_tiny_imagenet_through_the_command_line(tmp_path):
    root = make_tiny_imagenet(str(tmp_path / "data"), n_train=4, n_val=6)  # 3 iterations of 4 images
    argv = shlex.split(f"--dataset=tiny_imagenet --data_dir={root} --model=resnet34 --epochs=1 --batch_size=4 "
                       "--lr_max=0.01 --eps=8 --attack=fgsm --discrete_eps --grad_input_sum_coeff=1 "
                       "--eval_iter_freq=3 --n_eval_every_k_iter=4 --attack_iters=2 --n_restarts=1 --n_final_eval=6 "
                       "--final_attack_iters=2 --final_n_restarts=1 --batch_size_eval=6 --device=cpu "
                       f"--out_dir={tmp_path} --run_name=tiny")
    assert train.main(argv) == 0
    rows = utils.read_jsonl(tmp_path / "tiny" / "metrics.jsonl")
    assert [r["iteration"] for r in rows if r["kind"] == "periodic"] == [3]
    assert [r["n_points"] for r in rows if r["kind"] == "final"] == [6]
