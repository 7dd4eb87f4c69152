"""Datasets as uint8 tensors, and batches drawn and augmented as tensors on the training device.

Each split is decoded once into a (N, C, H, W) uint8 tensor (cached on disk for image folders), moved to the
device once, and every batch is cropped, flipped and converted to float there: no worker processes.
"""
import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
SUBSET_SEED = 0  # fixed: every run evaluates (and subsamples) the same points, whatever its --seed


class DataError(Exception):
    """A dataset that is missing, incomplete or unreadable; the message says what was expected."""


@dataclass
class ImageData:
    train_x: torch.Tensor  # uint8 (N, C, H, W)
    train_y: torch.Tensor  # int64 (N,)
    test_x: torch.Tensor
    test_y: torch.Tensor
    classes: tuple
    crop_padding: int = 4  # pixels of zero padding before the random crop
    flip: bool = True

    @property
    def n_classes(self):
        return len(self.classes)

    @property
    def in_channels(self):
        return self.train_x.shape[1]

    @property
    def image_size(self):
        return self.train_x.shape[-1]

    def mean_std(self):
        """Per-channel mean and std of the training images, in [0, 1] units."""
        x = self.train_x.float().div_(255).transpose(0, 1).flatten(1)
        return x.mean(1).tolist(), x.std(1).tolist()


def has_image_folder_layout(root):
    return all(os.path.isdir(os.path.join(root, split)) for split in ("train", "test"))


def _list_images(split_dir):
    classes = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
    files = [(os.path.join(split_dir, c, f), label) for label, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(split_dir, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return classes, files


def _cache_path(split_dir, files):
    """A cache file keyed by the folder and every image's path, size and modification time."""
    digest = hashlib.sha1(os.path.abspath(split_dir).encode())
    for path, label in files:
        st = os.stat(path)
        digest.update(f"{path}|{label}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fast-at")
    return os.path.join(cache_dir, digest.hexdigest()[:20] + ".pt")


def _decode(path):
    with Image.open(path) as img:
        return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)


def read_image_folder(split_dir):
    """Decode `split_dir/<class>/*` into uint8 images and labels (classes in sorted order), cached on disk."""
    classes, files = _list_images(split_dir)
    if not files:
        raise DataError(f"no images in {split_dir}: expected {split_dir}/<class>/*.jpg (or .png)")
    cache = _cache_path(split_dir, files)
    if os.path.exists(cache):
        saved = torch.load(cache, weights_only=True)
        return saved["x"], saved["y"], tuple(classes)
    images = [_decode(path) for path, _ in files]
    if len({img.shape for img in images}) != 1:
        raise DataError(f"images in {split_dir} differ in size: resize them to one size first")
    x, y = torch.stack(images), torch.tensor([label for _, label in files])
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    torch.save({"x": x, "y": y}, cache + ".tmp")
    os.replace(cache + ".tmp", cache)
    return x, y, tuple(classes)


def _load_image_folder(root):
    train_x, train_y, classes = read_image_folder(os.path.join(root, "train"))
    test_x, test_y, test_classes = read_image_folder(os.path.join(root, "test"))
    if test_classes != classes:
        raise DataError(f"{root}/train and {root}/test hold different class folders: they must match")
    return ImageData(train_x, train_y, test_x, test_y, classes)


def _load_torchvision_cifar10(root):
    from torchvision.datasets import CIFAR10

    try:
        splits = [CIFAR10(root, train=train, download=True) for train in (True, False)]
    except Exception as err:  # no network, or a broken archive
        raise DataError(f"CIFAR-10 not found in {root} and could not be downloaded ({err}); put the python "
                        f"version (cifar-10-batches-py/) there, or an image folder {root}/train/<class>/*.jpg "
                        f"and {root}/test/<class>/*.jpg") from None
    tensors = [(torch.from_numpy(s.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(s.targets)) for s in splits]
    return ImageData(*tensors[0], *tensors[1], CIFAR_CLASSES)


def load_data(dataset, data_dir):
    """CIFAR-10 from an image folder (train/<class>/*, test/<class>/*) or torchvision's python version."""
    if dataset != "cifar10":
        raise DataError(f"unknown dataset {dataset!r}: choose cifar10")
    if has_image_folder_layout(data_dir):
        return _load_image_folder(data_dir)
    return _load_torchvision_cifar10(data_dir)


def fixed_subset(n_total, n):
    """Indices of n points drawn without replacement by a fixed generator (all points if n < 0)."""
    if n < 0 or n >= n_total:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(SUBSET_SEED))[:n]


def crop_flip_draws(n, generator, padding, flip):
    """Random crop offsets (pixels, in [0, 2 * padding]) and flip decisions for n images."""
    offsets = torch.randint(0, 2 * padding + 1, (2, n), generator=generator, device=generator.device)
    mirrored = torch.rand(n, generator=generator, device=generator.device) < 0.5
    return offsets[0], offsets[1], mirrored & flip


def crop_flip(x, top, left, mirrored, padding):
    """Crop the original size at (top, left) from the zero-padded images, then mirror where asked."""
    n, c, h, w = x.shape
    dev = x.device
    if padding:
        rows = (top.to(dev)[:, None] + torch.arange(h, device=dev))[:, None, :, None]
        cols = (left.to(dev)[:, None] + torch.arange(w, device=dev))[:, None, None, :]
        x = F.pad(x, (padding,) * 4)[torch.arange(n, device=dev)[:, None, None, None],
                                     torch.arange(c, device=dev)[None, :, None, None], rows, cols]
    return torch.where(mirrored.to(dev)[:, None, None, None], x.flip(3), x)


def epoch_generator(seed, epoch, device):
    """The random stream of one epoch's order and augmentation: a function of (seed, epoch) alone, so a run
    resumed at an epoch boundary sees the same batches."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def train_batches(x_u8, y, batch_size, generator, padding=4, flip=True, rank=0, world_size=1):
    """Yield the epoch's full batches as (float images in [0, 1], labels), shuffled and augmented on x's device.

    batch_size is the global batch: each of world_size ranks takes a disjoint batch_size // world_size slice.
    """
    perm = torch.randperm(len(y), generator=generator, device=generator.device).to(y.device)
    local = slice(rank * (batch_size // world_size), (rank + 1) * (batch_size // world_size))
    for start in range(0, len(y) - batch_size + 1, batch_size):
        # draws are made for the global batch, so augmentation does not depend on the number of ranks
        top, left, mirrored = (d[local] for d in crop_flip_draws(batch_size, generator, padding, flip))
        idx = perm[start:start + batch_size][local]
        yield crop_flip(x_u8[idx], top, left, mirrored, padding).float().div_(255), y[idx]


def n_train_batches(n_examples, batch_size):
    return n_examples // batch_size


def eval_batches(x_u8, y, batch_size):
    """Yield (float images in [0, 1], labels) in order, without augmentation."""
    for start in range(0, len(y), batch_size):
        yield x_u8[start:start + batch_size].float().div_(255), y[start:start + batch_size]
