"""bench.py runs end to end at toy size and prints every section (its figures are not checked: timings vary)."""
import bench


def test_benchmark_prints_every_method_and_both_evaluation_modes(capsys):
    bench.main(["--device=cpu", "--model=cnn", "--n_filters=4", "--image_size=8", "--batch_size=8", "--n_iters=1",
                "--rounds=1", "--eval_points=8", "--batch_size_eval=8", "--sections=methods,eval", "--half_prec",
                "--amp_dtype=bfloat16", "--channels_last"])
    out = capsys.readouterr().out
    for name in bench.METHODS:
        assert f"| {name} |" in out
    assert "| every restart on every example |" in out and "| skip examples whose loss > ln K |" in out
    assert "device cpu" in out and "torch " in out
    assert "share of wall time" in out
