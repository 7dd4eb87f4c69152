"""--cuda_graph's schedule of eager, captured and replayed iterations (training) and PGD restarts (evaluation), on
the CPU with a stand-in for CUDA graphs.

The stand-in keeps what a CUDA graph guarantees: capture runs nothing (its one run of the body is undone: BatchNorm
statistics, random state), and a replay redoes the captured computation on the graph's input tensors, writing the
gradients and the statistics into the tensors the capture produced. Against it, the graphed iterations must equal
eager ones exactly. (A real capture draws other random numbers; it runs only on a GPU.)"""
import contextlib
import copy
import dataclasses

import pytest
import torch
from test_attacks import faint_gradient_model

import attacks
import evaluation
import methods
import models
import utils
from bench import method_args


class FakeStream:
    def wait_stream(self, other):
        pass


def patch_streams(monkeypatch):
    """torch.cuda's stream API as no-ops: on the CPU every stream is the one stream."""
    monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", FakeStream)


@pytest.fixture
def graphs(monkeypatch):
    """Patch torch.cuda's graph and stream API with the stand-in; returns the captured graphs and replay count."""
    log = {"captured": [], "replays": 0}

    class Graph:
        def replay(self):
            log["replays"] += 1
            params = list(self.steps.model.parameters())
            held = [p.grad for p in params]  # a replay writes its own tensors and leaves the attributes alone
            for p, grad in zip(params, self.grads, strict=True):
                p.grad = grad.zero_()  # a replay overwrites the graph's tensors; the backward accumulates
            for static, value in zip(self.steps.stats.values(), self.run().values(), strict=True):
                static.copy_(value)
            for p, grad in zip(params, held, strict=True):
                p.grad = grad

    @contextlib.contextmanager
    def capture(graph):
        steps = graph.steps = log["owner"]
        graph.run, key = steps.captured, steps.previous
        state, rng = copy.deepcopy(steps.model.state_dict()), torch.get_rng_state()
        yield
        graph.grads = [p.grad for p in steps.model.parameters()]
        steps.model.load_state_dict(state)
        torch.set_rng_state(rng)
        if log.get("fail"):
            raise RuntimeError("CUDA error: out of memory\nmore lines")
        log["captured"].append(key)

    patch_streams(monkeypatch)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", capture)
    return log


def setup(preset):
    torch.manual_seed(0)
    model = models.PreActResNet((1, 1, 1, 1), 10, 3, 8, widths=(4, 4, 8, 8))
    model.apply(models.init_weights)
    args = method_args(f"--preset={preset}", "--model=resnet18 --eps=8", torch.device("cpu"))
    models.configure_double_backward(model, args, methods.uses_double_backprop(args))
    return model, methods.TrainingStep(model, methods.StepSettings.from_flags(args), args.device)


@pytest.mark.parametrize("preset", ["fgsm", "gradsum", "gradalign"])
def test_graphed_iterations_equal_eager_ones(graphs, preset):
    """Radii r1 four times (eager, eager and capture, replay, replay), r2 once (eager, as an epoch's last partial
    batch: the parameters get other .grad tensors, r1's graph stays), r1 twice (replays), r2 three times (eager,
    eager and capture replacing r1's graph, replay)."""
    r1, r2 = (methods.StepRadii(eps=e, fgsm_eps=e, pgd_eps=e, fgsm_alpha=1.0, reg_eps=e) for e in (8 / 255, 4 / 255))
    compare_with_eager(graphs, preset, [r1] * 4 + [r2] + [r1] * 2 + [r2] * 3)
    assert [key[2] for key in graphs["captured"]] == [r1, r2] and graphs["replays"] == 5


def test_failed_capture_goes_on_eagerly(graphs, caplog):
    """A capture that raises: one warning naming the first line of the error, and every iteration eager."""
    graphs["fail"] = True
    r = methods.StepRadii(eps=8 / 255, fgsm_eps=8 / 255, pgd_eps=8 / 255, fgsm_alpha=1.0, reg_eps=8 / 255)
    compare_with_eager(graphs, "gradsum", [r] * 5)
    assert graphs["captured"] == [] and graphs["replays"] == 0
    warned = [rec.getMessage() for rec in caplog.records if "--cuda_graph" in rec.getMessage()]
    assert len(warned) == 1 and "(CUDA error: out of memory)" in warned[0]


def compare_with_eager(graphs, preset, schedule):
    """Run the schedule of radii eagerly and through GraphedSteps (same seeds): equal statistics and models."""
    g = torch.Generator().manual_seed(1)
    batches = [(torch.rand(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in schedule]
    eager_model, eager = setup(preset)
    graphed_model, graphed = setup(preset)
    steps = graphs["owner"] = methods.GraphedSteps(graphed)
    torch.manual_seed(2)
    eager_stats = [eager(x, y, r) for (x, y), r in zip(batches, schedule, strict=True)]
    torch.manual_seed(2)
    graphed_stats = [{k: v.clone() for k, v in steps(x, y, r).items()} for (x, y), r in zip(batches, schedule,
                                                                                              strict=True)]
    for eager, graphed in zip(eager_stats, graphed_stats, strict=True):
        assert all(torch.equal(eager[k], graphed[k]) for k in eager)
    for name, value in eager_model.state_dict().items():
        assert torch.equal(value, graphed_model.state_dict()[name]), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a GPU")
@pytest.mark.parametrize("half", [False, True])
def test_real_cuda_graph_trains_as_eager(half, monkeypatch):
    """On a GPU, cuDNN deterministic and no TF32 (else two eager runs of this small network drift apart by 2% in six
    iterations): FGSM from zero (no random draws), a smaller batch after the capture, graphed and eager give the
    same parameters exactly; GradSum's graphed iterations keep a finite, non-zero term and loss scale."""
    for flag, value in (("benchmark", False), ("deterministic", True), ("allow_tf32", False)):
        monkeypatch.setattr(torch.backends.cudnn, flag, value)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    device = torch.device("cuda")
    x, y = torch.rand(32, 3, 8, 8, device=device), torch.randint(0, 10, (32,), device=device)
    r = methods.StepRadii(eps=8 / 255, fgsm_eps=8 / 255, pgd_eps=8 / 255, fgsm_alpha=1.0, reg_eps=8 / 255)
    precision = " --half_prec --cuda_graph" if half else " --cuda_graph"
    results = []
    for graphed in (False, True):
        torch.manual_seed(0)
        model = models.PreActResNet((1, 1, 1, 1), 10, 3, 8, widths=(8, 16, 32, 64)).to(device)
        model.apply(models.init_weights)
        args = method_args(f"--preset=fgsm{precision}", "--model=resnet18 --eps=8", device)
        settings = methods.StepSettings.from_flags(args)
        step = methods.TrainingStep(model, settings if graphed else dataclasses.replace(settings, cuda_graph=False),
                                    device)
        for n in (32, 32, 32, 16, 32, 32):  # eager, capture, replay, eager (other shape), replay, replay
            step(x[:n], y[:n], r)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    assert torch.equal(results[0], results[1])
    model = models.PreActResNet((1, 1, 1, 1), 10, 3, 8, widths=(8, 16, 32, 64)).to(device)
    args = method_args(f"--preset=gradsum{precision}", "--model=resnet18 --eps=8", device)
    models.configure_double_backward(model, args, True)
    step = methods.TrainingStep(model, methods.StepSettings.from_flags(args), device)
    terms = [step(x, y, r)["gis"].item() for _ in range(8)]
    assert step.graphed.graph is not None and all(0 < t < float("inf") for t in terms)
    assert not half or step.scaler.get_scale() >= 2.0 ** 10


@pytest.fixture
def restart_graphs(monkeypatch):
    """Patch utils.capture_graph with a stand-in: its outputs hold garbage until a replay reruns the function on the
    captured inputs, in the precision of the capture (a graph's kernels are fixed), and writes them; the side stream
    is a no-op. Returns the counts of captures and replays."""
    log = {"captures": 0, "replays": 0}

    class Graph:
        def __init__(self, fn, args, outputs):
            self.fn, self.args, self.outputs = fn, args, outputs
            self.autocast = torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")

        def replay(self):
            log["replays"] += 1
            enabled, dtype = self.autocast
            with torch.autocast("cpu", dtype=dtype, enabled=enabled):
                for static, value in zip(self.outputs, self.fn(*self.args), strict=True):
                    static.copy_(value)

    def capture_graph(fn, *args):
        if log.get("fail"):
            return None, "CUDA error: out of memory"
        log["captures"] += 1
        outputs = [torch.full_like(t, True) if t.dtype == torch.bool else torch.full_like(t, float("nan"))
                   for t in fn(*args)]
        return Graph(fn, args, outputs), outputs

    monkeypatch.setattr(utils, "capture_graph", capture_graph)
    patch_streams(monkeypatch)
    return log


def eval_model(seed, device="cpu"):
    """A small PreActResNet, initialised on the CPU (the same weights on every device)."""
    torch.manual_seed(seed)
    model = models.PreActResNet((1, 1, 1, 1), 10, 3, 8, widths=(4, 4, 8, 8)).apply(models.init_weights)
    return model.to(device).eval()


def eval_points(model, n, device="cpu"):
    """n images, the even ones labelled as the model predicts (attacked at every restart) and the odd ones otherwise
    (lost at the first: later restarts attack a smaller subset)."""
    x = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, torch.where(torch.arange(n, device=device) % 2 == 0, y, (y + 1) % 10)


def compare_evaluations(model, restart, x, y, seeds, loss_scale=1.0):
    """pgd_eval with attacks.pgd_restart and with restart (same seeds): the same three results exactly."""
    for seed in seeds:
        results = []
        for fn in (attacks.pgd_restart, restart):
            torch.manual_seed(seed)
            results.append(attacks.pgd_eval(model, x, y, 8 / 255, 2 / 255, 3, 4, restart=fn, loss_scale=loss_scale))
        assert all(torch.equal(a, b) for a, b in zip(*results, strict=True)), seed


@pytest.mark.parametrize("max_rows, captured", [(40, {40, 24}), (32, {24})])
def test_graphed_restarts_evaluate_as_eager_ones(restart_graphs, monkeypatch, max_rows, captured):
    """Three evaluations of 40 points (the first restart on all 40, the later ones on 20 padded to 24), new weights
    loaded, three more: the same results as eager restarts; graphs for the shapes of at most GRAPH_MAX_ROWS rows,
    each captured at its second restart and replayed at every later one."""
    monkeypatch.setattr(attacks, "ACTIVE_BUCKET", 8)
    monkeypatch.setattr(evaluation, "GRAPH_MAX_ROWS", max_rows)
    model = eval_model(0)
    x, y = eval_points(model, 40)
    graphed, sizes = evaluation.GraphedRestarts(model), []
    restart = lambda m, x, *a: (sizes.append(len(x)), graphed(m, x, *a))[1]  # noqa: E731
    compare_evaluations(model, restart, x, y, range(3))
    model.load_state_dict(eval_model(1).state_dict())
    compare_evaluations(model, restart, x, y, range(3, 6))
    assert {key[0][0] for key in graphed.graphs} == captured and set(sizes) == {40, 24}
    assert restart_graphs["replays"] == sum(sizes.count(n) - 2 for n in captured)


def test_graphed_restarts_follow_autocast_and_the_loss_scale(restart_graphs):
    """Evaluations in fp32, then under fp16 autocast (a periodic evaluation under --half_prec) at a loss scale that
    lets tiny input gradients through and at one that does not: the eager results each time, from one graph per
    precision, the loss scale being one of its inputs."""
    model = faint_gradient_model()
    x, y = eval_points(model, 32)
    graphed = evaluation.GraphedRestarts(model)
    compare_evaluations(model, graphed, x, y, range(2))
    with torch.autocast("cpu", dtype=torch.float16):
        for loss_scale in (2.0**11, 1.0, 2.0**11):
            compare_evaluations(model, graphed, x, y, range(2), loss_scale)
    assert {key[-1] for key in graphed.graphs} == {False, torch.float16} and restart_graphs["replays"] > 0


def test_failed_restart_capture_goes_on_eagerly(restart_graphs, caplog):
    restart_graphs["fail"] = True
    model = eval_model(0)
    x, y = eval_points(model, 16)
    graphed = evaluation.GraphedRestarts(model)
    compare_evaluations(model, graphed, x, y, range(3))
    assert graphed.graphs == {} and restart_graphs["replays"] == 0
    warned = [rec.getMessage() for rec in caplog.records if "--cuda_graph" in rec.getMessage()]
    assert len(warned) == 1 and "(CUDA error: out of memory)" in warned[0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA graph needs a GPU")
@pytest.mark.parametrize("half", [False, True])
def test_real_cuda_graph_restarts_evaluate_as_eager(half, monkeypatch):
    """On a GPU (cuDNN deterministic, no TF32), in fp32 and under fp16 autocast at a loss scale: graphed restarts give
    the eager results exactly, and follow weights loaded in place after their capture."""
    for flag, value in (("benchmark", False), ("deterministic", True), ("allow_tf32", False)):
        monkeypatch.setattr(torch.backends.cudnn, flag, value)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(attacks, "ACTIVE_BUCKET", 16)
    model = eval_model(0, "cuda")
    x, y = eval_points(model, 64, "cuda")
    graphed, loss_scale = evaluation.GraphedRestarts(model), 2.0**10 if half else 1.0
    with torch.autocast("cuda", dtype=torch.float16, enabled=half, cache_enabled=False):
        compare_evaluations(model, graphed, x, y, range(4), loss_scale)
        assert len(graphed.graphs) == 2 and graphed.failure is None
        model.load_state_dict(eval_model(1, "cuda").state_dict())
        compare_evaluations(model, graphed, x, y, range(4, 8), loss_scale)
