import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels  # noqa: E402

kernels.pin()  # before torch loads its libraries: the digests compare on every x86-64 CPU with AVX2

import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(1)  # the tests' models are tiny: one thread is faster than two competing

import data  # noqa: E402

TINY_CLASSES = data.CIFAR_CLASSES  # --dataset=cifar10, the default, needs CIFAR-10's ten class folders


# each class's mean colour: levels (0, 1 or 2) of red, green and blue, ten of them apart by 95 in a channel
COLOUR_LEVELS = [(r, g, b) for b in range(3) for g in range(3) for r in range(3)][:10]


def save_png(img, path):
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)


def make_image_folder(root, n_train_per_class=5, n_test_per_class=3, size=8, seed=0, classes=TINY_CLASSES):
    """A tiny dataset in the image-folder layout: each class has its own mean colour, so it is learnable."""
    g = torch.Generator().manual_seed(seed)
    for split, n in (("train", n_train_per_class), ("test", n_test_per_class)):
        for label, cls in enumerate(classes):
            os.makedirs(os.path.join(root, split, cls))
            for i in range(n):
                base = 30.0 + 95 * torch.tensor(COLOUR_LEVELS[label % len(COLOUR_LEVELS)]).view(3, 1, 1)
                img = (base + 40 * torch.randn(3, size, size, generator=g)).clamp(0, 255).to(torch.uint8)
                save_png(img, os.path.join(root, split, cls, f"{i:04d}.png"))
    return root


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Decoded-dataset caches go to the test's own folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def tiny_data(tmp_path):
    return make_image_folder(str(tmp_path / "data"))
