"""Memory of one training step at SD-1.5's size, for every method, without a GPU and without the weights.

    python -m experiments.memory                  → docs/sd15_memory.md (+ .json): 256² and 512², fp32 and bf16
    python -m experiments.memory --resolution 512 --methods rid,baseline --batches 1,2
    python -m experiments.memory --backbone all   → docs/backbone_memory.md: SDXL, SD3-Medium, SD3.5-Large and
                                                    FLUX.1-dev in bf16 (experiments.backbone_memory)

How: the SD-1.5 UNet, VAE and text encoder (experiments.sd15's published configs) and the reward models a
RIL run holds (open_clip ViT-L-14 + the LAION MLP for aesthetic, ViT-H-14 for hps) are built as *fake*
tensors (torch's FakeTensorMode: shapes, dtypes and devices, no storage), and rid.train_step, the real
code, runs one optimizer step on hps. A dispatch mode (memplan.PeakMemory, the counter train.py's
--micro-batch auto runs too) sees every tensor each op returns and adds its
storage's bytes while the storage lives; the peak of that sum is the step's peak of live tensor memory,
which is what torch.cuda.max_memory_allocated reports for the same step on a GPU (before the caching
allocator's fragmentation; the attention runs as SDPA, as on a GPU). Every value a Python branch reads
from a tensor is 1 (a finiteness check passes, AdamW's step is 1), which changes no tensor's size.
tests/test_memory.py checks the counter against hand-counted tensors, and the fake step against the
same step run for real on the mini world.

Micro-batch 1 and 2 give the fixed part (weights, optimizer, EMA) and the part per sample (activations);
the doc turns them into the largest micro-batch that fits 24, 40 and 80 GB. The paper ran RID at batch 8
on 2×A100 (micro-batch 4 per GPU if no accumulation).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

from cli import Parser, command
from experiments.common import ROOT, ints, logger, write_doc
from memplan import MARGIN, PeakMemory, fake_copy, fits, free_bytes, plan_micro_batch, step_memory, steps_for  # noqa: F401

PROG = "python -m experiments.memory"
GIB = 2 ** 30
FITS = (24, 40, 80)  # GB of the usual GPUs (the doc's columns; 1 GB = 10⁹ bytes as vendors count)
GC_METHODS = ("draft-k", "draft", "r0")  # more than one step with gradient: checkpointing changes their memory


def _fake_clip(arch: str, weights, device):
    """rewards.load_clip without a checkpoint: open_clip's own model class from its registered config."""
    import open_clip
    from open_clip.factory import get_model_config
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    import rewards

    cfg = get_model_config(arch)
    model = (open_clip.CustomTextCLIP if "hf_model_name" in cfg.get("text_cfg", {}) else open_clip.CLIP)(**cfg)
    set_model_preprocess_cfg(model, merge_preprocess_dict(PreprocessCfg(size=model.visual.image_size), {}))
    return rewards.freeze(model), open_clip.get_tokenizer(arch)


def _fake_head(path, device):
    import rewards
    from experiments.sd15 import LAION_DIMS
    from mini.models import AestheticMLP

    return rewards.freeze(rewards.mlp_from_state(AestheticMLP(768, LAION_DIMS).state_dict(), "random"))


def sd15_world(dtype: torch.dtype, tokenizer, tasks=("aesthetic", "hps")):
    """(rid.Models, {task: reward fn}, [reward modules]) at SD-1.5's size, built in the current mode
    (call it inside FakeTensorMode: no storage). The base in `dtype` (in bf16 the VAE in fp32: force_upcast),
    the reward models in fp32, as train.py."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import rid
    from experiments.sd15 import TEXT, UNET, VAE

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in it: Module.to() cannot swap fake parameters
    try:
        text = CLIPTextModel(CLIPTextConfig(**TEXT, bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        unet = UNet2DConditionModel(**UNET)
        # train.py's bf16: the VAE stays fp32 where its config says force_upcast (SD-1.5's: diffusers' default)
        vae_dtype = torch.float32 if dtype == torch.bfloat16 and VAE.get("force_upcast", True) else dtype
        torch.set_default_dtype(vae_dtype)
        vae = AutoencoderKL(**VAE)
    finally:
        torch.set_default_dtype(default)
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    unet.rid_base_model = "sd15-fake"
    fns, made = reward_world(tasks)
    return rid.Models(unet, vae, text, tokenizer), fns, made


def reward_world(tasks=("aesthetic", "hps")) -> tuple:
    """({task: reward fn}, [reward modules]): the reward models a RIL run holds (open_clip ViT-L-14 + the LAION
    MLP for aesthetic, ViT-H-14 for hps), fp32 and random (no checkpoint), built in the current mode."""
    import rewards

    made = []

    def clip(*a):
        model, tok = _fake_clip(*a)
        made.append(model)
        return model, tok

    def head(*a):
        made.append(_fake_head(*a))
        return made[-1]

    rewards.load_clip.cache_clear()
    with mock.patch.object(rewards, "load_clip", clip), mock.patch.object(rewards, "load_aesthetic_head", head), \
            mock.patch.object(rewards, "aesthetic_file", lambda spec: "random"), \
            mock.patch.object(rewards, "hps_file", lambda spec: "random"):
        fns = {t: rewards.get(t) for t in tasks}
    return fns, made


def _cpu_sdpa_flops(query, key, value, *args, out_shape=None, **kw) -> int:
    """FlopCounterMode counts the CUDA attention kernels; on CPU SDPA runs as its own op: the same count."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kw) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad_out, query, key, value)


def step_flops(models, reward_fn, method: str, batch: int, steps: int, rank: int = 4, frozen_tasks: int = 2) -> dict:
    """FLOPs of one rid.train_step (one micro-batch of `batch` prompts, `steps` DDIM steps) as
    torch.utils.flop_counter counts them (matmuls, convolutions, attention; 2 per multiply-add;
    elementwise ops not counted) -> {"total", "unet_call"}: unet_call = one CFG-batched UNet forward."""
    import rid
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
               aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops}
    group = rid.group_of(models.unet) or rid.inject(models.unet, rank=rank)
    group.clear()
    for k in range(frozen_tasks):
        group.add_task(f"t{k}")
    group.add_task("current")
    opt = torch.optim.AdamW([group.flat], lr=1e-4)
    cfg = rid.StepConfig(method=method, steps=steps)
    noise = torch.randn(batch, *models.latent_shape)
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc, PeakMemory():  # PeakMemory: fake .item()
        rid.train_step(models, group, reward_fn, [(["a photo of a cat"] * batch, noise)], opt, cfg)
    total = fc.get_total_flops()
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=mapping) as fc, PeakMemory():
        z = torch.randn(2 * batch, *models.latent_shape)
        ctx = torch.randn(2 * batch, models.tokenizer.model_max_length, models.text_encoder.config.hidden_size)
        models.unet(z, torch.tensor(1), encoder_hidden_states=ctx)
    return {"total": total, "unet_call": fc.get_total_flops()}


def measure(models, reward_fn, modules, method: str, checkpointing: bool, batches: list, steps: int,
            truncate: int) -> dict:
    """One table row: the step at the two micro-batches -> peaks, the fixed part and the part per sample, and
    the largest micro-batch that fits each of FITS (GB)."""
    r = [step_memory(models, reward_fn, modules, method, b, checkpointing, steps,
                     truncate=truncate if method == "draft-k" else 1) for b in batches]
    per = (r[1]["peak"] - r[0]["peak"]) / (batches[1] - batches[0])
    fixed = r[0]["peak"] - batches[0] * per
    return {"method": method, "checkpointing": checkpointing, "steps": steps, "static_gib": r[0]["static"] / GIB,
            "peak_gib": [x["peak"] / GIB for x in r], "per_sample_gib": per / GIB, "fixed_gib": fixed / GIB,
            "fits": {str(gb): fits(fixed, per, gb) for gb in FITS}}


@command(PROG)
def main(argv=None) -> int:
    import rid

    from experiments import backbone_memory

    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default=None, help="the newer backbones' table instead of SD-1.5's: "
                   f"{', '.join(backbone_memory.BACKBONES)} or all (docs/backbone_memory.md; bf16 only)")
    p.add_argument("--resolution", default=None, help="comma list of image sides (default: 256,512; with --backbone "
                                                      "each backbone's own: SDXL 1024,512, the others 1024)")
    p.add_argument("--methods", default=None, help=f"comma list of methods (default: all: {','.join(rid.METHODS)})")
    p.add_argument("--dtypes", default=None, help="fp32 and/or bf16 (bf16 base, fp32 LoRA) (default: both; "
                                                  "--backbone: bf16)")
    p.add_argument("--batches", default="1,2", help="two micro-batch sizes, the fixed part and the slope (default: 1,2)")
    p.add_argument("--paper-steps", type=int, default=None, help="sampler steps of draft (all with gradient) (default: "
                                                                 "50; --backbone: SDXL 50, SD3 and FLUX 28)")
    p.add_argument("--truncate", type=int, default=10, help="draft-k's K (default: 10)")
    p.add_argument("--checkpointing", default="both", help="with --backbone: the rows to measure with "
                                                           "--gradient-checkpointing yes, no or both (default: both; "
                                                           "the doc keeps the other rows)")
    p.add_argument("--out", default=None, help="report to write, and its .json (default: docs/sd15_memory.md; "
                                               "with --flops docs/sd15_cost.md; with --backbone "
                                               "docs/backbone_memory.md, whose rows of other backbones and methods "
                                               "are kept)")
    p.add_argument("--flops", action="store_true", help="count FLOPs per training step instead of memory (rid and "
                                                        "baseline at the largest --resolution, --paper-steps DDIM steps) "
                                                        "and estimate the paper run's GPU hours")
    args = p.parse_args(argv)
    if args.backbone is not None and args.backbone not in (*backbone_memory.BACKBONES, "all"):
        p.error(f"--backbone {args.backbone!r}: unknown; valid: {', '.join(backbone_memory.BACKBONES)}, all")
    if args.backbone is not None and args.flops:
        p.error("--flops counts SD-1.5's FLOPs; it takes no --backbone")
    gcs = {"both": (False, True), "yes": (True,), "no": (False,)}.get(args.checkpointing)
    if gcs is None:
        p.error(f"--checkpointing {args.checkpointing!r}: expected yes, no or both")
    if args.backbone is None and args.checkpointing != "both":
        p.error(f"--checkpointing {args.checkpointing}: only with --backbone (SD-1.5's table is rewritten whole)")
    if args.backbone is not None and args.dtypes not in (None, "bf16"):
        p.error(f"--dtypes {args.dtypes!r}: the --backbone tables are bf16 (train.py's --dtype bf16) only")
    args.resolution = args.resolution or ("" if args.backbone else "256,512")
    args.dtypes = args.dtypes or "fp32,bf16"
    if args.flops:
        args.paper_steps = args.paper_steps or 50
        return flops_main(args, argv)
    sizes, batches = ints(p, "--resolution", args.resolution), ints(p, "--batches", args.batches)
    if (not sizes and not args.backbone) or any(s < 64 or s % 64 or s > 2048 for s in sizes):
        p.error(f"--resolution {args.resolution!r}: every size must be a multiple of 64 from 64 to 2048")
    if len(batches) != 2 or not 1 <= batches[0] < batches[1] <= 64:
        p.error(f"--batches {args.batches!r}: expected two sizes 1 ≤ a < b ≤ 64, e.g. 1,2")
    methods = args.methods.split(",") if args.methods else list(rid.METHODS)
    bad = [m for m in methods if m not in rid.METHODS]
    if bad or not methods:
        p.error(f"--methods {args.methods!r}: unknown {bad}; valid: {', '.join(rid.METHODS)}")
    dtypes = [d for d in args.dtypes.split(",") if d]
    if not dtypes or any(d not in ("fp32", "bf16") for d in dtypes):
        p.error(f"--dtypes {args.dtypes!r}: expected fp32 and/or bf16")
    steps_given = [args.paper_steps] if args.paper_steps is not None else \
        [s.steps for s in backbone_memory.BACKBONES.values()] if args.backbone else [50]
    bad_steps = [n for n in steps_given if not 2 <= n <= 1000 or not 1 <= args.truncate < n]
    if bad_steps:
        p.error(f"--paper-steps {bad_steps[0]} / --truncate {args.truncate}: need 1 ≤ K < steps ≤ 1000")
    if args.backbone and gcs == (False,) and set(methods) == {"draft"}:
        p.error("--methods draft --checkpointing no: the --backbone tables measure draft with checkpointing only "
                "(without it, its fake step takes hours here and fits no card); use --checkpointing yes")
    if args.backbone:
        names = list(backbone_memory.BACKBONES) if args.backbone == "all" else [args.backbone]
        return backbone_memory.run(names, sizes, methods, batches, args.paper_steps, args.truncate,
                                   args.out or "docs/backbone_memory.md", argv, gcs)
    args.paper_steps = args.paper_steps or 50
    args.out = args.out or "docs/sd15_memory.md"

    import tempfile

    from torch._subclasses.fake_tensor import FakeTensorMode

    from experiments.sd15 import clip_tokenizer

    log, t0, rows = logger(PROG), time.time(), []
    with tempfile.TemporaryDirectory() as tmp:
        tok = clip_tokenizer(Path(tmp))
    for dt in dtypes:
        with FakeTensorMode(allow_non_fake_inputs=True):
            models, fns, modules = sd15_world(torch.bfloat16 if dt == "bf16" else torch.float32, tok)
            for res in sizes:
                models.set_resolution(res)
                for m in methods:
                    for gc in ([False, True] if m in GC_METHODS else [False]):
                        row = measure(models, fns["hps"], modules, m, gc, batches,
                                      steps_for(m, args.paper_steps, args.truncate), args.truncate)
                        rows.append({"dtype": dt, "resolution": res, **row})
                        log(f"{dt} {res}² {m}{' (gc)' if gc else ''}: peak {row['peak_gib'][0]:.2f} GiB at "
                            f"micro-batch {batches[0]}, +{row['per_sample_gib']:.2f} GiB per sample")
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"batches": batches, "rows": rows}, indent=1) + "\n")
    write_doc(out, report(rows, batches, args, time.time() - t0, " ".join(["python -m experiments.memory", *(argv if argv is not None else sys.argv[1:])])))
    log(f"wrote {out} in {(time.time() - t0) / 60:.1f} min")
    return 0


# The sustained throughput the GPU-hour estimate assumes: 40 % of the dense bf16 tensor-core peak, a
# typical model-FLOPs utilisation for a UNet at this size (an assumption until a run is timed).
PEAK_BF16_TFLOPS = {"A100": 312, "H100 SXM": 989}
UTILISATION = 0.4


def paper_samples() -> dict:
    """Images generated with gradient over the paper's run, per task: epochs × 750 training prompts."""
    from config import PAPER_EPOCHS

    return {t: PAPER_EPOCHS[t] * 750 for t in ("aesthetic", "hps", "compress")}


def flops_main(args, argv) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    import tempfile

    from experiments.sd15 import clip_tokenizer

    log, t0 = logger(PROG), time.time()
    res = max(int(x) for x in args.resolution.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tok = clip_tokenizer(Path(tmp))
    rows = []
    with FakeTensorMode(allow_non_fake_inputs=True):
        models, fns, _ = sd15_world(torch.float32, tok)
        models.set_resolution(res)
        for m in ("rid", "baseline"):
            r = [step_flops(models, fns["hps"], m, b, args.paper_steps) for b in (1, 2)]
            rows.append({"method": m, "resolution": res, "steps": args.paper_steps, "flops": [x["total"] for x in r],
                         "per_sample": r[1]["total"] - r[0]["total"], "unet_call_cfg_b1": r[0]["unet_call"]})
            log(f"{m} {res}²: {r[0]['total'] / 1e12:.1f} TFLOP per step at micro-batch 1, "
                f"{rows[-1]['per_sample'] / 1e12:.1f} per sample")
    samples = paper_samples()
    out = ROOT / (args.out or "docs/sd15_cost.md")
    out.with_suffix(".json").write_text(json.dumps({"rows": rows, "samples": samples,
                                                    "peak_bf16_tflops": PEAK_BF16_TFLOPS,
                                                    "utilisation": UTILISATION}, indent=1) + "\n")
    write_doc(out, cost_report(rows, samples, time.time() - t0))
    log(f"wrote {out} in {(time.time() - t0) / 60:.1f} min")
    return 0


def gpu_hours(flops: float, gpu: str) -> float:
    return flops / (PEAK_BF16_TFLOPS[gpu] * 1e12 * UTILISATION) / 3600


def cost_report(rows: list, samples: dict, seconds: float) -> str:
    n = sum(samples.values())
    lines = ["# What the paper's run costs at SD-1.5's size: counted FLOPs, estimated GPU hours", "",
             f"Regenerate: `python -m experiments.memory --flops` ({seconds / 60:.1f} min on a 2-core CPU; fake tensors, "
             "no GPU, no weights). `torch.utils.flop_counter` counts every matmul, convolution and attention of one "
             "real `rid.train_step` (2 FLOPs per multiply-add; elementwise ops, normalisations and the optimizer "
             "not counted) on the SD-1.5 UNet, VAE and text encoder with the hps reward (ViT-H-14), "
             f"{rows[0]['steps']} DDIM steps with CFG (the UNet runs on 2 × micro-batch), at micro-batches 1 and 2; "
             "the difference is the cost per sample.", "",
             "| method | res | TFLOP per step, micro-batch 1 | 2 | TFLOP per sample | one CFG UNet call (batch 2) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['resolution']}² | {r['flops'][0] / 1e12:.2f} | {r['flops'][1] / 1e12:.2f} | "
                     f"{r['per_sample'] / 1e12:.2f} | {r['unet_call_cfg_b1'] / 1e12:.3f} |")
    lines += ["", f"The paper's run: epochs aesthetic {samples['aesthetic'] // 750}, hps {samples['hps'] // 750}, "
              f"compress {samples['compress'] // 750} over 750 training prompts = {n:,} samples with gradient "
              "(the same for every batch size: the baseline's batch 128 makes fewer, larger steps).", "",
              "| method | total FLOPs | " + " | ".join(f"GPU hours, {g} (estimate)" for g in PEAK_BF16_TFLOPS) + " |",
              "|---|---|" + "---|" * len(PEAK_BF16_TFLOPS)]
    for r in rows:
        total = r["per_sample"] * n
        lines.append(f"| {r['method']} | {total:.3g} | " +
                     " | ".join(f"{gpu_hours(total, g):.0f}" for g in PEAK_BF16_TFLOPS) + " |")
    lines += ["", "## How far to trust it", "",
              f"- **An estimate until measured**: the hours assume a sustained {UTILISATION:.0%} of each GPU's dense "
              f"bf16 peak ({', '.join(f'{g} {v} TFLOP/s' for g, v in PEAK_BF16_TFLOPS.items())}) for the whole "
              "run. No run of this repository has been timed on a GPU yet; replace this line with the measured "
              "figure when one is (train.py logs each stage's seconds and metrics.jsonl its steps' times).",
              "- fp32 (`--dtype fp32`) runs on TF32 tensor cores at half the bf16 peak: about twice the hours.",
              "- 2 GPUs (`torchrun --nproc_per_node=2`, the paper's 2×A100) take half the wall time: "
              + ", ".join(f"~{gpu_hours(rows[0]['per_sample'] * n, g) / 2:.0f} h on 2×{g}" for g in PEAK_BF16_TFLOPS)
              + " for rid.",
              "- Not counted: eval.py (50 test prompts × 4 images × 4 stages: 0.6 % of rid's training; "
              "`--fid coco` adds 1000 captions × 4 stages: 3 %), the sampling of each stage's samples.png, and "
              "data-parallel communication (the adapters' gradient: 797,184 values per step).", ""]
    return "\n".join(lines)


def report(rows: list, batches: list, args, seconds: float, command: str = PROG) -> str:
    b0, methods = batches[0], {r["method"] for r in rows}
    grads = [f"draft runs all {args.paper_steps} steps with gradient" if "draft" in methods else "",
             f"draft-k the last {args.truncate}" if "draft-k" in methods else "",
             "r0 its 4" if "r0" in methods else ""]
    lines = ["# Memory of one training step at SD-1.5's size", "",
             f"Regenerate: `{command}` ({seconds / 60:.1f} min on a 2-core CPU shared with other jobs; no GPU, no "
             "weights: fake tensors, "
             "see the module's docstring). One optimizer step of rid.train_step on hps (ViT-H-14), the third "
             "task of a RIL run: two frozen LoRA tasks and the current one (rank 4, the attention projections), "
             "the EMA teacher, AdamW's state, and every reward model a RIL run holds (ViT-L-14 + MLP, "
             "ViT-H-14, fp32) resident. bf16 = train.py's `--dtype bf16`: UNet and text encoder in bf16, the VAE in "
             "fp32 (its config's force_upcast, SD-1.5's), adapters and AdamW in fp32. Checkpointing = "
             "`--gradient-checkpointing`: each call with gradient and each decode recomputed block by block in the "
             "backward pass. CFG 7.5 (the UNet runs on 2×micro-batch). Peak = live tensor bytes, "
             "what `torch.cuda.max_memory_allocated` counts; plan ~10% above it for the allocator.", "",
             f"Columns: peak at micro-batch {b0}; the fixed part and the part per sample (from micro-batches "
             f"{batches[0]} and {batches[1]}); the largest micro-batch that fits 24 / 40 / 80 GB (0: none). "
             f"Steps with gradient: {', '.join(g for g in grads if g) or 'one for every method'}"
             f"{'; the others one' if any(grads) else ''}.", "",
             "| dtype | res | method | checkpointing | peak (GiB) | fixed (GiB) | per sample (GiB) | fits 24 GB | 40 GB | 80 GB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dtype']} | {r['resolution']}² | {r['method']} | {'yes' if r['checkpointing'] else 'no'} | "
                     f"{r['peak_gib'][0]:.2f} | {r['fixed_gib']:.2f} | {r['per_sample_gib']:.2f} | "
                     + " | ".join(str(r["fits"][str(gb)]) for gb in FITS) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
