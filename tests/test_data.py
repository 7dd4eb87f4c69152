"""Loading the image-folder layout and on-device augmentation, against explicit per-image code."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_CLASSES, save_png
from PIL import Image

import data


def test_image_folder_loads_images_labels_and_classes(tiny_data):
    ds = data.load_data("imagefolder", tiny_data)
    assert ds.classes == TINY_CLASSES
    assert ds.train_x.shape == (50, 3, 8, 8) and ds.train_x.dtype == torch.uint8
    assert ds.test_x.shape == (30, 3, 8, 8)
    assert ds.train_y.tolist() == [label for label in range(10) for _ in range(5)]
    expected = np.array(Image.open(os.path.join(tiny_data, "train", "automobile", "0003.png")))  # label 1, 4th image
    assert torch.equal(ds.train_x[5 + 3].permute(1, 2, 0), torch.from_numpy(expected))


def test_cifar10_image_folder_interleaves_classes_so_the_first_points_cover_all(tiny_data):
    """The original evaluates the first N points of the official files, where classes are mixed."""
    folder, ds = data.load_data("imagefolder", tiny_data), data.load_data("cifar10", tiny_data)
    assert ds.test_y.tolist() == list(range(10)) * 3 and ds.train_y.tolist() == list(range(10)) * 5
    assert torch.equal(ds.train_x[3 * 10 + 1], folder.train_x[5 + 3])  # 4th image of class 1
    assert torch.equal(ds.test_x.sum(0), folder.test_x.sum(0))  # a permutation: the same images


def test_binary_grayscale_data_is_the_floor_of_the_channel_mean(tmp_path):
    from conftest import make_image_folder
    root = make_image_folder(str(tmp_path / "d"), n_train_per_class=3, n_test_per_class=2, classes=data.CIFAR_CLASSES)
    binary, gray = data.load_data("cifar10_binary", root), data.load_data("cifar10_binary_gs", root)
    assert gray.train_x.shape[1] == 1 and gray.classes == ("deer", "ship")
    assert torch.equal(gray.train_x[:, 0], binary.train_x.double().mean(1).floor().to(torch.uint8))
    assert binary.train_y.tolist() == [0, 1] * 3 and binary.test_y.tolist() == [0, 1] * 2


def test_decoded_split_is_cached_and_invalidated(tiny_data):
    first = data.read_image_folder(os.path.join(tiny_data, "test"))
    assert os.listdir(os.path.join(tiny_data, ".fast-at-cache"))  # next to the data, which is writable here
    cached = data.read_image_folder(os.path.join(tiny_data, "test"))
    assert torch.equal(first[0], cached[0]) and torch.equal(first[1], cached[1]) and cached[2] == first[2]
    new_image = torch.full((3, 8, 8), 7, dtype=torch.uint8)
    save_png(new_image, os.path.join(tiny_data, "test", "airplane", "0000.png"))
    os.utime(os.path.join(tiny_data, "test", "airplane", "0000.png"), ns=(1, 1))  # even with an old timestamp
    again = data.read_image_folder(os.path.join(tiny_data, "test"))
    assert torch.equal(again[0][0], new_image) and torch.equal(again[0][1:], first[0][1:])


def test_cifar10_folder_must_hold_cifar10s_ten_classes(tmp_path, capsys):
    """A folder of some classes would train and report a smaller task as CIFAR-10; --dataset=imagefolder reads it."""
    from conftest import make_image_folder
    root = make_image_folder(str(tmp_path / "d"), n_train_per_class=2, n_test_per_class=1, classes=("cat",))
    with pytest.raises(data.DataError, match=r"holds the class folders cat, not CIFAR-10's ten .*dataset=imagefolder"):
        data.load_data("cifar10", root)
    assert data.load_data("imagefolder", root).classes == ("cat",)
    import train
    assert train.main([f"--data_dir={root}", f"--out_dir={tmp_path / 'runs'}", "--device=cpu"]) == 2
    assert not (tmp_path / "runs").exists()  # refused before a run folder is made
    nine = make_image_folder(str(tmp_path / "nine"), n_train_per_class=1, n_test_per_class=1,
                             classes=data.CIFAR_CLASSES[:9] + ("lorry",))
    with pytest.raises(data.DataError, match="lorry"):
        data.load_data("cifar10", nine)
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "holds the class folders cat" in line


def test_missing_dataset_is_a_clear_error(tmp_path):
    empty = tmp_path / "nothing"
    (empty / "train" / "cat").mkdir(parents=True)
    (empty / "test" / "cat").mkdir(parents=True)
    with pytest.raises(data.DataError, match="no images in"):
        data.load_data("cifar10", str(empty))


def test_crop_flip_equals_per_image_slicing():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8, generator=g)
    top, left, mirrored = data.crop_flip_draws(16, g, padding=4, flip=True)
    out = data.crop_flip(x, top, left, mirrored, padding=4)
    assert 0 < mirrored.sum() < 16 and len(set(top.tolist())) > 1
    for i in range(16):
        padded = F.pad(x[i], (4, 4, 4, 4))
        crop = padded[:, top[i]:top[i] + 8, left[i]:left[i] + 8]
        assert torch.equal(out[i], crop.flip(2) if mirrored[i] else crop)
    assert top.min() >= 0 and top.max() <= 8


def test_train_batches_are_deterministic_full_and_disjoint():
    x = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 1, 2, 2).contiguous()
    y = torch.arange(100)
    run = lambda seed, epoch: list(data.train_batches(x, y, 32, data.epoch_generator(seed, epoch, "cpu"), 0, False))  # noqa: E731
    a, b, c = run(0, 0), run(0, 0), run(0, 1)
    assert len(a) == 3  # 100 // 32 full batches; the remainder is dropped
    assert all(torch.equal(xa, xb) for (xa, _), (xb, _) in zip(a, b, strict=True))
    labels = torch.cat([yb for _, yb in a])
    assert len(labels.unique()) == 96
    assert all(torch.equal(xb[:, 0, 0, 0] * 255, yb.float()) for xb, yb in a)  # images stay with their labels
    assert not torch.equal(labels, torch.cat([yb for _, yb in c]))  # a new order each epoch


def test_ranks_split_the_global_batch():
    x = torch.randint(0, 256, (64, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(64)
    whole = list(data.train_batches(x, y, 16, data.epoch_generator(3, 0, "cpu")))
    halves = [list(data.train_batches(x, y, 16, data.epoch_generator(3, 0, "cpu"), rank=r, world_size=2))
              for r in (0, 1)]
    for k, (xw, yw) in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][k][0], halves[1][k][0]]), xw)
        assert torch.equal(torch.cat([halves[0][k][1], halves[1][k][1]]), yw)


def test_evaluation_points_are_the_first_ones():
    import evaluation
    assert torch.equal(evaluation.first_points(1000, 256), torch.arange(256))
    assert torch.equal(evaluation.first_points(10, -1), torch.arange(10))
    assert torch.equal(evaluation.first_points(10, 50), torch.arange(10))


def test_read_only_data_folder_is_never_written(tiny_data, tmp_path):
    os.chmod(tiny_data, 0o555)  # as a shared, read-only copy of a dataset
    try:
        data.read_image_folder(os.path.join(tiny_data, "train"))
        assert not os.path.exists(os.path.join(tiny_data, ".fast-at-cache"))
        assert os.listdir(tmp_path / "cache" / "fast-at")  # the user's cache folder instead
    finally:
        os.chmod(tiny_data, 0o755)
