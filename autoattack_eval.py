"""The official AutoAttack (Croce & Hein's code, the `pyautoattack` package) as RobustBench runs it: images in
[0, 1], the model's logits, L-inf, the standard version by default; resumable at every attack's end.

pyautoattack 0.2.0's own state file cannot be resumed: it saves the set of attacks as its str(), so reading it
back always raises 'different set of attacks', and a restored state leaves run_standard_evaluation's y_adv unset.
So each attack is one call of run_standard_evaluation on the points still robust, in the version's order and in
the same batches as one call of all of them, and the robust flags after each attack go to a resume file of our own
(what the official state holds: the attacks run, the flags): a stop loses at most the attack in progress, and the
continued evaluation gives the uninterrupted one's result."""
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import time

import torch

import utils

PACKAGE = "pyautoattack"
VERSIONS = ("standard", "plus", "rand", "custom")
ATTACKS = ("apgd-ce", "apgd-dlr", "fab", "square", "apgd-t", "fab-t")
DLR_ATTACKS = ("apgd-dlr", "apgd-t")
DLR_MIN_CLASSES = 4  # the targeted DLR loss reads the 1st, 3rd and 4th largest logits
MAX_TARGETS = 9  # the standard version's target classes of APGD-T and FAB-T
LIBRARY_LOGGER = "auto-attack"  # the logging name pyautoattack reports through
BATCH_RECORD = re.compile(r"^(\S+) - (\d+)/(\d+) - (\d+) out of (\d+) successfully perturbed$")


def package_version():
    return importlib.metadata.version(PACKAGE)


@dataclasses.dataclass(frozen=True)
class Protocol:
    """What decides an AutoAttack number: the version (custom: its attacks), eps, seed, points and batch size
    (each batch's random draws are seeded afresh), and the target classes where the dataset has fewer than 10."""
    version: str
    attacks: tuple
    eps_px: float
    seed: int
    n_points: int
    batch_size: int
    n_targets: int

    @property
    def label(self):
        attacks = f" ({', '.join(self.attacks)})" if self.version == "custom" else ""
        targets = f", {self.n_targets} targets" if self.n_targets != MAX_TARGETS else ""
        return (f"AutoAttack {self.version}{attacks} ({PACKAGE} {package_version()}{targets}), seed {self.seed}, "
                f"{self.n_points:,} pts")

    def as_dict(self):
        return {**dataclasses.asdict(self), "implementation": PACKAGE, "implementation_version": package_version(),
                "label": self.label}


def protocol(version, attacks, eps_px, seed, n_points, batch_size, n_classes):
    """The Protocol, or ValueError naming the flag to change where the library cannot run it."""
    if version not in VERSIONS:
        raise ValueError(f"--autoattack_version={version!r}: choose one of {', '.join(VERSIONS)}")
    if attacks and version != "custom":
        raise ValueError(f"--autoattack_attacks: the {version} version runs its own attacks; add "
                         "--autoattack_version custom")
    if version == "custom" and not attacks:
        raise ValueError("--autoattack_version custom: name its attacks with --autoattack_attacks, from "
                         + ",".join(ATTACKS))
    bad = [a for a in attacks or () if a not in ATTACKS]
    if bad:
        raise ValueError(f"--autoattack_attacks: {bad[0]!r} is not one of {', '.join(ATTACKS)}")
    runs = tuple(attacks) if version == "custom" else standard_attacks(version)
    if n_classes < DLR_MIN_CLASSES and any(a in DLR_ATTACKS for a in runs):
        raise ValueError(f"--autoattack: {' and '.join(a for a in runs if a in DLR_ATTACKS)} need at least "
                         f"{DLR_MIN_CLASSES} classes and this dataset has {n_classes}; run --autoattack_version "
                         "custom --autoattack_attacks apgd-ce,fab-t,square")
    return Protocol(version, runs, float(eps_px), seed, n_points, batch_size, min(MAX_TARGETS, n_classes - 1))


def standard_attacks(version):
    """The attacks a version runs, in order, as the library sets them."""
    return tuple(build(torch.nn.Identity(), 1.0, version, None, 0, "cpu", MAX_TARGETS + 1).attacks_to_run)


def build(model, eps, version, attacks, seed, device, n_classes):
    """pyautoattack's AutoAttack, configured by the version as the library does; with fewer than 10 classes the
    targeted attacks take every other class as a target."""
    from pyautoattack import AutoAttack

    with quiet_library():
        adversary = AutoAttack(model, attacks=list(attacks) if version == "custom" else None, device=device,
                               eps=eps, norm="Linf", seed=seed, version=version)
    n_targets = min(MAX_TARGETS, n_classes - 1)
    adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, n_targets)
    adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, n_targets)
    return adversary


class quiet_library:
    """Within it, the library's records reach `handler` alone (or nothing), at every level."""

    def __init__(self, handler=None):
        self.logger, self.handler = logging.getLogger(LIBRARY_LOGGER), handler

    def __enter__(self):
        self.saved = self.logger.level, self.logger.propagate, list(self.logger.handlers)
        self.logger.setLevel(logging.DEBUG)
        self.logger.propagate = False
        self.logger.handlers = [self.handler or logging.NullHandler()]
        return self

    def __exit__(self, *exc):
        level, self.logger.propagate, self.logger.handlers = self.saved
        self.logger.setLevel(level)


class Reporter(logging.Handler):
    """The library's records as our log lines: each distinct warning once, as 'warning: AutoAttack: ...' (its
    checks: randomness, softmax output, zero gradients, classes, Square's success), and off a terminal a progress
    line (attack, points done, robust so far, ETA of the attack) at most every `every_s` seconds."""

    def __init__(self, log, n_points, every_s):
        super().__init__(logging.DEBUG)
        self.log, self.n_points, self.warned = log, n_points, set()
        self.lines, self.every_s = None, every_s

    def start(self, attack, n_attacked, n_robust):
        self.attack, self.n_attacked, self.n_robust, self.done = attack, n_attacked, n_robust, 0
        self.lines = utils.ProgressLines(self.every_s)

    def emit(self, record):
        message = record.getMessage()
        if record.levelno >= logging.WARNING and message not in self.warned:
            self.warned.add(message)
            self.log.warning(f"warning: AutoAttack: {message}")
        match = BATCH_RECORD.match(message)
        if match and self.lines:
            self.done += int(match[5])
            self.n_robust -= int(match[4])
            if self.lines.due(self.done, self.n_attacked):
                eta = self.lines.eta(self.done, self.n_attacked)
                self.log.info(f"AutoAttack {self.attack}: {self.done:,}/{self.n_attacked:,} points, robust so far "
                              f"{100 * self.n_robust / self.n_points:.2f}%, ETA {eta}")


def weights_digest(model):
    """sha256 of the model's parameters and buffers: a resume file belongs to these weights alone."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def resume_path(folder, name, proto, digest):
    key = hashlib.sha256(json.dumps([proto.as_dict(), digest], sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(folder, f"autoattack-{name}-{key}.json")


def load_resume(path, n_points):
    """(attacks done, robust flags, accuracy after each) from a resume file, or a fresh start where there is none."""
    if path is None or not os.path.exists(path):
        return [], torch.ones(n_points, dtype=torch.bool), {}
    try:
        with open(path) as f:
            saved = json.load(f)
        return saved["attacks_done"], torch.tensor(saved["robust_flags"], dtype=torch.bool), saved["accuracy_after"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path}: not a readable AutoAttack resume file ({type(err).__name__}); delete it to "
                         "start that evaluation again") from None


def robust_flags(model, x, y, proto, device, state_path=None, stop=None, log=None, progress_every_s=60.0):
    """Per-example bool on the CPU: classified correctly under every attack of the protocol (the clean point
    included), as one call of the official run_standard_evaluation(x, y, batch_size) scores them. With state_path,
    each finished attack is recorded there and a later call continues after it; `stop()` true makes the next forward
    pass raise utils.StopRequested."""
    log = log or logging.getLogger(utils.LOGGER)
    done, robust, accuracy = load_resume(state_path, len(y))
    if done:
        log.info(f"AutoAttack: continuing after {', '.join(done)} ({100 * robust.float().mean():.2f}% robust), "
                 f"from {state_path}")
    adversary = build(model, proto.eps_px / 255, proto.version, proto.attacks, proto.seed, device, proto.n_targets + 1)
    reporter = Reporter(log, len(y), progress_every_s)
    with utils.stop_on_forward(model, stop), quiet_library(reporter):
        for attack in [a for a in proto.attacks if a not in done]:
            idx = robust.nonzero().flatten()
            if len(idx) == 0:
                break
            reporter.start(attack, len(idx), int(robust.sum()))
            started = time.time()
            adversary.attacks_to_run = [attack]  # the first attack's call also scores the clean points
            _, y_adv = adversary.run_standard_evaluation(x[idx], y[idx], batch_size=proto.batch_size)
            robust[idx] = y_adv.cpu() == y[idx].cpu()
            done.append(attack)
            accuracy[attack] = robust.float().mean().item()
            log.info(f"AutoAttack {attack}: robust {100 * accuracy[attack]:.2f}% ({len(idx):,} points attacked "
                     f"in {utils.duration(time.time() - started)})")
            if state_path:
                utils.atomic_write_text(json.dumps({"protocol": proto.as_dict(), "attacks_done": done,
                                                    "accuracy_after": accuracy,
                                                    "robust_flags": robust.tolist()}), state_path)
        from pyautoattack import checks
        checks.check_square_sr({"clean": 1.0, **accuracy}, logger=logging.getLogger(LIBRARY_LOGGER))
    return robust
