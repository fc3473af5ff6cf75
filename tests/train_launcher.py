"""train.py in a separate process with test doubles, for tests that need one (a hard crash, torchrun):

    python tests/train_launcher.py [--reward MODULE:FN] [--die-after-step N] -- TRAIN_ARGS...

--reward replaces every task's reward with MODULE:FN (the tiny test models have no CLIP weights);
--die-after-step N ends the process with os._exit(17) as optimizer step N+1 starts, i.e. after step N
and its checkpoint were written: a hard crash, nothing flushed, no clean-up. The product has no hooks
for either; this file patches train.py's own functions.
"""
import argparse
import importlib
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import rid  # noqa: E402
import train  # noqa: E402


def main() -> int:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="train_launcher.py")
    p.add_argument("--reward")
    p.add_argument("--die-after-step", type=int)
    own = p.parse_args(argv[:split])
    if own.reward:
        module, _, name = own.reward.partition(":")
        fn = getattr(importlib.import_module(module), name)
        train.reward_fn = lambda task, cfg: fn
    if own.die_after_step is not None:
        steps, train_step = [0], rid.train_step

        def counting_step(*args, **kwargs):
            if steps[0] == own.die_after_step:
                os._exit(17)
            steps[0] += 1
            return train_step(*args, **kwargs)

        rid.train_step = counting_step
    return train.main(argv[split + 1:])


if __name__ == "__main__":
    sys.exit(main())
