"""Tiny Stable-Diffusion-layout models for tests, built from configs (no downloads).

    tiny_sd(path) -> str          a seeded, saved diffusers directory (model_index.json, unet/, vae/,
                                  text_encoder/, tokenizer/, scheduler/) that rid.load_models and
                                  StableDiffusionPipeline.from_pretrained both load
    tiny_sdxl(path, ...) -> str   the same for StableDiffusionXLPipeline: two text encoders (hidden 32 + 32,
                                  projection 32), a UNet with SDXL's text_time added embedding, EulerDiscrete
                                  scheduler config as SDXL ships it (or another scheduler's)
    tiny_sd3(path, t5, ...) -> str the same for StableDiffusion3Pipeline: an MMDiT, CLIP-L/G and a tiny T5 whose
                                  tokenizer is a real Unigram one built with `tokenizers` (or none: t5=False),
                                  SD3's 16-channel VAE constants, the FlowMatchEuler scheduler config (shift 3)
    tiny_flux(path, dev) -> str   the same for FluxPipeline: a double + single block FLUX transformer (guidance
                                  embedding when dev), CLIP-L + the tiny T5, FLUX's VAE constants
    toy_reward(images, prompts)   (N,) differentiable reward: mean red-channel brightness
    assert_same_build(a, b, meta) two builds of a seeded world (python -m mini build / build-flow) are the same,
                                  file by file

Shapes: latents (B, 4, 8, 8) → images (B, 3, 16, 16) (one VAE down block pair → 2× per side);
text embeddings (B, 16, 32). Other test files import these two names; keep them stable.
"""
import json
import os
import tempfile

import torch

TOKEN_LEN = 16  # tokenizer.model_max_length and the text encoder's positions
_WORDS = ("a", "photo", "of", "cat", "dog", "red", "blue", "car", "tree", "house", "the", "on")


def _bytes_to_unicode() -> dict:
    """GPT-2/CLIP's reversible byte → printable-unicode table (as in transformers' CLIP tokenizer)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _write_tokenizer(path: str) -> None:
    """A byte-level CLIP BPE vocabulary: every byte, every byte + '</w>', merges for a few words."""
    from transformers import CLIPTokenizer

    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars]
    merges = []
    for word in _WORDS:  # merge left to right: "p h", "ph o", ... then the "</w>" form
        cur = word[0]
        for i, ch in enumerate(word[1:], 1):
            tail = ch + "</w>" if i == len(word) - 1 else ch
            merges.append(f"{cur} {tail}")
            cur += tail
            if cur not in vocab:
                vocab.append(cur)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as raw:  # the two files CLIP ships, then the saved form
        with open(os.path.join(raw, "vocab.json"), "w") as f:
            json.dump({tok: i for i, tok in enumerate(dict.fromkeys(vocab))}, f)
        with open(os.path.join(raw, "merges.txt"), "w") as f:
            f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
        tok = CLIPTokenizer.from_pretrained(raw, model_max_length=TOKEN_LEN)
        tok.save_pretrained(path)


def tiny_sd(path) -> str:
    """Build, seed and save a tiny SD-1.5-shaped pipeline under `path`; returns the directory."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = str(path)
    tok_dir = os.path.join(path, "tokenizer")
    _write_tokenizer(tok_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir)

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=32, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, sample_size=16, scaling_factor=0.18215,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=TOKEN_LEN,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))
    # SD-1.5's shipped scheduler_config.
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def tiny_sdxl(path, force_zeros: bool = True, scheduler: str = "euler", time_cond_proj_dim: int | None = None) -> str:
    """Build, seed and save a tiny SDXL-shaped pipeline (diffusers' own SDXL test shapes, made smaller)
    under `path`; scheduler: euler (SDXL base's config), turbo (trailing spacing) or lcm; time_cond_proj_dim:
    a UNet that takes the guidance scale as an embedding (LCM's w-conditioning). Returns the directory."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, LCMScheduler, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    path = str(path)
    for sub in ("tokenizer", "tokenizer_2"):
        _write_tokenizer(os.path.join(path, sub))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer_2"))

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64, time_cond_proj_dim=time_cond_proj_dim,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, sample_size=16, scaling_factor=0.13025, force_upcast=True,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=TOKEN_LEN, projection_dim=32, hidden_act="gelu",
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(CLIPTextConfig(**config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    sdxl = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                timestep_spacing="leading")
    sched = {"euler": lambda: EulerDiscreteScheduler(**sdxl),
             "turbo": lambda: EulerDiscreteScheduler(**{**sdxl, "timestep_spacing": "trailing", "steps_offset": 0}),
             "lcm": lambda: LCMScheduler(**sdxl)}[scheduler]()
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=sched, force_zeros_for_empty_prompt=force_zeros,
        add_watermarker=False,
    )
    pipe.save_pretrained(path)
    return path


def _write_t5_tokenizer(path: str) -> None:
    """A real T5 (SentencePiece-Unigram) tokenizer built with the `tokenizers` library: transformers' T5Tokenizer
    from a (piece, log-probability) vocabulary: the words of _WORDS as whole pieces, every lower-case letter,
    digit and punctuation mark as a fallback piece, <pad> 0, </s> 1, <unk> 2 as T5's; '▁' marks a word start."""
    import string

    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -3.0)]
    vocab += [("▁" + w, -2.0) for w in _WORDS] + [(c, -5.0) for c in string.ascii_lowercase + string.digits + string.punctuation]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(path)


def tiny_sd3(path, t5: bool = True, dynamic_shift: bool = False) -> str:
    """Build, seed and save a tiny SD3-shaped pipeline (diffusers' own SD3 test shapes, made smaller) under `path`:
    an MMDiT of 2 joint blocks (patch 2, 16 latent channels), CLIP-L/G (hidden 32 + 32, projection 32 + 32 =
    the pooled 64), T5 (d_model 80 = joint_attention_dim, so the CLIP states are zero-padded as SD3's 2048 → 4096),
    SD3's VAE constants (scaling 1.5305, shift 0.0609, no quant convs), the FlowMatchEuler config with shift 3.0
    (dynamic_shift: use_dynamic_shifting as SD3.5-style configs). t5=False: saved without text_encoder_3."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline)
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    path = str(path)
    for sub in ("tokenizer", "tokenizer_2"):
        _write_tokenizer(os.path.join(path, sub))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer_2"))
    tokenizer_3 = None
    if t5:
        _write_t5_tokenizer(os.path.join(path, "tokenizer_3"))
        tokenizer_3 = T5Tokenizer.from_pretrained(os.path.join(path, "tokenizer_3"))

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=80, pooled_projection_dim=64,
        pos_embed_max_size=16,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, sample_size=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
        use_post_quant_conv=False, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    config = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=3,
                  num_attention_heads=4, max_position_embeddings=TOKEN_LEN, projection_dim=32, hidden_act="gelu",
                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                  pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**config))
    text_encoder_3 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_3), d_model=80, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )) if t5 else None
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=dynamic_shift)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(path)
    return path


def tiny_flux(path, dev: bool = True) -> str:
    """Build, seed and save a tiny FLUX.1-shaped pipeline (diffusers' own FLUX test shapes) under `path`: one
    double- and one single-stream block (heads 2 × 16, rotary axes 4 + 4 + 8), 16 latent channels packed to 64,
    CLIP-L (hidden 32: the pooled projection) and a T5 (d_model 32 = joint_attention_dim) with the Unigram
    tokenizer of _write_t5_tokenizer, FLUX's VAE constants (scaling 0.3611, shift 0.1159). dev: the guidance
    embedding and FLUX.1-dev's dynamically shifted scheduler config; else schnell's (shift 1, no guidance)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    path = str(path)
    _write_tokenizer(os.path.join(path, "tokenizer"))
    _write_t5_tokenizer(os.path.join(path, "tokenizer_2"))
    tokenizer = CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer"))
    tokenizer_2 = T5Tokenizer.from_pretrained(os.path.join(path, "tokenizer_2"))

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=dev,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32), layers_per_block=1,
        norm_num_groups=8, sample_size=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
        use_post_quant_conv=False, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=TOKEN_LEN, hidden_act="gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    ))
    text_encoder_2 = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer_2), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    ))
    scheduler = (FlowMatchEulerDiscreteScheduler(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096,
                                                 max_shift=1.15, shift=3.0, use_dynamic_shifting=True)
                 if dev else FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False))
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer)
    pipe.save_pretrained(path)
    return path


def toy_reward(images: torch.Tensor, prompts) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] → (N,): mean brightness of the red channel (higher is better)."""
    return images[:, 0].mean(dim=(1, 2))


def write_prompts(path) -> str:
    """Ten simple prompts, one a line (train.py splits them 8 train / 2 test); returns the path."""
    words = ["cat", "dog", "car", "tree", "house"]
    with open(path, "w") as f:
        f.write("\n".join(f"a {c} {w}" for c in ("red", "blue") for w in words) + "\n")
    return str(path)


def assert_same_build(a, b, meta: str) -> list:
    """Directories a and b hold the same files: equal tensors in every .safetensors, the same `meta` JSON
    (world.json, flow.json) but for its build timings, every other file byte for byte. -> the relative paths."""
    from safetensors.torch import load_file

    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    for f in files:
        x, y = a / f, b / f
        if f.suffix == ".safetensors":
            tx, ty = load_file(str(x)), load_file(str(y))
            assert tx.keys() == ty.keys() and all(torch.equal(tx[k], ty[k]) for k in tx), f
        elif f.name == meta:
            wx, wy = json.loads(x.read_text()), json.loads(y.read_text())
            for w in (wx, wy):
                for timing in ("seconds", "wall_seconds", "cpu_seconds"):
                    w["build"].pop(timing)
            assert wx == wy, f
        else:
            assert x.read_bytes() == y.read_bytes(), f
    return files
