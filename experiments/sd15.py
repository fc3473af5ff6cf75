"""SD-1.5, SDXL or SD3-Medium at its real size with random weights, no download: the paper's scale, run on a CPU.

    python -m experiments.sd15 build DIR     DIR/model: a diffusers directory shaped exactly like SD-1.5 (UNet
                                             860 M, VAE, CLIP ViT-L/14 text encoder, CLIP's own 49408-token
                                             BPE tokenizer); DIR/rewards: open_clip ViT-L-14 + the LAION MLP
                                             (aesthetic, the CLIP metric) and ViT-H-14 (hps), and their spec
    python -m experiments.sd15 build DIR --backbone sdxl
                                             the same for SDXL base 1.0 (StableDiffusionXLPipeline: UNet 2.57 B
                                             with its text_time embedding, CLIP ViT-L/14 + OpenCLIP bigG text
                                             encoders, SDXL's VAE, its EulerDiscrete scheduler config), the
                                             weights stored in bf16 (what --dtype bf16 loads; 7 GB of disk)
    python -m experiments.sd15 build DIR --backbone sd3
                                             SD3-Medium (StableDiffusion3Pipeline: the 2.03 B MMDiT, CLIP-L +
                                             OpenCLIP bigG with projections, the 16-channel VAE, FlowMatchEuler
                                             shift 3.0) without T5-XXL (text_encoder_3 null: its part of the
                                             conditioning is zeros, as the pipeline makes it without T5; T5-XXL's
                                             4.76 B parameters would add 9.5 GB in bf16), bf16 (5.9 GB of disk)
    python -m experiments.sd15 run DIR       the real CLIs on it: one optimizer step of every method
                                             (train.py --model DIR/model --reward-spec ...), eval.py of one
                                             stage (and, SD-1.5, a soup), and `python -m checkpoint export`
                                             loaded by diffusers' load_lora_weights against rid's own forward;
                                             peak RSS per process → DIR/dry_run.json and, with --doc, a
                                             markdown table. The backbone is read from DIR/model.

At `--resolution 64` and 2 DDIM steps (the defaults) a step of each method takes seconds to a minute on
2 cores (SDXL: 2.5 to 4.5 CPU-minutes and 10.4 GiB, docs/sdxl_dry_run.md; SD3: docs/sd3_dry_run.md);
`--resolution 256` or `512` measure memory at the sizes people train at. Every number is the process's peak
resident memory (on CPU a proxy for GPU memory: the same tensors). SD-1.5 runs in fp32, SDXL and SD3 with the
frozen base in bf16 (`--dtype`; SDXL's fp32 base alone is 12 GiB). The weights are random, so rewards and
metrics mean nothing here: the run checks shapes, dtypes, file formats and plumbing at the real size
(tests/test_sd15.py runs it when RID_SD15_DRY_RUN=1 / RID_SDXL_DRY_RUN=1 / RID_SD3_DRY_RUN=1, and builds a
tiny SDXL and a tiny SD3 through the same code always).
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

from cli import Parser, command
from experiments.common import ROOT, logger

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

# SDXL base 1.0's published configs (stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/,
# text_encoder_2/, scheduler/). attention_head_dim is diffusers' historical name for the number of heads.
XL_UNET = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
               up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
               cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
               projection_class_embeddings_input_dim=2816, norm_num_groups=32)  # 2816 = 1280 pooled + 6 time ids × 256
XL_VAE = dict(VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)  # SD's VAE shape, SDXL's weights
# Both encoders keep the configs' legacy token ids (eos 2: the pooled token is the highest id, <|endoftext|>).
XL_TEXT = dict(TEXT, bos_token_id=0, eos_token_id=2, pad_token_id=1)  # CLIP ViT-L/14
XL_TEXT_2 = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
                 bos_token_id=0, eos_token_id=2, pad_token_id=1)  # OpenCLIP ViT-bigG/14, with its projection
XL_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   prediction_type="epsilon", interpolation_type="linear", timestep_spacing="leading", steps_offset=1,
                   use_karras_sigmas=False)
# The published scheduler_config.json also carries DDIM's keys, which EulerDiscreteScheduler does not take as
# arguments but a DDIM sampler built from the same file reads (--sampler ddim): written into the config as well.
XL_SCHEDULE_EXTRA = dict(clip_sample=False, set_alpha_to_one=False, skip_prk_steps=True, sample_max_value=1.0)
XL_PARAMS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
             "text_encoder_2": 694_659_840}  # SDXL base 1.0's, the build's oracle

# SD3-Medium (stabilityai/stable-diffusion-3-medium-diffusers): the MMDiT, VAE and scheduler configs are
# experiments.backbone_memory's (SD3_MEDIUM, SD3_VAE, SD3_SCHEDULER); its two CLIP encoders are SDXL's above
# (text_encoder CLIP ViT-L/14, here with its 768 × 768 projection: CLIPTextModelWithProjection; text_encoder_2
# bigG), with the same legacy token ids and tokenizers. No text_encoder_3 (see build_sd3).
SD3_PARAMS = {"transformer": 2_028_328_000, "vae": 83_819_683, "text_encoder": 123_650_304,
              "text_encoder_2": 694_659_840}  # SD3-Medium's, the build's oracle (the VAE: SD's with 16 latent
#                                               channels and no quant convs; CLIP-L: 123,060,480 + its projection)
BACKBONES = {"StableDiffusionPipeline": "sd15", "StableDiffusionXLPipeline": "sdxl",
             "StableDiffusion3Pipeline": "sd3"}  # model_index.json → name
PUBLISHED = {"sd15": PARAMS, "sdxl": XL_PARAMS, "sd3": SD3_PARAMS}


def sdxl_configs(tiny: bool = False) -> dict:
    """SDXL base's component configs; tiny: the same structure (three levels, 2 resnets per block, transformer
    depths 1/2/10, the text_time embedding, both encoders with pooled projection, the 4-level VAE) with widths
    cut to tens of channels and 2 encoder layers: what the default tests build through the same code."""
    if not tiny:
        return {"unet": XL_UNET, "vae": XL_VAE, "text_encoder": XL_TEXT, "text_encoder_2": XL_TEXT_2}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    return {"unet": dict(XL_UNET, block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4), cross_attention_dim=64,
                         addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
            "vae": dict(XL_VAE, block_out_channels=(32, 32, 64, 64)),
            "text_encoder": dict(XL_TEXT, **text), "text_encoder_2": dict(XL_TEXT_2, **text)}


def sd3_configs(tiny: bool = False) -> dict:
    """SD3-Medium's component configs; tiny: the same structure (MMDiT with patch 2 on 16 latent channels, CLIP-L
    and bigG with projections whose pooled outputs concatenate to pooled_projection_dim, CLIP states zero-padded
    to joint_attention_dim, the 4-level 16-channel VAE) cut to 2 joint blocks and tens of channels."""
    from experiments.backbone_memory import SD3_MEDIUM, SD3_VAE

    if not tiny:
        return {"transformer": SD3_MEDIUM, "vae": SD3_VAE, "text_encoder": XL_TEXT, "text_encoder_2": XL_TEXT_2}
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
    return {"transformer": dict(SD3_MEDIUM, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                                caption_projection_dim=32, joint_attention_dim=80, pooled_projection_dim=64,
                                pos_embed_max_size=16),
            "vae": dict(SD3_VAE, block_out_channels=(32, 32, 64, 64)),
            "text_encoder": dict(XL_TEXT, **text), "text_encoder_2": dict(XL_TEXT_2, **text)}


def in_bf16(make):
    """make() with every parameter created (and initialised) in bf16: no fp32 copy of a 2-B model in memory."""
    import torch

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        return make()
    finally:
        torch.set_default_dtype(default)


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


def build_sd15(d: Path) -> dict:
    """DIR/model for SD-1.5 (fp32); returns the parameter counts."""
    import torch
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    tok = clip_tokenizer(d / "tokenizer-src")
    text = CLIPTextModel(CLIPTextConfig(**TEXT, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                        pad_token_id=tok.pad_token_id))
    pipe = StableDiffusionPipeline(vae=AutoencoderKL(**VAE), text_encoder=text, tokenizer=tok,
                                   unet=UNet2DConditionModel(**UNET), scheduler=PNDMScheduler(**SCHEDULE),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    counts = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in PARAMS}
    pipe.save_pretrained(d / "model")
    return counts


def build_sdxl(d: Path, tiny: bool = False) -> dict:
    """DIR/model for SDXL base, every weight made and stored in bf16 (the fp32 UNet alone would be 10 GB of
    memory; the VAE is upcast to fp32 on load, as its force_upcast asks); returns the parameter counts.
    tokenizer_2 pads with "!" (id 0) as SDXL's does, tokenizer with <|endoftext|>."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    c = sdxl_configs(tiny)
    tok = clip_tokenizer(d / "tokenizer-src")
    tok_2 = CLIPTokenizer.from_pretrained(d / "tokenizer-src", pad_token="!")
    scheduler = EulerDiscreteScheduler(**XL_SCHEDULE)
    scheduler.register_to_config(**XL_SCHEDULE_EXTRA)
    torch.manual_seed(0)
    pipe = in_bf16(lambda: StableDiffusionXLPipeline(
        vae=AutoencoderKL(**c["vae"]), text_encoder=CLIPTextModel(CLIPTextConfig(**c["text_encoder"])),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder_2"])), tokenizer=tok,
        tokenizer_2=tok_2, unet=UNet2DConditionModel(**c["unet"]), scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False))
    counts = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in XL_PARAMS}
    pipe.save_pretrained(d / "model", max_shard_size="1GB")  # shards: a fp32 load holds one shard, not the UNet
    return counts


def build_sd3(d: Path, tiny: bool = False) -> dict:
    """DIR/model for SD3-Medium, every weight made and stored in bf16 (the VAE is upcast on load: force_upcast);
    returns the parameter counts. Saved without T5-XXL (text_encoder_3 and tokenizer_3 null in model_index.json,
    what StableDiffusion3Pipeline(text_encoder_3=None) saves; rid then conditions on zeros in T5's place, exactly
    as the pipeline does, the same as `--text-encoder-3 none` on a full SD3): T5-XXL's encoder is 4.76 B
    parameters, 9.5 GB in bf16, which fits beside the 6 GB of the rest neither on this dry run's disk nor, with
    a step's 10 GB, in a 24 GB machine's memory. Tokenizers as SDXL's (tokenizer_2 pads with "!")."""
    import torch
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from experiments.backbone_memory import SD3_SCHEDULER

    c = sd3_configs(tiny)
    tok = clip_tokenizer(d / "tokenizer-src")
    tok_2 = CLIPTokenizer.from_pretrained(d / "tokenizer-src", pad_token="!")
    scheduler = FlowMatchEulerDiscreteScheduler(**{k: v for k, v in SD3_SCHEDULER.items() if k != "_class_name"})
    torch.manual_seed(0)
    pipe = in_bf16(lambda: StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**c["transformer"]), scheduler=scheduler, vae=AutoencoderKL(**c["vae"]),
        text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder"])), tokenizer=tok,
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**c["text_encoder_2"])), tokenizer_2=tok_2,
        text_encoder_3=None, tokenizer_3=None))
    counts = {k: sum(p.numel() for p in getattr(pipe, k).parameters()) for k in SD3_PARAMS}
    pipe.save_pretrained(d / "model", max_shard_size="1GB")
    return counts


def build_rewards(d: Path) -> dict:
    """DIR/rewards (open_clip ViT-L-14 + the LAION MLP, ViT-H-14 as HPSv2 stores it, their spec) and
    DIR/prompts.txt; returns the reward models' parameter counts. A DIR/rewards already there (e.g. moved from
    another dry run's directory: the weights are random either way) is kept, and {} returned."""
    import open_clip
    import torch

    from mini.models import AestheticMLP

    torch.manual_seed(0)
    counts = {}
    r = d / "rewards"
    (d / "prompts.txt").write_text("a photo of a cat\na photo of a dog\na photo of a horse\na photo of a fox\n")
    if (r / "rewards.json").is_file():
        return counts
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
    return counts


def build(d: Path, log, backbone: str = "sd15") -> dict:
    """DIR/model and DIR/rewards; returns the parameter counts. ValueError when the model's differ from the
    published ones."""
    t0 = time.time()
    counts = {"sd15": build_sd15, "sdxl": build_sdxl, "sd3": build_sd3}[backbone](d)
    log(f"model written ({', '.join(f'{k} {v / 1e6:.1f} M' for k, v in counts.items())}) in {time.time() - t0:.0f} s")
    published = PUBLISHED[backbone]
    wrong = {k: (v, published[k]) for k, v in counts.items() if v != published[k]}
    if wrong:
        raise ValueError(f"parameter counts (built, published) differ: {wrong}")
    rewards = build_rewards(d)
    counts.update(rewards)
    log(f"reward weights {'written' if rewards else 'kept (DIR/rewards was there)'}; {time.time() - t0:.0f} s total")
    return counts


def measured(cmd: list, log, env=None) -> dict:
    """Run a command in the repository root; its exit code, wall time, CPU time and own peak RSS (os.wait4)."""
    log("$ " + " ".join(map(str, cmd)))
    t0 = time.time()
    p = subprocess.Popen(list(map(str, cmd)), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True)
    out = p.stdout.read()
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": p.returncode, "seconds": round(time.time() - t0, 1), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),  # wall depends on what else runs; this less
            "tail": out.strip().splitlines()[-3:]}


def train_args(d: Path, out: Path, method: str, task: str, res: int, dtype: str, *extra) -> list:
    return [sys.executable, "train.py", "--model", d / "model", "--reward-spec", d / "rewards" / "rewards.json",
            "--prompts", d / "prompts.txt", "--tasks", task, "--method", method, "--steps", "2", "--batch", "1",
            "--max-steps", "1", "--resolution", str(res), "--dtype", dtype, "--device", "cpu", "--out", out, *extra]


def denoiser_inputs(config, res: int) -> dict:
    """One seeded input of the denoiser whose config this is, as keyword arguments: a UNet's (SD-1.5, SDXL with its
    pooled text and time ids) or an MMDiT's (SD3: 77 CLIP + 256 T5 tokens, the pooled text)."""
    import torch

    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, config.in_channels, res // 8, res // 8, generator=g)  # (1, 4 or 16, h, w)
    if "joint_attention_dim" in config:  # SD3Transformer2DModel
        return {"hidden_states": z, "timestep": torch.tensor([501.0]),
                "encoder_hidden_states": torch.randn(1, 77 + 256, config.joint_attention_dim, generator=g),
                "pooled_projections": torch.randn(1, config.pooled_projection_dim, generator=g)}
    kw = {"sample": z, "timestep": torch.tensor(501),
          "encoder_hidden_states": torch.randn(1, 77, config.cross_attention_dim, generator=g)}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text (1, 1280) and time ids (1, 6)
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(1, pooled, generator=g),
                                   "time_ids": torch.tensor([[res, res, 0, 0, res, res]], dtype=torch.float32)}
    return kw


def export_check(model: Path, run: Path, lora: Path, res: int) -> dict:
    """A LoRA file exported from the run's first stage, loaded by diffusers' load_lora_weights, against rid's own
    forward: the denoiser's output on one input, relative to its largest value. One fp32 denoiser serves both
    (SDXL's UNet is 10 GB, SD3's MMDiT 8 GB): rid's adapter group is loaded into it and taken out again before
    diffusers wraps it. lora_effect (how far the adapters move the output) shows the comparison is not vacuous."""
    import diffusers
    import torch

    import checkpoint

    model = str(model)
    index = json.loads((Path(model) / "model_index.json").read_text())
    sub = "transformer" if "transformer" in index else "unet"
    unet = getattr(diffusers, index[sub][1]).from_pretrained(model, subfolder=sub, torch_dtype=torch.float32)
    unet.eval().requires_grad_(False)
    unet.rid_base_model = os.path.realpath(model)  # what the run's adapters were saved against
    if sub == "transformer":  # the LoRA targets rid's SD3 loader gives it (diffusers' SD3 LoRA script's)
        from backbones import sd3

        unet.rid_lora_targets = sd3.LORA_TARGETS
    kw = denoiser_inputs(unet.config, res)
    with torch.no_grad():
        base = unet(**kw).sample
        stage = sorted(p for p in run.iterdir() if p.name.startswith("stage1-"))[0]
        group = checkpoint.load(unet, stage)
        ours = unet(**kw).sample
        for name, layer in group.layers.items():  # rid's wrappers out: the bare base UNet again
            parent, _, child = name.rpartition(".")
            setattr(unet.get_submodule(parent), child, layer.base)
        del group
        others = {k: None for k, v in index.items() if isinstance(v, list) and k not in (sub, "scheduler")}
        pipe = getattr(diffusers, index["_class_name"]).from_pretrained(model, **{sub: unet}, **others)
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
        theirs = getattr(pipe, sub)(**kw).sample
    scale = float(ours.abs().max())
    return {"export_rel_err": float((ours - theirs).abs().max()) / scale,
            "lora_effect": float((ours - base).abs().max()) / scale}


# export_check in a child process, its result the last line of its output. Not in this one: Linux gives a process
# exec'd by a (v)forked child the parent's peak RSS as its starting ru_maxrss, so after holding the fp32 denoiser
# here every later command (eval) would report at least this process's peak, not its own.
EXPORT_CHECK = ("import json, sys; from pathlib import Path; from experiments.sd15 import export_check; "
                "m, r, f, res = json.loads(sys.argv[1]); print(json.dumps(export_check(Path(m), Path(r), Path(f), res)))")


@command(PROG)
def main(argv=None) -> int:
    p = Parser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=("build", "run"), help="build the directory, or run the CLIs on it")
    p.add_argument("dir", help="where the model and reward weights live")
    p.add_argument("--backbone", choices=tuple(PUBLISHED), default="sd15",
                   help="build: SD-1.5, SDXL base 1.0 or SD3-Medium (run reads it from DIR/model) (default: sd15)")
    p.add_argument("--resolution", default="64", help="comma list of image sides for the method steps (default: 64)")
    p.add_argument("--methods", default=None, help="comma list of methods (default: every method of rid.METHODS)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                   help="train.py / eval.py --dtype of the frozen base (default: fp32 for SD-1.5, bf16 for SDXL)")
    p.add_argument("--checks", default=None,
                   help="comma list of the runs beyond the method steps: hps (rid on hps, ViT-H-14), compress "
                        "(baseline on compress), eval (eval.py of the rid run), soup (eval.py --soup rid + baseline), "
                        "export, run in this order (default: hps,compress,eval,soup,export for SD-1.5; "
                        "compress,export,eval for SDXL and SD3: their hps step and soup would each add ViT-H-14's "
                        "4 GB to a 6-7 GB bf16 base, as their eval does, last)")
    p.add_argument("--checkpointing", action="store_true",
                   help="also run every method with --gradient-checkpointing (the memory table's second column)")
    p.add_argument("--doc", default=None, help="markdown table of the results to write (default: none)")
    args = p.parse_args(argv)
    log, d = logger(PROG), Path(args.dir).resolve()
    if args.what == "build":
        try:
            counts = build(d, log, args.backbone)
        except ValueError as e:
            p.error(str(e))
        (d / "build.json").write_text(json.dumps(counts, indent=1))
        return 0

    import rid

    index = d / "model" / "model_index.json"
    if not index.is_file() or not (d / "rewards" / "rewards.json").is_file():
        p.error(f"{d} holds no built dry-run directory; run `{PROG} build {args.dir}` first")
    backbone = BACKBONES.get(json.loads(index.read_text()).get("_class_name"))
    if backbone is None:
        p.error(f"{index}: its pipeline class is neither of {', '.join(BACKBONES)}")
    multiple = {"sd15": 64, "sdxl": 32, "sd3": 16}[backbone]  # the VAE's 8 × the UNet's 2³ or 2² (SD3: its patch 2)
    try:
        sizes = [int(x) for x in args.resolution.split(",") if x]
    except ValueError:
        p.error(f"--resolution {args.resolution!r}: expected a comma list of integers, e.g. 64,256")
    if not sizes or any(s < multiple or s % multiple for s in sizes):
        p.error(f"--resolution {args.resolution!r}: every size must be a multiple of {multiple} "
                f"({backbone}'s VAE × denoiser)")
    methods = args.methods.split(",") if args.methods else list(rid.METHODS)
    bad = [m for m in methods if m not in rid.METHODS]
    if bad:
        p.error(f"--methods {args.methods!r}: unknown {bad}; valid: {', '.join(rid.METHODS)}")
    all_checks = ("hps", "compress", "eval", "soup", "export")
    checks = (args.checks.split(",") if args.checks is not None else
              list(all_checks) if backbone == "sd15" else ["compress", "export", "eval"])
    needs = {"eval": {"rid"}, "soup": {"rid", "baseline"}, "export": {"rid"}}  # the method runs a check reads
    if any(c not in all_checks or not needs.get(c, set()) <= set(methods) for c in checks):
        p.error(f"--checks {args.checks!r}: allowed: a comma list of {', '.join(all_checks)}; eval and export read "
                "the rid run, soup the rid and baseline runs: --methods must include them")
    dtype = args.dtype or ("fp32" if backbone == "sd15" else "bf16")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    results = {"backbone": backbone, "dtype": dtype, "steps": [], "checks": {}}
    runs = d / "runs"
    for res in sizes:
        for m in methods:
            for ckpt in ([False, True] if args.checkpointing else [False]):
                if ckpt and m in ("rid", "baseline", "draft-lv", "refl"):
                    continue  # one gradient step: checkpointing saves nothing worth a row
                extra = ["--gradient-checkpointing"] if ckpt else []
                task = "aesthetic" if m != "r0" else "clip"
                out = runs / f"{m}-{res}{'-gc' if ckpt else ''}"
                r = measured(train_args(d, out, m, task, res, dtype, *extra), log, env)
                results["steps"].append({"method": m, "resolution": res, "checkpointing": ckpt, "task": task, **r})
                log(f"{m} @ {res}² {'(gc) ' if ckpt else ''}→ rc {r['rc']}, {r['seconds']} s, peak RSS {r['peak_rss_gb']} GB")
                (d / "dry_run.json").write_text(json.dumps(results, indent=1))
    res = sizes[0]
    rid_run, base_run = runs / f"rid-{res}", runs / f"baseline-{res}"
    common = ["--max-prompts", "1", "--images-per-prompt", "2", "--steps", "2", "--resolution", str(res),
              "--dtype", dtype, "--device", "cpu"]
    commands = {  # check → (its key in dry_run.json, the command)
        "hps": ("hps_step", train_args(d, runs / f"rid-hps-{res}", "rid", "hps", res, dtype)),
        "compress": ("compress_step", train_args(d, runs / f"baseline-compress-{res}", "baseline", "compress", res,
                                                 dtype)),
        "eval": ("eval", [sys.executable, "eval.py", "--ckpt", rid_run, "--out", runs / "eval", *common]),
        "soup": ("soup", [sys.executable, "eval.py", "--soup", rid_run, base_run, "--out", runs / "eval-soup",
                          *common]),
        "export": ("export", [sys.executable, "-m", "checkpoint", "export", rid_run, rid_run / "exported.safetensors"])}
    for check in checks:  # in the order given
        key, cmd = commands[check]
        results["checks"][key] = r = measured(cmd, log, env)
        log(f"{key} → rc {r['rc']}, {r['seconds']} s, peak RSS {r['peak_rss_gb']} GB")
        if check == "export" and not r["rc"]:  # in its own process: see EXPORT_CHECK
            args_ = [str(d / "model"), str(rid_run), str(rid_run / "exported.safetensors"), res]
            c = measured([sys.executable, "-c", EXPORT_CHECK, json.dumps(args_)], log, env)
            results["checks"]["export_compare"] = {k: c[k] for k in ("rc", "seconds", "cpu_seconds", "peak_rss_gb")}
            if not c["rc"]:
                results["checks"].update(json.loads(next(x for x in reversed(c["tail"]) if x.startswith("{"))))
                log(f"export through diffusers: relative error {results['checks']['export_rel_err']:.2e} (the "
                    f"adapters move the output by {results['checks']['lora_effect']:.2e}), peak RSS "
                    f"{c['peak_rss_gb']} GB")
        (d / "dry_run.json").write_text(json.dumps(results, indent=1))
    (d / "dry_run.json").write_text(json.dumps(results, indent=1))
    failed = [s for s in results["steps"] if s["rc"]] + [v for v in results["checks"].values()
                                                         if isinstance(v, dict) and v.get("rc")]
    if args.doc:  # peak RSS in GiB (ru_maxrss / 2**20 KiB), as the docs' tables
        lines = ["| method | task | resolution | gradient checkpointing | exit | seconds (wall) | CPU seconds | "
                 "peak RSS (GiB) |", "|---|---|---|---|---|---|---|---|"]
        for s in results["steps"]:
            lines.append(f"| {s['method']} | {s['task']} | {s['resolution']} | {'yes' if s['checkpointing'] else 'no'} "
                         f"| {s['rc']} | {s['seconds']} | {s.get('cpu_seconds', '–')} | {s['peak_rss_gb']} |")
        for key, c in results["checks"].items():
            if isinstance(c, dict):
                lines.append(f"| {key} | | {sizes[0]} | | {c.get('rc', 0)} | {c['seconds']} | "
                             f"{c.get('cpu_seconds', '–')} | {c['peak_rss_gb']} |")
        Path(args.doc).write_text("\n".join(lines) + "\n")
    err = results["checks"].get("export_rel_err")
    log(f"{len(failed)} failed; export through diffusers: relative error "
        f"{'not measured' if err is None else f'{err:.2e}'}; results in {d / 'dry_run.json'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
