"""SD-1.5 at its real size with random weights, no download: the paper's scale, run on a CPU.

    python -m experiments.sd15 build DIR     DIR/model: a diffusers directory shaped exactly like SD-1.5 (UNet
                                             860 M, VAE, CLIP ViT-L/14 text encoder, CLIP's own 49408-token
                                             BPE tokenizer); DIR/rewards: open_clip ViT-L-14 + the LAION MLP
                                             (aesthetic, the CLIP metric) and ViT-H-14 (hps), and their spec
    python -m experiments.sd15 run DIR       the real CLIs on it: one optimizer step of every method
                                             (train.py --model DIR/model --reward-spec ...), eval.py of one
                                             stage, a soup, and checkpoint.export_lora loaded by diffusers'
                                             load_lora_weights against rid's own forward; peak RSS per
                                             process → DIR/dry_run.json and, with --doc, a markdown table

At `--resolution 64` and 2 DDIM steps (the defaults) a step of each method takes seconds to a minute on
2 cores; `--resolution 256` or `512` measure memory at the sizes people train at. Every number is the
process's peak resident memory (fp32 on CPU, a proxy for GPU memory: the same tensors). The weights are
random, so rewards and metrics mean nothing here: the run checks shapes, dtypes, file formats and
plumbing at SD-1.5's size (tests/test_sd15.py runs it when RID_SD15_DRY_RUN=1).
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from experiments.common import ROOT, Parser, logger

PROG = "python -m experiments.sd15"

# SD-1.5's published configs (stable-diffusion-v1-5/stable-diffusion-v1-5: unet/, vae/, text_encoder/ config.json)
UNET = dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, sample_size=512, layers_per_block=2,
           block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
TEXT = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
            max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True)
LAION_DIMS = (1024, 128, 64, 16)  # the aesthetic MLP on 768-d ViT-L/14 features
PARAMS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}  # SD-1.5's, the build's oracle


def clip_tokenizer(out: Path):
    """CLIP's own tokenizer, built from the BPE open_clip ships: the 256 byte tokens, the same with </w>,
    the 48894 merges in rank order, <|startoftext|>, <|endoftext|> = 49408 tokens, as openai/clip-vit-large-patch14."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m.split()) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77, pad_token="<|endoftext|>")
    tok.save_pretrained(out)
    return tok


def build(d: Path, log) -> dict:
    """DIR/model and DIR/rewards; returns the parameter counts."""
    import open_clip
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from mini.models import AestheticMLP

    torch.manual_seed(0)
    t0 = time.time()
    tok = clip_tokenizer(d / "tokenizer-src")
    text = CLIPTextModel(CLIPTextConfig(**TEXT, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**VAE), text_encoder=text, tokenizer=tok,
                                   unet=UNet2DConditionModel(**UNET), scheduler=PNDMScheduler(**SCHEDULE),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    counts = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in PARAMS}
    pipe.save_pretrained(d / "model")
    del pipe
    log(f"model written ({', '.join(f'{k} {v / 1e6:.1f} M' for k, v in counts.items())}) in {time.time() - t0:.0f} s")
    r = d / "rewards"
    r.mkdir(parents=True, exist_ok=True)
    vit_l = open_clip.create_model("ViT-L-14")
    torch.save(vit_l.state_dict(), r / "clip_vit_l14.pt")
    counts["clip_vit_l14"] = sum(p.numel() for p in vit_l.parameters())
    del vit_l
    torch.save(AestheticMLP(768, LAION_DIMS).state_dict(), r / "aesthetic.pth")
    vit_h = open_clip.create_model("ViT-H-14")
    torch.save({"state_dict": vit_h.state_dict()}, r / "hps.pt")  # HPSv2's own layout
    counts["hps_vit_h14"] = sum(p.numel() for p in vit_h.parameters())
    del vit_h
    (r / "rewards.json").write_text(json.dumps({"clip_arch": "ViT-L-14", "clip_weights": "clip_vit_l14.pt",
                                                "aesthetic_head": "aesthetic.pth", "hps_arch": "ViT-H-14",
                                                "hps_weights": "hps.pt"}, indent=1))
    (d / "prompts.txt").write_text("a photo of a cat\na photo of a dog\na photo of a horse\na photo of a fox\n")
    log(f"reward weights written in {time.time() - t0:.0f} s total")
    return counts


def measured(cmd: list, log, env=None) -> dict:
    """Run a command in the repository root; its exit code, wall time and own peak RSS (os.wait4)."""
    log("$ " + " ".join(map(str, cmd)))
    t0 = time.time()
    p = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": p.returncode, "seconds": round(time.time() - t0, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            "tail": out.strip().splitlines()[-3:]}


def train_args(d: Path, out: Path, method: str, task: str, res: int, *extra) -> list:
    return [sys.executable, "train.py", "--model", d / "model", "--reward-spec", d / "rewards" / "rewards.json",
            "--prompts", d / "prompts.txt", "--tasks", task, "--method", method, "--steps", "2", "--batch", "1",
            "--max-steps", "1", "--resolution", str(res), "--device", "cpu", "--out", out, *extra]


def export_check(d: Path, run: Path, res: int) -> float:
    """checkpoint.export_lora of the run's stage, loaded by diffusers' load_lora_weights: the largest
    |ε_diffusers − ε_rid| on one input, relative to |ε|."""
    import torch
    from diffusers import StableDiffusionPipeline

    import checkpoint
    import rid

    models = rid.load_models(str(d / "model"))
    stage = sorted(p for p in run.iterdir() if p.name.startswith("stage1-"))[0]
    group = checkpoint.load(models.unet, stage)
    path = checkpoint.export_lora(group, str(run / "exported.safetensors"))
    pipe = StableDiffusionPipeline.from_pretrained(str(d / "model"), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(run), weight_name=Path(path).name)
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, res // 8, res // 8, generator=g)
    emb = torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        ours = models.unet(z, torch.tensor(501), encoder_hidden_states=emb).sample
        theirs = pipe.unet(z, torch.tensor(501), encoder_hidden_states=emb).sample
    return float((ours - theirs).abs().max() / ours.abs().max())


def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("build", "run"), help="build the directory, or run the CLIs on it")
    p.add_argument("dir", help="where the SD-1.5-shaped model and reward weights live")
    p.add_argument("--resolution", default="64", help="comma list of image sides for the method steps (default: 64)")
    p.add_argument("--methods", default=None, help="comma list of methods (default: every method of rid.METHODS)")
    p.add_argument("--checkpointing", action="store_true",
                   help="also run every method with --gradient-checkpointing (the memory table's second column)")
    p.add_argument("--doc", default=None, help="markdown table of the results to write (default: none)")
    args = p.parse_args(argv)
    log, d = logger(PROG), Path(args.dir).resolve()
    if args.what == "build":
        counts = build(d, log)
        (d / "build.json").write_text(json.dumps(counts, indent=1))
        return 0

    import rid

    if not (d / "model" / "unet").is_dir() or not (d / "rewards" / "rewards.json").is_file():
        p.error(f"{d} holds no built SD-1.5 dry-run directory; run `{PROG} build {args.dir}` first")
    try:
        sizes = [int(x) for x in args.resolution.split(",") if x]
    except ValueError:
        p.error(f"--resolution {args.resolution!r}: expected a comma list of integers, e.g. 64,256")
    if not sizes or any(s < 64 or s % 64 for s in sizes):
        p.error(f"--resolution {args.resolution!r}: every size must be a multiple of 64 (SD-1.5's VAE × UNet)")
    methods = args.methods.split(",") if args.methods else list(rid.METHODS)
    bad = [m for m in methods if m not in rid.METHODS]
    if bad:
        p.error(f"--methods {args.methods!r}: unknown {bad}; valid: {', '.join(rid.METHODS)}")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {"steps": [], "checks": {}}
    runs = d / "runs"
    for res in sizes:
        for m in methods:
            for ckpt in ([False, True] if args.checkpointing else [False]):
                if ckpt and m in ("rid", "baseline", "draft-lv", "refl"):
                    continue  # one gradient step: checkpointing saves nothing worth a row
                extra = ["--gradient-checkpointing"] if ckpt else []
                task = "aesthetic" if m != "r0" else "clip"
                out = runs / f"{m}-{res}{'-gc' if ckpt else ''}"
                r = measured(train_args(d, out, m, task, res, *extra), log, env)
                results["steps"].append({"method": m, "resolution": res, "checkpointing": ckpt, "task": task, **r})
                log(f"{m} @ {res}² {'(gc) ' if ckpt else ''}→ rc {r['rc']}, {r['seconds']} s, peak RSS {r['peak_rss_gb']} GB")
    res = sizes[0]
    rid_run, base_run = runs / f"rid-{res}", runs / f"baseline-{res}"
    results["checks"]["hps_step"] = measured(train_args(d, runs / f"rid-hps-{res}", "rid", "hps", res), log, env)
    results["checks"]["compress_step"] = measured(train_args(d, runs / f"baseline-compress-{res}", "baseline",
                                                             "compress", res), log, env)
    common = ["--max-prompts", "1", "--images-per-prompt", "2", "--steps", "2", "--resolution", str(res), "--device", "cpu"]
    results["checks"]["eval"] = measured([sys.executable, "eval.py", "--ckpt", rid_run, "--out", runs / "eval", *common],
                                         log, env)
    results["checks"]["soup"] = measured([sys.executable, "eval.py", "--soup", rid_run, base_run, "--out",
                                          runs / "eval-soup", *common], log, env)
    results["checks"]["export_rel_err"] = export_check(d, rid_run, res)
    (d / "dry_run.json").write_text(json.dumps(results, indent=1))
    failed = [s for s in results["steps"] if s["rc"]] + [v for v in results["checks"].values() if isinstance(v, dict) and v["rc"]]
    if args.doc:
        lines = ["| method | resolution | gradient checkpointing | peak RSS (GB) | seconds | exit |", "|---|---|---|---|---|---|"]
        for s in results["steps"]:
            lines.append(f"| {s['method']} | {s['resolution']} | {'yes' if s['checkpointing'] else 'no'} | "
                         f"{s['peak_rss_gb']} | {s['seconds']} | {s['rc']} |")
        Path(args.doc).write_text("\n".join(lines) + "\n")
    log(f"{len(failed)} failed; export through diffusers: relative error {results['checks']['export_rel_err']:.2e}; "
        f"results in {d / 'dry_run.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
