"""train.py --estimate: how often each piece runs (against a real run's rows), what it prints, what it writes."""
import os
import re
import shlex

import pytest
from test_train import TINY_RUN

import estimate
import train
import utils


@pytest.mark.parametrize("flags", ["--eval_iter_freq=3", "--eval_iter_freq=2 --start_eval_epoch=1",
                                   "--eval_iter_freq=5 --epochs=3", "--eval_iter_freq=1 --minibatch_replay=2"])
def test_periodic_evaluations_are_counted_as_the_run_makes_them(flags, tmp_path, tiny_data):
    args = shlex.split(f"{TINY_RUN} --data_dir={tiny_data} --out_dir={tmp_path} --run_name=run {flags}")
    assert train.main(args) == 0
    rows = utils.read_jsonl(tmp_path / "run" / "metrics.jsonl")
    parsed, _, _, _ = train.prepare(args)
    n_batches = 3  # 48 images in batches of 16
    assert estimate.count_periodic(parsed, n_batches) == sum(r["kind"] == "periodic" for r in rows)


def test_estimate_prints_the_projection_and_writes_nothing(tmp_path, tiny_data, capsys):
    args = shlex.split(f"{TINY_RUN} --data_dir={tiny_data} --out_dir={tmp_path / 'runs'} --epochs=4 --estimate")
    assert train.main(args) == 0
    captured = capsys.readouterr()
    out, err = captured.out.splitlines(), captured.err
    assert out[0].startswith("projected wall time: ") and "not a measured run" in out[0]
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in out if line.startswith("| ") and
            not line.startswith("| piece") and not line.startswith("|---")}
    counts = {piece: int(cells[0].replace(",", "")) for piece, cells in rows.items()}
    # 4 epochs of 3 batches and epoch 0's step; evaluations at iterations 3, 6, 9, 12; 3 models of 12 points
    assert counts == {"training iteration": 13, "periodic evaluation": 4, "final evaluation point": 36,
                      "checkpoint": 5, "start-up (data, model)": 1}
    total = sum(float(cells[2]) for cells in rows.values())
    projected = int(out[0].split()[3])
    assert abs(total - projected) <= len(rows)  # the pieces add up to the total (each rounded)
    ranges = [line for line in out if line.startswith(("the periodic evaluations: ", "the final evaluation: "))]
    assert len(ranges) == 2 and all("the middle of" in line and "no example skipped" in line for line in ranges)
    low, high = (int(v) for v in re.search(r"the run's wall time lies between (\d+) and (\d+) s", "\n".join(out))
                 .groups())
    assert low - 1 <= projected <= high + 1  # the middles inside the ranges (each rounded)
    for piece in ("20 training iterations", "the periodic evaluation (16 test, 16 training points)",
                  "the final evaluation on 8 test points", "one checkpoint"):
        assert f"train.py: --estimate: timing {piece}" in err, (piece, err)
    assert not os.path.exists(tmp_path / "runs")
