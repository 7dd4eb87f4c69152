"""bench.py runs end to end at toy size and prints every section (its figures are not checked: timings vary)."""
import bench


def test_benchmark_prints_every_method_and_both_evaluation_modes(capsys):
    bench.main(["--device=cpu", "--model=cnn", "--n_filters=4", "--image_size=8", "--batch_size=8", "--n_iters=1",
                "--rounds=1", "--eval_points=8", "--batch_size_eval=8", "--sections=methods,eval"])
    out = capsys.readouterr().out
    for name in bench.METHODS:
        assert f"| {name} |" in out
    assert "| every example, every restart |" in out and "| skip broken examples |" in out
    assert "share of wall time" in out
