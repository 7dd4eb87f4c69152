"""The CPU kernels that bit-identical CPU results are pinned to, on any x86-64 CPU with AVX2.

The same code rounds otherwise where a library picks other kernels: ATen's vectorised operators by the CPU's widest
instruction set, oneDNN's convolutions likewise (AVX-512 where there is one), MKL's matrix products by the CPU and
its maker. Capped at AVX2, every x86-64 CPU with AVX2 runs the same kernels (MKL in its reproducible mode), so
tests/metrics_digests.json and the CPU experiment's table hold to the bit on all of them, at the same thread count.
Each library reads its variable once, at its first kernel: pin() runs before torch computes anything (conftest.py
calls it first; the shell scripts export what `python kernels.py` prints). This module imports torch only to read
what was chosen.
"""
import getpass
import os
import shlex
import tempfile

PINNED = {  # variable: value, read by the library when it loads
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's CPU kernels (torch.backends.cpu.get_cpu_capability() reports it)
    "ONEDNN_MAX_CPU_ISA": "AVX2",  # oneDNN's convolution and pooling kernels
    "MKL_CBWR": "AVX2",  # MKL's matrix products: its conditional numerical reproducibility at AVX2
}


def pin(environ=os.environ):
    """Set each pinned variable that is not set already (a value given by the user wins: recorded as given), and
    torch.compile's cache to one of this ATen instruction set's own: its keys ignore ATEN_CPU_CAPABILITY, so a
    pinned and an unpinned process sharing the default cache load each other's kernels (seen on an AVX-512 CPU with
    torch 2.14.1: the second process aborts, 'corrupted size vs. prev_size')."""
    for name, value in PINNED.items():
        environ.setdefault(name, value)
    environ.setdefault("TORCHINDUCTOR_CACHE_DIR", inductor_cache(environ["ATEN_CPU_CAPABILITY"]))


def inductor_cache(aten_capability):
    """Inductor's default cache folder (torch's rule: the temporary folder, the user's name) with the capability."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a container): torch's fallback
        user = f"uid_{os.getuid()}"
    return os.path.join(tempfile.gettempdir(), f"torchinductor_{user}_aten_{aten_capability}")


def state():
    """What chose this process's CPU kernels, for args.json and the digests' key: ATen's instruction set as torch
    reports it, the other two variables as set (None: the library's own choice) and whether that is the pin."""
    import torch
    s = {"aten": torch.backends.cpu.get_cpu_capability(), "onednn_max_isa": os.environ.get("ONEDNN_MAX_CPU_ISA"),
         "mkl_cbwr": os.environ.get("MKL_CBWR")}
    # ATen running AVX2, not just asked to (a CPU without it falls back), and the other two capped as PINNED says
    s["pinned"] = (s["aten"] == "AVX2" and s["onednn_max_isa"] == PINNED["ONEDNN_MAX_CPU_ISA"]
                   and s["mkl_cbwr"] == PINNED["MKL_CBWR"])
    return s


def key():
    """The digests' key: what CPU results depend on beyond the code (torch's build, its kernels, its threads)."""
    import torch
    s, n = state(), torch.get_num_threads()
    return (f"torch {torch.__version__}, ATen {s['aten']}, oneDNN {s['onednn_max_isa'] or 'native'}, MKL_CBWR "
            f"{s['mkl_cbwr'] or 'off'}, {n} thread{'s' if n != 1 else ''}")


if __name__ == "__main__":  # the shell's exports: eval "$(python kernels.py)"
    environ = dict(os.environ)
    pin(environ)
    print(" ".join(f"export {name}={shlex.quote(environ[name])};" for name in (*PINNED, "TORCHINDUCTOR_CACHE_DIR")))
