"""Datasets as uint8 tensors, and batches drawn and augmented as tensors on the training device.

Each split is decoded once into a (N, C, H, W) uint8 tensor (cached on disk for image folders), moved to the
device once, and every batch is cropped, flipped and converted to float there: no worker processes.
"""
import gzip
import hashlib
import os
import pickle
import shutil
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from utils import atomic_torch_save

CIFAR_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
BINARY_CLASSES = ("deer", "ship")  # the paper's binary analysis data: two CIFAR-10 classes
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
CACHE_VERSION = "2"  # bump when what a cache holds for the same files changes
STAT_CHUNK = 4096  # images per chunk when computing channel statistics (bounds the float copy)

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
        total = torch.zeros(2, self.in_channels, dtype=torch.float64)
        for chunk in self.train_x.split(STAT_CHUNK):
            x = chunk.double().div_(255).transpose(0, 1).flatten(1)
            total += torch.stack([x.sum(1), (x * x).sum(1)])
        n = self.train_x.numel() / self.in_channels
        mean = total[0] / n
        std = ((total[1] / n - mean**2) * n / (n - 1)).sqrt()
        return mean.tolist(), std.tolist()


# ---------------------------------------------------------------- decoded-image cache

def _cache_path(data_dir, key_files):
    """A cache file keyed by every source file's path, size and modification time; in data_dir/.fast-at-cache
    when data_dir is writable, else in ~/.cache/fast-at."""
    digest = hashlib.sha1(CACHE_VERSION.encode())
    for path in key_files:
        st = os.stat(path)
        digest.update(f"{os.path.realpath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    cache_dir = os.path.join(data_dir, ".fast-at-cache")
    # a folder without write permission bits stays untouched, even for root (whom os.access lets write anywhere)
    if not (os.access(data_dir, os.W_OK) and os.stat(data_dir).st_mode & 0o222):
        cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fast-at")
    return os.path.join(cache_dir, digest.hexdigest()[:20] + ".pt")


def _cached(data_dir, key_files, decode):
    """decode() -> dict of tensors, computed once and then read from the cache."""
    cache = _cache_path(data_dir, key_files)
    if os.path.exists(cache):
        try:
            return torch.load(cache, weights_only=True)
        except Exception:  # a damaged cache is rebuilt
            pass
    tensors = decode()
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    atomic_torch_save(tensors, cache)
    return tensors


def _decode(path):
    try:
        with Image.open(path) as img:
            return torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)
    except (OSError, SyntaxError, ValueError) as err:  # unidentified, truncated or damaged image files
        raise DataError(f"{path} is not a readable image ({type(err).__name__}: {str(err).splitlines()[0]}); "
                        "delete or replace it, or remove the dataset's folder so it is downloaded again") from None


def _decode_all(paths, where):
    images = [_decode(path) for path in paths]
    if len({img.shape for img in images}) != 1:
        raise DataError(f"images in {where} differ in size: resize them to one size first")
    return torch.stack(images)


# ---------------------------------------------------------------- readers of each on-disk layout

def has_image_folder_layout(root):
    return all(os.path.isdir(os.path.join(root, split)) for split in ("train", "test"))


def _list_images(split_dir):
    classes = sorted(d for d in os.listdir(split_dir)
                     if os.path.isdir(os.path.join(split_dir, d)) and not d.startswith("."))
    files = [(os.path.join(split_dir, c, f), label) for label, c in enumerate(classes)
             for f in sorted(os.listdir(os.path.join(split_dir, c))) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return classes, files


def read_image_folder(split_dir):
    """Decode `split_dir/<class>/*` into uint8 images and labels (classes in sorted order), cached on disk."""
    classes, files = _list_images(split_dir)
    if not files:
        raise DataError(f"no images in {split_dir}: expected {split_dir}/<class>/*.jpg (or .png)")
    decode = lambda: {"x": _decode_all([p for p, _ in files], split_dir),  # noqa: E731
                      "y": torch.tensor([label for _, label in files])}
    saved = _cached(os.path.dirname(os.path.abspath(split_dir)), [p for p, _ in files], decode)
    return saved["x"], saved["y"], tuple(classes)


def _load_image_folder(root):
    train_x, train_y, classes = read_image_folder(os.path.join(root, "train"))
    test_x, test_y, test_classes = read_image_folder(os.path.join(root, "test"))
    if test_classes != classes:
        raise DataError(f"{root}/train and {root}/test hold different class folders: they must match")
    return ImageData(train_x, train_y, test_x, test_y, classes)


def _load_tiny_imagenet(root):
    """tiny-imagenet-200 in the original's order (torchvision ImageFolder): classes sorted by wnid, images
    sorted by class and file name; the labelled val split is the test set."""
    base = os.path.join(root, "tiny-imagenet-200")
    with open(os.path.join(base, "wnids.txt")) as f:
        wnids = sorted(line.strip() for line in f if line.strip())
    label = {wnid: i for i, wnid in enumerate(wnids)}
    train = [(os.path.join(base, "train", w, "images", name), label[w]) for w in wnids
             for name in sorted(os.listdir(os.path.join(base, "train", w, "images")))
             if name.lower().endswith(IMAGE_EXTENSIONS)]
    with open(os.path.join(base, "val", "val_annotations.txt")) as f:
        rows = sorted((label[r[1]], r[0]) for r in (line.split("\t") for line in f if line.strip()))
    test = [(os.path.join(base, "val", "images", name), y) for y, name in rows]

    def decode():
        return {f"{split}_{k}": v for split, files in (("train", train), ("test", test)) for k, v in
                (("x", _decode_all([p for p, _ in files], base)), ("y", torch.tensor([y for _, y in files])))}
    t = _cached(root, [os.path.join(base, "wnids.txt"), os.path.join(base, "val", "val_annotations.txt")]
                + [p for p, _ in train + test], decode)
    return ImageData(t["train_x"], t["train_y"], t["test_x"], t["test_y"], tuple(wnids))


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR python files, which hold only dicts, lists, bytes and numpy arrays: nothing else
    (no code) is let through."""
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}  # encode: bytes in protocol 2

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a dataset file")
        return super().find_class(module, name)


def _unpickle(path):
    with open(path, "rb") as f:
        return _ArrayUnpickler(f, encoding="latin1").load()


def _read_cifar_batches(paths, label_key):
    batches = [_unpickle(p) for p in paths]
    x = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
    y = np.concatenate([np.asarray(b[label_key]) for b in batches])
    return torch.from_numpy(x.copy()), torch.from_numpy(y.astype(np.int64))


def _load_cifar10_python(root):
    base = os.path.join(root, "cifar-10-batches-py")
    train = _read_cifar_batches([os.path.join(base, f"data_batch_{i}") for i in range(1, 6)], "labels")
    test = _read_cifar_batches([os.path.join(base, "test_batch")], "labels")
    return ImageData(*train, *test, CIFAR_CLASSES)


def _load_cifar100(root):
    base = os.path.join(root, "cifar-100-python")
    train = _read_cifar_batches([os.path.join(base, "train")], "fine_labels")
    test = _read_cifar_batches([os.path.join(base, "test")], "fine_labels")
    classes = tuple(_unpickle(os.path.join(base, "meta"))["fine_label_names"])
    return ImageData(*train, *test, classes)


def _load_svhn(root):
    from scipy.io import loadmat
    from scipy.io.matlab import MatReadError

    def split(name):
        path = os.path.join(root, f"{name}_32x32.mat")
        try:
            mat = loadmat(path)
        except (MatReadError, ValueError, TypeError, EOFError, IndexError) as err:  # truncated or not .mat
            raise DataError(f"{path} is damaged ({type(err).__name__}: {str(err).splitlines()[0]}): delete it, "
                            "or remove the dataset's folder so it is downloaded again") from None
        x = torch.from_numpy(np.ascontiguousarray(mat["X"].transpose(3, 2, 0, 1)))
        y = torch.from_numpy(mat["y"].reshape(-1).astype(np.int64) % 10)  # SVHN labels digit 0 as 10
        return x, y
    return ImageData(*split("train"), *split("test"), tuple(str(d) for d in range(10)), flip=False)


def _read_idx(path):
    """An MNIST idx file (optionally gzipped) as a uint8 tensor of its stated shape."""
    opener = gzip.open if path.endswith(".gz") else open
    damaged = (f"{path} is damaged: delete it, or remove the dataset's folder so it is downloaded again")
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # a truncated or corrupt gzip stream
        raise DataError(f"{damaged} ({type(err).__name__}: {err})") from None
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":  # idx magic: two zero bytes, then 8 for unsigned bytes
        raise DataError(f"{damaged} (not an idx file of unsigned bytes)")
    n_dims = raw[3]
    try:
        shape = struct.unpack(f">{n_dims}I", raw[4:4 + 4 * n_dims])
        return torch.frombuffer(bytearray(raw[4 + 4 * n_dims:]), dtype=torch.uint8).view(*shape)
    except (struct.error, RuntimeError) as err:  # header or data shorter than the stated shape
        raise DataError(f"{damaged} (its size does not match its header: {err})") from None


def _load_mnist(root):
    base = root if os.path.exists(_mnist_file(root, "train-images-idx3-ubyte")) else os.path.join(root, "MNIST", "raw")
    read = lambda name: _read_idx(_mnist_file(base, name))  # noqa: E731
    return ImageData(read("train-images-idx3-ubyte")[:, None], read("train-labels-idx1-ubyte").long(),
                     read("t10k-images-idx3-ubyte")[:, None], read("t10k-labels-idx1-ubyte").long(),
                     tuple(str(d) for d in range(10)), crop_padding=0, flip=False)


def _mnist_file(base, name):
    plain = os.path.join(base, name)
    return plain if os.path.exists(plain) else plain + ".gz"


def _binary(ds):
    """Keep two CIFAR-10 classes (deer and ship), relabelled 0 and 1."""
    keep = [CIFAR_CLASSES.index(c) for c in BINARY_CLASSES]

    def select(x, y):
        mask = (y == keep[0]) | (y == keep[1])
        return x[mask], (y[mask] == keep[1]).long()
    return ImageData(*select(ds.train_x, ds.train_y), *select(ds.test_x, ds.test_y), BINARY_CLASSES)


def _grayscale(ds):
    """One channel: the mean of R, G and B rounded down (the original's data.mean(3).astype(uint8))."""
    gray = lambda x: x.double().mean(1, keepdim=True).floor().to(torch.uint8)  # noqa: E731
    return ImageData(gray(ds.train_x), ds.train_y, gray(ds.test_x), ds.test_y, ds.classes)


def interleave_classes(ds):
    """An image folder lists CIFAR-10 class by class; the original's first N evaluation points come from the
    official files, where classes are mixed. Reorder so that point i is the (i // K)-th image of class i % K:
    the first N points then cover every class, as there."""
    def order(y):
        rank_in_class = torch.zeros_like(y)
        for c in y.unique():
            idx = (y == c).nonzero().squeeze(1)
            rank_in_class[idx] = torch.arange(len(idx))
        return torch.argsort(rank_in_class * (int(y.max()) + 1) + y, stable=True)
    train, test = order(ds.train_y), order(ds.test_y)
    return ImageData(ds.train_x[train], ds.train_y[train], ds.test_x[test], ds.test_y[test], ds.classes,
                     ds.crop_padding, ds.flip)


# ---------------------------------------------------------------- download and safe extraction

def safe_extract(archive, target):
    """Extract a zip or tar archive into target, refusing any member that would land outside it."""
    try:
        _extract(archive, os.path.realpath(target))
    except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error) as err:  # a truncated download
        raise DataError(f"{archive} is a damaged archive ({type(err).__name__}: {err}): delete it so that it is "
                        "downloaded again") from None


def _extract(archive, target):
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            _check_members(archive, target, zf.namelist())
            zf.extractall(target)
        return
    with tarfile.open(archive) as tf:
        members = tf.getmembers()
        _check_members(archive, target, [m.name for m in members])
        if any(m.issym() or m.islnk() for m in members):
            raise DataError(f"{archive} holds links; refusing to extract it")
        tf.extractall(target)


def _check_members(archive, target, names):
    for name in names:
        dest = os.path.realpath(os.path.join(target, name))
        if dest != target and not dest.startswith(target + os.sep):
            raise DataError(f"{archive}: member {name!r} would be written outside {target}; refusing to extract it")


def _download(dataset, spec, root):
    """Fetch the dataset's files into root (archives extracted there); DataError if that is impossible."""
    from torchvision.datasets.utils import download_url

    created = not os.path.exists(root)
    os.makedirs(root, exist_ok=True)
    for name, url, md5 in spec.downloads:
        try:
            download_url(url, root, name, md5)
        except Exception as err:  # no network, a refused connection, a checksum mismatch
            if created:  # leave nothing behind
                shutil.rmtree(root, ignore_errors=True)
            raise DataError(f"{dataset} not found in {root} and its download from {url} failed "
                            f"({type(err).__name__}); put there {spec.layout}") from None
        if name.endswith((".zip", ".tar.gz")):
            safe_extract(os.path.join(root, name), root)


def _read_cifar10(root):
    """CIFAR-10 from an image folder (interleaved by class) when root has that layout, else the python files."""
    if has_image_folder_layout(root):
        data = _load_image_folder(root)
        if tuple(data.classes) != CIFAR_CLASSES:  # a folder of some classes would train a smaller task unnoticed
            raise DataError(f"{root}/train holds the class folders {', '.join(data.classes)}, not CIFAR-10's ten "
                            f"({', '.join(CIFAR_CLASSES)}): give the full dataset, or --dataset=imagefolder "
                            "for other classes")
        return interleave_classes(data)
    return _load_cifar10_python(root)


def _exists(*relative):
    return lambda root: os.path.exists(os.path.join(root, *relative))


def _mnist_present(root):
    return any(os.path.exists(_mnist_file(base, "t10k-labels-idx1-ubyte")) for base in (root, f"{root}/MNIST/raw"))


def _cifar10_present(root):
    return has_image_folder_layout(root) or _exists("cifar-10-batches-py", "test_batch")(root)


@dataclass(frozen=True)
class DatasetSpec:
    """What the code knows about one --dataset: how to read it from --data_dir, how to tell it is there, what
    --data_dir must hold (for messages), and what to download when it is not there (nothing: it must be)."""
    read: Callable  # data_dir -> ImageData (crop padding and flipping included)
    present: Callable  # data_dir -> bool
    layout: str
    downloads: tuple = field(default=())  # (file name, URL, md5 or None), archives extracted in place


CIFAR10 = DatasetSpec(
    _read_cifar10, _cifar10_present,
    "cifar-10-batches-py/ (data_batch_1..5, test_batch), or train/<class>/*.jpg and test/<class>/*.jpg",
    (("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
      "c58f30108f718f92721af3b95e74349a"),))
DATASETS = {
    "cifar10": CIFAR10,
    "cifar100": DatasetSpec(
        _load_cifar100, _exists("cifar-100-python", "meta"), "cifar-100-python/ (train, test, meta)",
        (("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
          "eb9058c3a382ffc7106e4002c42a8d85"),)),
    "svhn": DatasetSpec(
        _load_svhn, _exists("test_32x32.mat"), "train_32x32.mat and test_32x32.mat",
        tuple((f"{split}_32x32.mat", f"http://ufldl.stanford.edu/housenumbers/{split}_32x32.mat", md5)
              for split, md5 in (("train", "e26dedcc434d2e4c54c9b2d4a06d8373"),
                                 ("test", "eb5a983be6a315427106f1b164d9cef3")))),
    "mnist": DatasetSpec(
        _load_mnist, _mnist_present, "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
        "t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz (or the same in MNIST/raw/)",
        tuple((f"{name}.gz", f"https://ossci-datasets.s3.amazonaws.com/mnist/{name}.gz", md5)
              for name, md5 in (("train-images-idx3-ubyte", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
                                ("train-labels-idx1-ubyte", "d53e105ee54ea40749a09fcbcd1e9432"),
                                ("t10k-images-idx3-ubyte", "9fb629c4189551a2d022fa330f9573f3"),
                                ("t10k-labels-idx1-ubyte", "ec29112dd5afa0611ce80d1b7f02629c")))),
    "cifar10_binary": replace(CIFAR10, read=lambda root: _binary(_read_cifar10(root))),
    "cifar10_binary_gs": replace(CIFAR10, read=lambda root: _grayscale(_binary(_read_cifar10(root)))),
    "tiny_imagenet": DatasetSpec(
        _load_tiny_imagenet, _exists("tiny-imagenet-200", "wnids.txt"),
        "tiny-imagenet-200/ (wnids.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, val/val_annotations.txt)",
        (("tiny-imagenet-200.zip", "http://cs231n.stanford.edu/tiny-imagenet-200.zip", None),)),
    "imagefolder": DatasetSpec(_load_image_folder, has_image_folder_layout,
                               "train/<class>/* and test/<class>/* images, all of one size"),
}


def load_data(dataset, data_dir, download=True):
    """The named dataset from data_dir, downloaded there first when missing, downloadable and `download`."""
    spec = DATASETS.get(dataset)
    if spec is None:
        raise DataError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}")
    halves = [split for split in ("train", "test") if os.path.isdir(os.path.join(data_dir, split))]
    if len(halves) == 1:  # half an image folder: say so, rather than reading (or downloading) something else
        missing = {"train", "test"} - set(halves)
        raise DataError(f"{data_dir} has {halves[0]}/ but no {missing.pop()}/: an image folder needs "
                        "train/<class>/* and test/<class>/*")
    if not spec.present(data_dir):
        if not download:
            raise DataError(f"{data_dir} does not hold {dataset} (not downloaded: the run's own data is needed); "
                            f"expected {spec.layout}")
        if not spec.downloads:
            raise DataError(f"{data_dir} does not hold {dataset}: expected {spec.layout}")
        _download(dataset, spec, data_dir)
    try:
        return spec.read(data_dir)
    except (OSError, KeyError, ValueError, pickle.UnpicklingError) as err:
        raise DataError(f"{dataset} in {data_dir} is incomplete or damaged ({type(err).__name__}: {err}); "
                        f"expected {spec.layout}") from None


PIXEL_VALUES = torch.arange(256, dtype=torch.float32).div(255)  # torchvision ToTensor's value of each uint8 pixel
_pixel_tables = {}  # PIXEL_VALUES on each device that asked for it


def to_unit(x_u8):
    """uint8 images as float32 in [0, 1], bit for bit the values of the original's ToTensor (a CPU division) on
    any device: a division by 255 on CUDA is a multiplication by fl(1/255), one ulp off for 126 of the values."""
    table = _pixel_tables.get(x_u8.device)
    if table is None:
        table = _pixel_tables[x_u8.device] = PIXEL_VALUES.to(x_u8.device)
    return table[x_u8.int()]


OFFICIAL_CIFAR10 = "official CIFAR-10"  # what the paper's results file was computed on


def source(dataset, data_dir):
    """Where a run's data came from, for setting the paper's numbers beside it: 'official CIFAR-10' for the python
    files of CIFAR-10 that pass torchvision's own integrity check (each file's md5, torchvision's list), else what
    it is: an image folder (a copy, possibly re-encoded), files failing that check, another dataset."""
    if has_image_folder_layout(data_dir):
        return "image folder"
    if dataset != "cifar10":
        return f"{dataset} files"
    from torchvision.datasets import CIFAR10 as Torchvisions
    from torchvision.datasets.utils import check_integrity
    base = os.path.join(data_dir, Torchvisions.base_folder)
    passes = all(check_integrity(os.path.join(base, name), md5)
                 for name, md5 in Torchvisions.train_list + Torchvisions.test_list)
    return OFFICIAL_CIFAR10 if passes else "CIFAR-10 files failing torchvision's integrity check"


FINGERPRINT_POINTS = 64  # images of each split hashed into a dataset's fingerprint


def fingerprint(ds):
    """A cheap identity of the data: the sizes of the splits and a hash of their first images and labels."""
    digest = hashlib.sha1()
    for x, y in ((ds.train_x, ds.train_y), (ds.test_x, ds.test_y)):
        digest.update(x[:FINGERPRINT_POINTS].contiguous().numpy().tobytes())
        digest.update(y[:FINGERPRINT_POINTS].numpy().tobytes())
    return f"{len(ds.train_y)} train + {len(ds.test_y)} test images, sha1 {digest.hexdigest()[:12]}"


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


def train_batches(x_u8, y, batch_size, generator, padding=4, flip=True, rank=0, world_size=1, skip=0):
    """Yield the epoch's full batches as (float images in [0, 1], labels), shuffled and augmented on x's device;
    the first `skip` batches are drawn but not made (a run resumed within the epoch).

    batch_size is the global batch: each of world_size ranks takes a disjoint batch_size // world_size slice.
    """
    perm = torch.randperm(len(y), generator=generator, device=generator.device).to(y.device)
    local = slice(rank * (batch_size // world_size), (rank + 1) * (batch_size // world_size))
    for i, start in enumerate(range(0, len(y) - batch_size + 1, batch_size)):
        # draws are made for the global batch, so augmentation does not depend on the number of ranks
        top, left, mirrored = (d[local] for d in crop_flip_draws(batch_size, generator, padding, flip))
        if i < skip:
            continue
        idx = perm[start:start + batch_size][local]
        yield to_unit(crop_flip(x_u8[idx], top, left, mirrored, padding)), y[idx]


def n_train_batches(n_examples, batch_size):
    return n_examples // batch_size


def eval_batches(x_u8, y, batch_size):
    """Yield (float images in [0, 1], labels) in order, without augmentation."""
    for start in range(0, len(y), batch_size):
        yield to_unit(x_u8[start:start + batch_size]), y[start:start + batch_size]
