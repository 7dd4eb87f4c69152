"""bench.py runs end to end at toy size and prints every section (its timings are not checked: they vary); its
operator count counts what it says."""
import re

import pytest
import torch

import bench
import data


def test_benchmark_prints_every_method_and_both_evaluation_modes(capsys):
    bench.main(["--device=cpu", "--model=cnn", "--n_filters=4", "--image_size=8", "--batch_size=8", "--n_iters=1",
                "--rounds=1", "--eval_points=8", "--batch_size_eval=8", "--sections=methods,ops,eval", "--half_prec",
                "--amp_dtype=bfloat16", "--channels_last"])
    out = capsys.readouterr().out
    for name in bench.METHODS:
        assert out.count(f"| {name} |") == 2  # a time and an operator count
    assert "| every restart on every example |" in out and "| skip examples whose loss > ln K |" in out
    assert "device cpu" in out and "torch " in out
    assert "share of wall time" in out and "training PGD" in out


def test_evaluation_sections_get_uint8_images_as_train_py_gives_them(capsys, monkeypatch):
    """data.eval_batches divides by 255: both evaluation sections must hand it the uint8 images (floats in [0, 1]
    were divided twice, and every evaluation figure was taken on near-black images)."""
    seen, original = [], data.eval_batches
    monkeypatch.setattr(data, "eval_batches", lambda x, *a: (seen.append(x), original(x, *a))[1])
    bench.main(["--device=cpu", "--model=cnn", "--n_filters=4", "--image_size=8", "--eval_points=16",
                "--batch_size_eval=8", "--sections=eval"])
    assert re.search(r"eager: .* \(test clean 100\.00%", capsys.readouterr().out)  # the labels are its predictions
    # the final evaluation in its 3 modes; the periodic one eager and batched, twice each, on test and training points
    assert len(seen) == 3 + 2 * 2 * 2 and all(x.dtype == torch.uint8 and x.max() > 1 for x in seen)


def test_operator_count_skips_views_allocations_and_non_tensors():
    x = torch.ones(2, 3)
    with bench.OperatorCount() as count:
        y = (x + 1).view(-1)  # add: 1; view: 0
        torch.empty(4)  # 0
        torch.promote_types(torch.float16, torch.float32)  # no tensor: 0
        torch.ops.aten.native_batch_norm(x[None], None, None, None, None, True, 0.1, 1e-5)  # 3 outputs: 1
        (y * 2).sum()  # mul, sum: 2
    assert count.n == 4


@pytest.mark.parametrize("flags, named", [("--sections=method", "--sections='method'"),
                                          ("--cuda_graph", "--cuda_graph")])
def test_bad_flags_exit_with_one_line(flags, named):
    with pytest.raises(SystemExit, match=named):
        bench.main(["--device=cpu", flags])
