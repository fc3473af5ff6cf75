"""Memory of one training step at SD-1.5's size, for every method, without a GPU and without the weights.

    python -m experiments.memory                  → docs/sd15_memory.md (+ .json): 256² and 512², fp32 and bf16
    python -m experiments.memory --resolution 512 --methods rid,baseline --batches 1,2

How: the SD-1.5 UNet, VAE and text encoder (experiments.sd15's published configs) and the reward models a
RIL run holds (open_clip ViT-L-14 + the LAION MLP for aesthetic, ViT-H-14 for hps) are built as *fake*
tensors (torch's FakeTensorMode: shapes, dtypes and devices, no storage), and rid.train_step, the real
code, runs one optimizer step on hps. A dispatch mode sees every tensor each op returns and adds its
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
import math
import sys
import time
import weakref
from pathlib import Path
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from experiments.common import ROOT, Parser, ints, logger, write_doc

PROG = "python -m experiments.memory"
GIB = 2 ** 30
FITS = (24, 40, 80)  # GB of the usual GPUs (the doc's columns; 1 GB = 10⁹ bytes as vendors count)
GC_METHODS = ("draft-k", "draft", "r0")  # more than one step with gradient: checkpointing changes their memory


class PeakMemory(TorchDispatchMode):
    """Live tensor bytes: every storage an op returns counts from its creation until it is freed (a weakref
    finalizer on the storage, whose Python object lives exactly as long as the storage). `peak` is the
    largest sum seen. Storages passed to the constructor (weights, buffers) count from the start.
    `_local_scalar_dense` (.item(), float(t), bool(t)) on a fake tensor reads 1 of the tensor's dtype
    (a finiteness check passes, AdamW's step counter is 1): no tensor's size depends on it."""

    def __init__(self, *tensors):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0
        for t in tensors:
            self.add(t)

    def add(self, t) -> None:
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        st = t.untyped_storage()
        key = st._cdata
        if key in self.live:
            return
        self.live[key] = st.nbytes()
        self.now += st.nbytes()
        self.peak = max(self.peak, self.now)
        weakref.finalize(st, self._free, key)

    def _free(self, key) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args[0]):
            t = args[0]
            return True if t.dtype == torch.bool else 1.0 if t.is_floating_point() else 1
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self.add(t)
        return out


def _is_fake(t) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _fake_clip(arch: str, weights, device):
    """rewards._clip without a checkpoint: open_clip's own model class from its registered config."""
    import open_clip
    from open_clip.factory import get_model_config
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    import rewards

    cfg = get_model_config(arch)
    model = (open_clip.CustomTextCLIP if "hf_model_name" in cfg.get("text_cfg", {}) else open_clip.CLIP)(**cfg)
    set_model_preprocess_cfg(model, merge_preprocess_dict(PreprocessCfg(size=model.visual.image_size), {}))
    return rewards._freeze(model), open_clip.get_tokenizer(arch)


def _fake_head(path, device):
    import rewards
    from experiments.sd15 import LAION_DIMS
    from mini.models import AestheticMLP

    return rewards._freeze(rewards._mlp_from_state(AestheticMLP(768, LAION_DIMS).state_dict(), "random"))


def sd15_world(dtype: torch.dtype, tokenizer, tasks=("aesthetic", "hps")):
    """(rid.Models, {task: reward fn}, [reward modules]) at SD-1.5's size, built in the current mode
    (call it inside FakeTensorMode: no storage). The base in `dtype`, the reward models in fp32, as train.py."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    import rewards
    import rid
    from experiments.sd15 import TEXT, UNET, VAE

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in it: Module.to() cannot swap fake parameters
    try:
        text = CLIPTextModel(CLIPTextConfig(**TEXT, bos_token_id=tokenizer.bos_token_id,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
        unet, vae = UNet2DConditionModel(**UNET), AutoencoderKL(**VAE)
    finally:
        torch.set_default_dtype(default)
    for m in (unet, vae, text):
        m.eval().requires_grad_(False)
    unet.rid_base_model = "sd15-fake"
    made = []

    def clip(*a):
        model, tok = _fake_clip(*a)
        made.append(model)
        return model, tok

    def head(*a):
        made.append(_fake_head(*a))
        return made[-1]

    rewards._clip.cache_clear()
    with mock.patch.object(rewards, "_clip", clip), mock.patch.object(rewards, "_aesthetic_head", head), \
            mock.patch.object(rewards, "_aesthetic_file", lambda spec: "random"), \
            mock.patch.object(rewards, "_hps_file", lambda spec: "random"):
        fns = {t: rewards.get(t) for t in tasks}
    return rid.Models(unet, vae, text, tokenizer), fns, made


def step_memory(models, reward_fn, modules, method: str, batch: int, checkpointing: bool, steps: int,
                truncate: int = 1, rank: int = 4, frozen_tasks: int = 2) -> dict:
    """One rid.train_step (one micro-batch of `batch` prompts) on the current task of an adapter group with
    `frozen_tasks` frozen tasks before it (the last task of a 3-task RIL run). -> {"static", "peak"} bytes:
    static = everything alive before the step (weights, adapters, EMA, AdamW's state), peak = the step's."""
    import rid

    unet = models.unet
    group = rid.group_of(unet) or rid.inject(unet, rank=rank)
    group.clear()
    for k in range(frozen_tasks):
        group.add_task(f"t{k}")
    group.add_task("current")
    opt = torch.optim.AdamW([group.flat], lr=1e-4)
    for st in ("exp_avg", "exp_avg_sq"):  # AdamW's state, as after the first step
        opt.state[group.flat][st] = torch.zeros_like(group.flat)
    opt.state[group.flat]["step"] = torch.tensor(1.0)
    cfg = rid.StepConfig(method=method, steps=steps, truncate=truncate, gradient_checkpointing=checkpointing)
    noise = torch.randn(batch, *models.latent_shape)
    own = [t for m in (models.unet, models.vae, models.text_encoder, *modules)
           for t in (*m.parameters(), *m.buffers())]
    own += [group.flat, group.ema, *opt.state[group.flat].values()]
    own += [b for layer in group.layers.values() for b in (layer.A_frozen, layer.B_frozen, layer.B_scaled)]
    with PeakMemory(*own, noise) as mem:
        static = mem.now
        rid.train_step(models, group, reward_fn, [(["a photo of a cat"] * batch, noise)], opt, cfg)
    return {"static": static, "peak": mem.peak}


def steps_for(method: str, paper_steps: int, truncate: int) -> int:
    """DDIM steps of the measured step: the no-grad sampling steps free their activations, so only the
    steps with gradient change the peak; draft keeps all `paper_steps`, r0 its K = 4."""
    return {"draft": paper_steps, "draft-k": truncate + 1, "r0": 4}.get(method, 2)


def fits(fixed: float, per: float, gb: float) -> int:
    """The largest micro-batch b with fixed + b·per ≤ gb·10⁹ bytes (0: not even one)."""
    return max(0, math.floor((gb * 1e9 - fixed) / per)) if per > 0 else 0


def main(argv=None) -> int:
    import rid

    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--resolution", default="256,512", help="comma list of image sides (default: 256,512)")
    p.add_argument("--methods", default=None, help=f"comma list of methods (default: all: {','.join(rid.METHODS)})")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32 and/or bf16 (bf16 base, fp32 LoRA) (default: both)")
    p.add_argument("--batches", default="1,2", help="two micro-batch sizes, the fixed part and the slope (default: 1,2)")
    p.add_argument("--paper-steps", type=int, default=50, help="DDIM steps of draft (all with gradient) (default: 50)")
    p.add_argument("--truncate", type=int, default=10, help="draft-k's K (default: 10)")
    p.add_argument("--out", default="docs/sd15_memory.md", help="report to write, and its .json (default: %(default)s)")
    args = p.parse_args(argv)
    sizes, batches = ints(p, "--resolution", args.resolution), ints(p, "--batches", args.batches)
    if not sizes or any(s < 64 or s % 64 or s > 2048 for s in sizes):
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
    if not 2 <= args.paper_steps <= 1000 or not 1 <= args.truncate < args.paper_steps:
        p.error(f"--paper-steps {args.paper_steps} / --truncate {args.truncate}: need 1 ≤ K < steps ≤ 1000")

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
                        steps = steps_for(m, args.paper_steps, args.truncate)
                        r = [step_memory(models, fns["hps"], modules, m, b, gc, steps,
                                         truncate=args.truncate if m == "draft-k" else 1) for b in batches]
                        per = (r[1]["peak"] - r[0]["peak"]) / (batches[1] - batches[0])
                        fixed = r[0]["peak"] - batches[0] * per
                        rows.append({"method": m, "dtype": dt, "resolution": res, "checkpointing": gc, "steps": steps,
                                     "static_gib": r[0]["static"] / GIB, "peak_gib": [x["peak"] / GIB for x in r],
                                     "per_sample_gib": per / GIB, "fixed_gib": fixed / GIB,
                                     "fits": {str(gb): fits(fixed, per, gb) for gb in FITS}})
                        log(f"{dt} {res}² {m}{' (gc)' if gc else ''}: peak {rows[-1]['peak_gib'][0]:.2f} GiB at "
                            f"micro-batch {batches[0]}, +{per / GIB:.2f} GiB per sample")
    out = ROOT / args.out if not Path(args.out).is_absolute() else Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"batches": batches, "rows": rows}, indent=1) + "\n")
    write_doc(out, report(rows, batches, args, time.time() - t0, " ".join(["python -m experiments.memory", *(argv if argv is not None else sys.argv[1:])])))
    log(f"wrote {out} in {(time.time() - t0) / 60:.1f} min")
    return 0


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
             "ViT-H-14, fp32) resident. CFG 7.5 (the UNet runs on 2×micro-batch). Peak = live tensor bytes, "
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
