"""bench.py end to end on the tiny SD: every part validates its variants against each other before timing
(the adapter group changes the UNet's output, both steps move the adapters) and prints its ratio. The
timer is replaced by fixed medians, so each printed ratio is checked against the quotient of the medians
it was given, and the UNet calls and VAE decodes it counts against the methods' algorithms."""
import re

import pytest

import bench

# fixed "medians" (ms) per variant: the ratios below are their quotients, whatever the machine's load
FAKE_MS = {"baseline": 40.0, "rid": 50.0, "plain": 8.0, "group": 11.0, "wrapped": 9.0, "draft": 20.0, "r0": 23.0,
           "compress": 10.0, "jpeg-kb": 13.0}
RATIOS = {"rid / baseline": 50 / 40, "group / plain": 11 / 8, "wrapped / plain": 9 / 8, "r0 / draft": 23 / 20,
          "surrogate / compress": 13 / 10}  # jpeg-kb adapts every step (SurrogateConfig's default): no amortising


def test_every_part_runs_and_prints_its_ratio(sd_path, capsys, monkeypatch):
    ran = []

    def fixed_medians(fns, reps):
        for fn in fns.values():  # every variant still runs once
            fn()
        ran.extend(fns)
        return {k: FAKE_MS[k] for k in fns}

    monkeypatch.setattr(bench, "_interleaved_ms", fixed_medians)
    assert bench.main(["--model", sd_path, "--steps", "2", "--batch", "1", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert sorted(ran) == sorted(FAKE_MS)
    for ratio, want in RATIOS.items():
        m = re.search(re.escape(ratio) + r" = ([0-9.]+)", out)
        assert m and float(m.group(1)) == pytest.approx(want, abs=5e-4), (ratio, out)
    # part 1: 2 DDIM steps; rid adds one UNet call (the teacher's last step) and one decode (its image)
    calls = {m: re.search(rf"{m}\s+[0-9.]+ ms/step\s+UNet calls\s+(\d+) \(CFG-batched\)\s+VAE decodes (\d+)", out)
             for m in ("baseline", "rid")}
    assert [tuple(map(int, calls[m].groups())) for m in ("baseline", "rid")] == [(2, 1), (3, 2)], out
    assert "extra per step: 1 UNet call, 1 VAE decode" in out
    # part 4: K = 4 steps, each one CFG-batched UNet call, one decode, for both methods
    assert "both 4 CFG-batched UNet calls and 1 VAE decode" in out


@pytest.mark.parametrize("argv,words", [(["--sd15", "100"], "--sd15 100"), (["--reps", "0"], "--reps 0")])
def test_bad_flags_exit_2_with_one_line(argv, words, capsys):
    assert bench.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
