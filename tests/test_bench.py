"""bench.py end to end on the tiny SD: every part validates its variants against each other before timing
(the adapter group changes the UNet's output, both steps move the adapters) and prints its ratio."""
import re

import pytest

import bench


def test_every_part_runs_and_prints_its_ratio(sd_path, capsys):
    assert bench.main(["--model", sd_path, "--steps", "2", "--batch", "1", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    for ratio in ("rid / baseline", "group / plain", "wrapped / plain", "surrogate / compress"):
        m = re.search(re.escape(ratio) + r" = ([0-9.]+)", out)
        assert m and float(m.group(1)) > 0, (ratio, out)


@pytest.mark.parametrize("argv,words", [(["--sd15", "100"], "--sd15 100"), (["--reps", "0"], "--reps 0")])
def test_bad_flags_exit_2_with_one_line(argv, words, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and words in err[0], err
