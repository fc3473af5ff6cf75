"""python -m mini build [--out DIR] [--small] [--seed N] [--threads N]
python -m mini experiment [--methods rid,baseline] [--seeds 0,1,2] ..."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import WORLD


class _Parser(argparse.ArgumentParser):
    def error(self, message):                     # one line, exit code 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv=None) -> int:
    p = _Parser(prog="python -m mini", description="The mini world: a CPU-scale text-to-image world for rid.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    b = sub.add_parser("build", help="train and write every mini-world artifact (seeded)",
                       description="Render the domain, train the VAE, the domain CLIP, the aesthetic MLP, the hps "
                                   "model (the CLIP fine-tuned on preference pairs) and the UNet + text encoder, "
                                   "check them, and write the artifacts "
                                   "(see mini/build.py). The full build takes 29 min wall on 2 CPU cores; world.json records the times.")
    b.add_argument("--out", type=Path, default=WORLD,
                   help=f"output directory, replaced if it holds a previous build (default: {WORLD})")
    b.add_argument("--small", action="store_true",
                   help="reduced build (same architectures, a few steps each; seconds) for tests")
    b.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
    b.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is fastest on a contended machine)")
    sub.add_parser("experiment", add_help=False,
                   help="the RIL experiment: methods x seeds of train.py + one eval.py -> docs/mini_results.md "
                        "(see python -m mini experiment --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["experiment"]:
        from .experiment import main as experiment
        return experiment(argv[1:])
    args = p.parse_args(argv)

    from .build import BuildConfig, build, small_config
    if args.threads is not None and args.threads < 1:
        b.error(f"--threads {args.threads}: must be >= 1")
    cfg = small_config(args.seed) if args.small else BuildConfig(seed=args.seed)
    try:
        build(args.out, cfg, threads=args.threads)
    except ValueError as e:
        b.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
