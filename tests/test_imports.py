"""Every module of the project, and every package the README's install must bring, imports: a missing
dependency fails here rather than in a user's run (nothing in the suite is skipped for a missing package)."""
import glob
import importlib
import os

import pytest
from test_train import ROOT

MODULES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))
EXTRAS = ["scipy.io", "pyautoattack", "matplotlib.pyplot", "tqdm"]  # SVHN, AutoAttack, plots, progress bars


@pytest.mark.parametrize("name", MODULES + EXTRAS)
def test_module_imports(name):
    importlib.import_module(name)
