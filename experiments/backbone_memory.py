"""Memory of one training step on the newer backbones, for every method, without a GPU and without the weights:
SDXL base at 1024² and 512², SD3-Medium, SD3.5-Large and FLUX.1-dev at 1024².

    python -m experiments.memory --backbone all        → docs/backbone_memory.md (+ .json)
    python -m experiments.memory --backbone flux-dev --methods rid,baseline --out /tmp/flux.md

The measurement is docs/sd15_memory.md's (experiments.memory, memplan.step_memory: one rid.train_step on
fake tensors under the live-tensor counter train.py's --micro-batch auto runs), on each model's published
architecture: the configs below, each checked by its parameter count (PARAMS: the released models' counts).
The layout is train.py's `--dtype bf16`: denoiser and text encoders in bf16, the VAE in fp32 (every one of
these VAEs' configs says force_upcast), adapters, EMA teacher and AdamW in fp32, and the reward models a RIL
run holds (ViT-L-14 + the LAION MLP, ViT-H-14) in fp32, resident. The step is the third task's (two frozen
LoRA tasks and the current one, rank 4, on the backbone's own LoRA targets), on hps, at micro-batches 1 and 2.
"""
from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch

from experiments.memory import FITS, GIB

# -- the published configs (diffusers / transformers config.json, defaults left out) ------------------------
SDXL_UNET = dict(  # stabilityai/stable-diffusion-xl-base-1.0 unet/
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20), cross_attention_dim=2048, use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
_VAE = dict(in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            norm_num_groups=32, sample_size=1024, force_upcast=True)
SDXL_VAE = dict(_VAE, latent_channels=4, scaling_factor=0.13025)
SD3_VAE = dict(_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)
FLUX_VAE = dict(SD3_VAE, scaling_factor=0.3611, shift_factor=0.1159)
SD3_MEDIUM = dict(  # stabilityai/stable-diffusion-3-medium-diffusers transformer/
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=192)
SD35_LARGE = dict(SD3_MEDIUM, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                  qk_norm="rms_norm")  # stabilityai/stable-diffusion-3.5-large transformer/
FLUX_DEV = dict(  # black-forest-labs/FLUX.1-dev transformer/
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)  # openai/clip-vit-large-patch14
CLIP_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)  # OpenCLIP ViT-bigG/14
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
              relative_attention_num_buckets=32, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
              layer_norm_epsilon=1e-6, tie_word_embeddings=False, is_encoder_decoder=False)  # google/t5-v1_1-xxl
SDXL_SCHEDULER = {"_class_name": "EulerDiscreteScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "steps_offset": 1,
                  "timestep_spacing": "leading"}
SD3_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
FLUX_SCHEDULER = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0,
                  "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15, "base_image_seq_len": 256,
                  "max_image_seq_len": 4096}

# The released models' parameter counts: the oracle of the configs above (a wrong key changes the count).
PARAMS = {"sdxl unet": 2_567_463_684, "sd3-medium transformer": 2_028_328_000, "flux-dev transformer": 11_901_408_320,
          "sdxl vae": 83_653_863, "clip-l": 123_060_480, "clip-g": 694_659_840, "t5-xxl encoder": 4_762_310_656}


@dataclasses.dataclass(frozen=True)
class Spec:
    label: str
    resolutions: tuple  # image sides measured by default
    steps: int          # sampler steps of a training sample (draft: all with gradient)
    guidance: float     # the CLI's --guidance for it (SD3: a CFG batch; FLUX-dev: its guidance embedding)


BACKBONES = {
    "sdxl": Spec("SDXL base 1.0 (2.6 B UNet, CLIP-L + bigG)", (1024, 512), 50, 7.5),
    "sd3-medium": Spec("SD3-Medium (2.0 B MMDiT, CLIP-L + bigG + T5-XXL)", (1024,), 28, 7.0),
    "sd35-large": Spec("SD3.5-Large (8.1 B MMDiT, CLIP-L + bigG + T5-XXL)", (1024,), 28, 3.5),
    "flux-dev": Spec("FLUX.1-dev (11.9 B, CLIP-L + T5-XXL)", (1024,), 28, 3.5),
}


def t5_tokenizer():
    """A T5 (SentencePiece-Unigram) tokenizer from the `tokenizers` library: T5's specials, the letters as pieces.
    Prompts are padded to the pipeline's max_sequence_length, so only the length reaches the memory."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [(c, -5.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tokenizers() -> dict:
    from experiments.sd15 import clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return {"clip": clip_tokenizer(Path(tmp)), "t5": t5_tokenizer()}


def _built(dtype, make):
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # Module.to() cannot swap fake parameters: built in their dtype
    try:
        return make().eval().requires_grad_(False)
    finally:
        torch.set_default_dtype(default)


def build(name: str, toks: dict):
    """The backbone `name` (backbones/'s dataclass) in train.py's bf16 layout, built in the current mode (call it
    inside FakeTensorMode: no storage)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from backbones import flux, sd3, sdxl

    bf16, tok, t5tok = torch.bfloat16, toks["clip"], toks["t5"]
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    clip = lambda cls, cfg: _built(bf16, lambda: cls(CLIPTextConfig(**cfg, **ids)))  # noqa: E731
    t5 = lambda: _built(bf16, lambda: T5EncoderModel(T5Config(**T5_XXL)))  # noqa: E731
    if name == "sdxl":
        m = sdxl.SDXL(_built(bf16, lambda: UNet2DConditionModel(**SDXL_UNET)),
                      _built(torch.float32, lambda: AutoencoderKL(**SDXL_VAE)),
                      clip(CLIPTextModel, CLIP_L), clip(CLIPTextModelWithProjection, CLIP_G), tok, tok,
                      scheduler_config=dict(SDXL_SCHEDULER))
    elif name in ("sd3-medium", "sd35-large"):
        cfg = SD3_MEDIUM if name == "sd3-medium" else SD35_LARGE
        m = sd3.SD3(_built(bf16, lambda: SD3Transformer2DModel(**cfg)),
                    _built(torch.float32, lambda: AutoencoderKL(**SD3_VAE)),
                    clip(CLIPTextModelWithProjection, CLIP_L), clip(CLIPTextModelWithProjection, CLIP_G), t5(),
                    tok, tok, t5tok, scheduler_config=dict(SD3_SCHEDULER))
        m.transformer.rid_lora_targets = sd3.LORA_TARGETS
    elif name == "flux-dev":
        m = flux.Flux(_built(bf16, lambda: FluxTransformer2DModel(**FLUX_DEV)),
                      _built(torch.float32, lambda: AutoencoderKL(**FLUX_VAE)),
                      clip(CLIPTextModel, CLIP_L), t5(), tok, t5tok, scheduler_config=dict(FLUX_SCHEDULER))
        m.transformer.rid_lora_targets = flux.LORA_TARGETS
    else:
        raise ValueError(f"backbone {name!r} is not allowed; allowed: {', '.join(BACKBONES)}")
    m.denoiser.rid_base_model = f"{name}-fake"
    return m


def components(m) -> dict:
    """{component: (parameters, bytes)} of a backbone's modules."""
    return {f.name: (sum(p.numel() for p in mod.parameters()),
                     sum(t.untyped_storage().nbytes() for t in (*mod.parameters(), *mod.buffers())))
            for f in dataclasses.fields(m) if isinstance(mod := getattr(m, f.name), torch.nn.Module)}


ORDER = ("baseline", "refl", "rid", "draft-lv", "r0", "draft-k", "draft")  # cheapest to fake first


def run(names: list, sizes: list, methods: list, batches: list, steps, truncate: int, out: str, argv,
        checkpointing: tuple = (False, True)) -> int:
    """Measure every (backbone, resolution, method, checkpointing) row and write the doc and its .json after each
    (the .json's rows of other backbones, methods and checkpointing settings are kept). Method by method, cheapest first, over every
    backbone: a long run shows every backbone's cheap rows early. draft with checkpointing only (without, its fake
    step costs hours here and fits no card: the doc bounds it by draft-k's). steps None: each backbone's own."""
    import checkpoint
    from experiments.common import ROOT, logger
    from experiments.memory import PROG

    log, t0 = logger(PROG), time.time()
    out = ROOT / out if not Path(out).is_absolute() else Path(out)
    lock = checkpoint.RunLock(out.parent, log, name=f".{out.name}.lock", label=f"--out {out}")  # one run per table
    try:
        return _run(names, sizes, methods, batches, steps, truncate, out, argv, checkpointing, log, t0)
    finally:
        lock.release()


def _run(names, sizes, methods, batches, steps, truncate, out: Path, argv, checkpointing, log, t0) -> int:
    from torch._subclasses.fake_tensor import FakeTensorMode

    import memplan
    from experiments.memory import measure, reward_world

    old = _previous(out)  # read under the lock: the rows this run keeps are the last run's
    rows = [r for r in old.get("rows", []) if r["backbone"] not in names or r["method"] not in methods
            or r["checkpointing"] not in checkpointing]
    models_info = old.get("models", {})
    toks = tokenizers()
    with FakeTensorMode(allow_non_fake_inputs=True):
        built = {name: build(name, toks) for name in names}
        fns, modules = reward_world()
        loaded = {}
        for name, m in built.items():
            loaded[name] = memplan.PeakMemory(*memplan.weights(m, modules)).now  # the backbone + the reward models
            models_info[name] = {"label": BACKBONES[name].label, "components": components(m),
                                 "base_bytes": memplan.PeakMemory(*memplan.weights(m)).now, "loaded_bytes": loaded[name]}
        for method in sorted(methods, key=ORDER.index):
            for gc in [gc for gc in ((True,) if method == "draft" else (False, True)) if gc in checkpointing]:
                for name, m in built.items():
                    for res in sizes or BACKBONES[name].resolutions:
                        m.set_resolution(res)
                        t = time.time()
                        row = measure(m, fns["hps"], modules, method, gc, batches,
                                      memplan.steps_for(method, steps or BACKBONES[name].steps, truncate), truncate)
                        fixed, per = row["fixed_gib"] * GIB, row["per_sample_gib"] * GIB
                        # train.py --micro-batch auto on an empty card of each size: its free memory after loading
                        row["auto"] = {str(gb): memplan.choose(fixed - loaded[name], per, int(gb * 1e9) - loaded[name])["top"]
                                       for gb in FITS}
                        rows.append({"backbone": name, "resolution": res, **row, "seconds": round(time.time() - t)})
                        log(f"{name} {res}² {method}{' (gc)' if gc else ''}: peak {row['peak_gib'][0]:.2f} GiB at "
                            f"micro-batch {batches[0]}, +{row['per_sample_gib']:.2f} GiB per sample "
                            f"({time.time() - t:.0f} s)")
                        _write(out, rows, models_info, batches, truncate, argv)  # a partial run shows
    _write(out, rows, models_info, batches, truncate, argv)
    log(f"wrote {out} in {(time.time() - t0) / 60:.1f} min")
    return 0


ROW_KEYS = ("backbone", "resolution", "method", "checkpointing", "peak_gib", "fixed_gib", "per_sample_gib", "fits")


def _previous(out: Path) -> dict:
    """The .json beside `out` an earlier run wrote (its rows are kept), {} if none; anything else is refused in
    one line before a model is built."""
    from cli import UsageError

    path = out.with_suffix(".json")
    if not path.exists():
        return {}
    try:
        old = json.loads(path.read_text())
        rows = old["rows"]
        bad = [r for r in rows if not isinstance(r, dict) or any(k not in r for k in ROW_KEYS)]
        if not isinstance(old.get("models", {}), dict) or bad:
            raise ValueError(f"a row without {', '.join(ROW_KEYS)}" if bad else "models is not a mapping")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise UsageError(f"--out {out}: {path} is not a table this command wrote ({type(e).__name__}: {e}); its rows "
                         "would be kept, so move it away or give another --out") from None
    return old


def table_rows() -> set:
    """The full table's rows, (backbone, resolution, method, checkpointing): every backbone at its resolutions,
    every method with checkpointing on and off, draft with it on only."""
    return {(name, res, method, gc) for name, spec in BACKBONES.items() for res in spec.resolutions
            for method in ORDER for gc in ((True,) if method == "draft" else (False, True))}


def _keys(rows: list) -> set:
    return {(r["backbone"], r["resolution"], r["method"], r["checkpointing"]) for r in rows}


def _without(argv: list, flags: tuple) -> list:
    """argv less `flags` and their values (`--flag value` or `--flag=value`)."""
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in flags:
            skip = True
        elif a.split("=", 1)[0] not in flags:
            kept.append(a)
    return kept


def _write(out: Path, rows: list, models_info: dict, batches: list, truncate: int, argv) -> None:
    """The doc and its .json from `rows`, which may come from several runs (the .json's kept rows): complete when
    they are the full table (the doc then names the command that measures it all), and the minutes the sum of
    the rows' own."""
    import sys

    import checkpoint
    from experiments.common import write_doc

    argv = list(argv if argv is not None else sys.argv[1:])
    done = table_rows() <= _keys(rows)
    if done:  # the command that measures the whole table: this run's flags less those that chose its rows
        argv = ["--backbone", "all", *_without(argv, ("--backbone", "--methods", "--resolution", "--checkpointing"))]
    seconds = sum(r.get("seconds", 0) for r in rows)
    command = " ".join(["python -m experiments.memory", *argv])
    rows = sorted(rows, key=lambda r: (list(BACKBONES).index(r["backbone"]), -r["resolution"],
                                       ORDER.index(r["method"]), r["checkpointing"]))
    out.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.write_json(out.with_suffix(".json"), {  # atomic: a kill never loses the rows a later run keeps
        "batches": batches, "truncate": truncate, "models": models_info, "rows": rows, "command": command,
        "minutes": round(seconds / 60, 1), "complete": done})
    write_doc(out, report(rows, models_info, batches, truncate, seconds, command, done))


SHARDS = (2, 4, 8)  # GPUs the FSDP2 estimate tries


def over_80(rows: list, models_info: dict) -> list:
    """The (backbone, resolution, method)s whose micro-batch 1 fits 80 GB neither with nor without checkpointing:
    [(backbone, res, method, best peak bytes, its checkpointing, bytes over 80 GB, frozen base bytes, GPUs)] where
    GPUs is the fewest of SHARDS across which sharding the frozen base (FSDP2 fully_shard; each GPU keeps 1/N of it
    and its own activations) brings the peak under 80 GB, None when none does."""
    best = {}
    for r in rows:
        k = (r["backbone"], r["resolution"], r["method"])
        if k not in best or r["peak_gib"][0] < best[k]["peak_gib"][0]:
            best[k] = r
    out = []
    for (name, res, method), r in best.items():
        peak = r["peak_gib"][0] * GIB
        if peak <= 80e9:
            continue
        base = models_info[name]["base_bytes"]
        gpus = next((n for n in SHARDS if peak - base * (1 - 1 / n) <= 80e9), None)
        out.append((name, res, method, peak, r["checkpointing"], peak - 80e9, base, gpus))
    return out


def report(rows: list, models_info: dict, batches: list, truncate: int, seconds: float, command: str,
           done: bool) -> str:
    b0 = batches[0]
    need = table_rows()
    partial = "" if done else f"; PARTIAL: {len(_keys(rows) & need)} of the full table's {len(need)} rows"
    lines = ["# Memory of one training step: SDXL, SD3-Medium, SD3.5-Large, FLUX.1-dev", "",
             f"Regenerate: `{command}` ({seconds / 60:.0f} min, the rows' own, on a 2-core CPU shared with other "
             f"jobs, niced{partial}; no GPU, no weights). "
             "Measured as [sd15_memory.md](sd15_memory.md) is: each model's published architecture (the configs in "
             "`experiments/backbone_memory.py`, checked by the released models' parameter counts) is built as *fake* "
             "tensors (shapes, dtypes, no storage) and rid.train_step, the real code, runs one optimizer step on it "
             "under memplan's live-tensor counter (`memplan.PeakMemory`, what `train.py --micro-batch auto` runs); the "
             "peak is the step's peak of live tensor bytes, what `torch.cuda.max_memory_allocated` reports (before the "
             "allocator's fragmentation and cuBLAS workspaces: `auto` keeps 15 % spare for them). The step: hps "
             "(ViT-H-14) as the reward, the third task of a RIL run (two frozen LoRA tasks and the current one, rank 4, "
             "on the backbone's LoRA targets), the EMA teacher, AdamW's state, both reward models resident. Layout: "
             "`--dtype bf16`: denoiser and text encoders bf16, the VAE fp32 (force_upcast in each VAE's config), "
             "adapters and optimizer fp32, rewards fp32. SDXL and SD3 run CFG (the denoiser on 2 × micro-batch); "
             "FLUX.1-dev takes the guidance as an embedding (no CFG batch).", "",
             f"Columns: peak at micro-batch {b0}; the fixed part and the part per sample (from micro-batches "
             f"{batches[0]} and {batches[1]}); **fits**: the largest micro-batch with fixed + b × per sample ≤ 24 / 40 / "
             "80 GB (10⁹ B; 0: none); **auto**: what `--micro-batch auto` picks on an empty card of that size (its "
             "free memory after the weights are loaded, less 15 %; train.py then takes the largest divisor of the "
             "batch). Steps with gradient: rid, baseline, refl and draft-lv one (draft-lv re-runs the last step on 2 "
             f"re-noised copies), draft-k the last {truncate}, r0 its 4, draft all of them (SDXL 50, SD3 and FLUX 28). "
             "Checkpointing = `--gradient-checkpointing` (the activations of each denoiser call and of each decode's "
             "VAE blocks recomputed in the backward pass).", "", "## Models", "",
             "| backbone | component | parameters | GiB |", "|---|---|---|---|"]
    for name, info in models_info.items():
        for comp, (n, b) in info["components"].items():
            lines.append(f"| {name} | {comp} | {n:,} | {b / GIB:.2f} |")
        lines.append(f"| {name} | **loaded** (+ the reward models) | | **{info['loaded_bytes'] / GIB:.2f}** |")
    over = over_80(rows, models_info)
    lines += ["", "## Over 80 GB even at micro-batch 1", ""]
    if over:
        lines += ["The best of checkpointing on and off, and the fewest GPUs over which sharding the frozen base "
                  "(denoiser, VAE, text encoders) with FSDP2 `fully_shard` would bring micro-batch 1 under 80 GB "
                  "(estimate: each GPU keeps 1/N of the base and all of its activations; not built, not measured).", "",
                  "| backbone | res | method | peak (GB) | checkpointing | over 80 GB by (GB) | frozen base (GB) | "
                  "FSDP2 GPUs |", "|---|---|---|---|---|---|---|---|"]
        for name, res, method, peak, gc, by, base, gpus in over:
            lines.append(f"| {name} | {res}² | {method} | {peak / 1e9:.1f} | {'yes' if gc else 'no'} | {by / 1e9:.1f} | "
                         f"{base / 1e9:.1f} | {gpus or f'> {SHARDS[-1]}'} |")
    else:
        lines.append("None: every measured method's micro-batch 1 fits one 80 GB card.")
    for name in BACKBONES:
        for res in sorted({r["resolution"] for r in rows if r["backbone"] == name}, reverse=True):
            lines += ["", f"## {models_info[name]['label']}, {res}²", "",
                      "| method | checkpointing | peak (GiB) | fixed (GiB) | per sample (GiB) | fits 24 GB | 40 GB | "
                      "80 GB | auto 24 GB | 40 GB | 80 GB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in rows:
                if (r["backbone"], r["resolution"]) == (name, res):
                    lines.append(f"| {r['method']} | {'yes' if r['checkpointing'] else 'no'} | {r['peak_gib'][0]:.2f} | "
                                 f"{r['fixed_gib']:.2f} | {r['per_sample_gib']:.2f} | "
                                 + " | ".join(str(r["fits"][str(gb)]) for gb in FITS) + " | "
                                 + " | ".join(str(r["auto"][str(gb)]) for gb in FITS) + " |")
    return "\n".join(lines) + "\n"
