"""python -m mini build [--out DIR] [--small] [--seed N] [--threads N]
python -m mini build-flow [--world DIR] [--out DIR] [--small] [--seed N] [--threads N]
(the RIL experiment on this world: python -m experiments.ril)"""
from __future__ import annotations

import sys
from pathlib import Path

from cli import Parser, UsageError, command

from . import FLOW, WORLD


@command("python -m mini")
def main(argv=None) -> int:
    p = Parser(prog="python -m mini", description="The mini world: a CPU-scale text-to-image world for rid.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    b = sub.add_parser("build", help="train and write every mini-world artifact (seeded)",
                       description="Render the domain, train the VAE, the domain CLIP, the aesthetic MLP, the hps "
                                   "model (the CLIP fine-tuned on preference pairs) and the UNet + text encoder, "
                                   "check them, and write the artifacts "
                                   "(see mini/build.py). The full build takes 29 min wall on 2 CPU cores; world.json records the times.")
    b.add_argument("--out", type=Path, default=WORLD,
                   help=f"output directory, replaced if it holds a previous build (default: {WORLD})")
    b.add_argument("--small", action="store_true",
                   help="reduced build (same architectures, a few steps each; seconds) for tests")
    f = sub.add_parser("build-flow", help="train the flow world: an SD3-architecture model on the mini world (seeded)",
                       description="Train a small SD3Transformer2DModel with the rectified-flow objective on the mini "
                                   "world's domain, with the world's VAE, text encoder and tokenizer, check it, and "
                                   "write a StableDiffusion3Pipeline directory with flow.json (see mini/flow_build.py). "
                                   "About 25 min wall on 2 CPU cores; flow.json records the times.")
    f.add_argument("--world", type=Path, default=WORLD,
                   help=f"the mini world whose VAE, text encoder, tokenizer, prompts and reward models it uses "
                        f"(default: {WORLD})")
    f.add_argument("--out", type=Path, default=FLOW,
                   help=f"output directory, replaced if it holds a previous flow build (default: {FLOW})")
    f.add_argument("--small", action="store_true",
                   help="reduced build (same architecture, a few steps; seconds) for tests")
    for q in (b, f):
        q.add_argument("--seed", type=int, default=0, help="seed of every random choice (default: 0)")
        q.add_argument("--threads", type=int, default=None,
                       help="torch CPU threads (default: torch's choice; 1 is fastest on a contended machine)")
    args = p.parse_args(argv)

    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads {args.threads}: must be >= 1")
    try:
        if args.command == "build":
            from .build import BuildConfig, build, small_config
            build(args.out, small_config(args.seed) if args.small else BuildConfig(seed=args.seed), threads=args.threads)
        else:
            from .flow_build import FlowConfig, build_flow, small_flow_config
            cfg = small_flow_config(args.seed) if args.small else FlowConfig(seed=args.seed)
            build_flow(args.out, args.world, cfg, threads=args.threads)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
