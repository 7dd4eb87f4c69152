"""Small helpers: atomic files, logging, progress bars and lines, stop signals, processes and devices, random
generators, CUDA graphs."""
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time

import torch
import torch.distributed as dist

import kernels


class WriteError(Exception):
    """A file could not be written (no space, no permission, an I/O error); the message names it and why."""


def atomic_write(path, write, binary=True):
    """Call write(file) on a temporary file, then rename it to path: path is always the old complete file or the
    new complete one, never a torn one. A failed write removes the temporary file and raises WriteError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:  # torch.save reports a full disk as a RuntimeError
        size = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        reason = os.strerror(err.errno) if getattr(err, "errno", None) else str(err).splitlines()[0]
        raise WriteError(f"could not write {path} ({reason}; {size} bytes were written before it failed)") from None
    return size


def atomic_torch_save(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(text, path):
    atomic_write(path, lambda f: f.write(text), binary=False)


def write_jsonl(rows, path):
    atomic_write_text("".join(json.dumps(row) + "\n" for row in rows), path)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """Write the figure as PNG through a temporary file (never a torn PNG), then close it."""
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=110)
    pyplot().close(fig)
    os.replace(path + ".tmp.png", path)


def sync(device):
    """Wait for the device's queued work (CUDA runs asynchronously): before and after a timed section."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def progress(iterable, total=None, desc=None):
    """A tqdm progress bar on an interactive terminal (process 0 only); the bare iterable otherwise."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, disable=not on_terminal())


def on_terminal():
    """Whether progress bars can be drawn: process 0 writing to an interactive terminal."""
    return sys.stderr.isatty() and rank() == 0


def duration(seconds):
    """'1h02m', '4m05s' or '12s'."""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ProgressLines:
    """Off a terminal (nohup, Slurm), where no bar is drawn: due(done, total) says when to log a progress line, every
    `every_s` seconds, or at every tenth of `total` when every_s is 0; never on a terminal or on other processes.
    rate(done) and eta(done, total) extrapolate from the pace since it was made, when `done` steps were done."""

    def __init__(self, every_s, done=0):
        self.every_s, self.enabled = every_s, not on_terminal() and rank() == 0
        self.start = self.last = time.time()
        self.done_at_start = done

    def due(self, done, total):
        if not self.enabled:
            return False
        now = time.time()
        if self.every_s > 0:
            if now - self.last < self.every_s:
                return False
        elif done % max(total // 10, 1) and done != total:
            return False
        self.last = now
        return True

    def rate(self, done):
        """Steps per second since it was made."""
        return (done - self.done_at_start) / max(time.time() - self.start, 1e-9)

    def eta(self, done, total):
        return duration((total - done) / max(self.rate(done), 1e-9))


def logged_progress(iterable, total, desc, every_s, log):
    """iterable, with a line 'desc: i/total (p%), ETA' logged off a terminal as ProgressLines says."""
    lines = ProgressLines(every_s)
    for i, item in enumerate(iterable, 1):
        yield item
        if lines.due(i, total):
            log.info(f"{desc}: {i}/{total} ({100 * i / total:.0f}%), ETA {lines.eta(i, total)}")


class StopRequested(Exception):
    """A stop signal was received; the run checkpointed where it was."""


class StopSignals:
    """While active, SIGTERM, SIGINT and SIGUSR1 (what Slurm sends before a time limit or a preemption) only ask
    the run to stop at the end of its current iteration; a second SIGINT (Ctrl-C twice) stops it at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)

    def __init__(self):
        self.signum, self.previous = None, {}

    def __enter__(self):
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = self.signum or signum

    def requested(self, collective=False):
        """Whether a stop was asked; with collective=True, whether any process was asked (a collective call:
        every process makes it at the same point)."""
        if collective and is_distributed():
            return any(all_gather(self.signum is not None))
        return self.signum is not None

    def requested_at(self, iteration):
        """Within an epoch, after this iteration: whether a stop was asked (under torchrun all processes agree, at
        every STOP_SYNC_ITERS-th iteration: a collective per iteration would stall the GPUs' queue)."""
        if is_distributed():
            return iteration % STOP_SYNC_ITERS == 0 and self.requested(collective=True)
        return self.requested()

    @property
    def name(self):
        return signal.Signals(self.signum).name if self.signum else None


LOGGER = "fast-at"  # the run log's logging name
STOP_SYNC_ITERS = 5  # under torchrun, processes agree on a stop signal every this many iterations (well inside
# Slurm's KillWait of 30 s between its SIGTERM and SIGKILL)


def get_logger(log_path=None, quiet=False):
    """A logger printing to stdout and, when given, appending to log_path; quiet ones print only errors."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.ERROR if quiet else logging.INFO)
    logger.handlers.clear()
    fmt = logging.Formatter("[%(asctime)s] %(message)s", "%Y-%m-%d %H:%M:%S")
    handlers = [logging.StreamHandler(sys.stdout)] + ([logging.FileHandler(log_path)] if log_path else [])
    for handler in handlers:
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def git_state(folder):
    """(commit, whether the work tree differs from it) of the git checkout at folder; (None, None) without git."""
    def git(*cmd):
        return subprocess.run(["git", "-C", folder, *cmd], capture_output=True, text=True, timeout=10).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or None
        return commit, (bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None)
    except (OSError, subprocess.SubprocessError):
        return None, None


def cpu_model():
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


def provenance(device, argv):
    """What produced a run: the code's commit, the software and device, the command line, and what makes CPU
    arithmetic differ between machines (the same code rounds differently with other kernels or thread counts)."""
    commit, dirty = git_state(os.path.dirname(os.path.abspath(__file__)))
    cpu = cpu_model()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu
    return {"git_commit": commit, "git_dirty": dirty, "torch": torch.__version__, "cuda": torch.version.cuda,
            "python": platform.python_version(), "device": name, "cpu": cpu,
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_threads": torch.get_num_threads(),
            "cpu_kernels": kernels.state(), "processes": dist_env()[1], "command": [sys.argv[0], *argv]}


def dist_env():
    """(rank, world size, local rank) as torchrun sets them; (0, 1, 0) for a plain process."""
    return tuple(int(os.environ.get(k, d)) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def rank():
    return dist.get_rank() if is_distributed() else 0


def world_size():
    return dist.get_world_size() if is_distributed() else 1


def choose_device(name):
    """'auto' picks CUDA when available (under torchrun, the GPU of this process's local rank)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist_env()[2])
    return device


def init_distributed(device):
    """Join torchrun's process group (NCCL on GPUs, gloo on CPUs); a no-op in a plain process."""
    if dist_env()[1] > 1 and not is_distributed():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")


def global_sum(*values):
    """Each value summed over all processes (the values themselves in a plain process), as floats."""
    if not is_distributed():
        return [float(v) for v in values]
    dev = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    return t.tolist()


def global_mean(value):
    """A 0-d device tensor averaged over all processes, on the device (no host sync); itself in a plain process."""
    if not is_distributed():
        return value
    total = value.detach().clone()
    dist.all_reduce(total)  # a sum: gloo has no average
    return total / dist.get_world_size()


def all_gather(obj):
    """The list of every process's obj, in rank order ([obj] in a plain process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj):
    """Rank 0's obj, on every process."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def rng_state():
    """Every random generator the training step draws from (torch's CPU and CUDA generators)."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def clean_correct(model, x, y):
    return model(x).argmax(1) == y


def on_side_stream(side, fn, *args):
    """fn(*args) on the CUDA stream side, after the current stream's work and before its next: the eager work
    around CUDA graph captures runs off the default stream, as capture needs."""
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        out = fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    return out


def capture_graph(fn, *args):
    """(a CUDA graph that reruns fn(*args), the outputs it writes), or (None, the first line of the error) when the
    capture fails; nothing of fn runs at capture."""
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn(*args)
    except RuntimeError as err:
        return None, str(err).strip().splitlines()[0]
    return graph, out


class stop_on_forward:
    """Within it, a forward pass of `model` raises StopRequested once `stop()` is true: a stop signal ends an
    evaluation, inside a library's attack too, within one forward pass."""

    def __init__(self, model, stop):
        self.model, self.stop = model, stop

    def __enter__(self):
        self.hook = self.model.register_forward_pre_hook(self._check) if self.stop else None
        return self

    def _check(self, *_):
        if self.stop():
            raise StopRequested()

    def __exit__(self, *exc):
        if self.hook:
            self.hook.remove()


class RunLocked(Exception):
    """Another process holds the run directory's lock; the message names it."""


class RunLock:
    """One writer per run directory: an exclusive OS lock (flock) on RUN/.lock, held while the process lives and
    released by the kernel when it ends, however it ends (no stale lock survives a kill). The file names the
    holder (host, pid, since when) for the refusal's message."""

    NAME = ".lock"

    def __init__(self, run_dir):
        self.path, self.file = os.path.join(run_dir, self.NAME), None

    def __enter__(self):
        import fcntl
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunLocked(f"{os.path.dirname(self.path)} is in use by {holder}; wait for it to end, or stop it "
                            "(it checkpoints), then run this again") from None
        f.seek(0)
        f.truncate()
        f.write(f"{platform.node()} pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        self.file = f
        return self

    def __exit__(self, *exc):
        if self.file:
            self.file.close()  # closing releases the lock


def broadcast_buffers(model):
    """Process 0's buffers (BatchNorm statistics) on every process: each process updates its own from its share of
    the batch, and the saved model is process 0's. Training reads batch statistics, so this changes no step."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, src=0)
