"""SD3, SD3.5 (StableDiffusion3Pipeline): an MMDiT (SD3Transformer2DModel) on a rectified flow, three text
encoders, a 16-channel VAE.

Conditioning, as StableDiffusion3Pipeline.encode_prompt makes it:
    hidden  (B, 77 + 256, D_T5)  [CLIP-L ⊕ CLIP-G penultimate states (B, 77, 768 + 1280), zero-padded to T5's
                                 width; T5's last states (B, 256, 4096)] along the sequence; without
                                 text_encoder_3 (a pipeline saved without T5, or --text-encoder-3 none) the
                                 T5 part is zeros (B, 256, joint_attention_dim) in CLIP-L's dtype, exactly
                                 _get_t5_prompt_embeds' when the pipeline's text_encoder_3 is None. Those 256
                                 are carried as ONE zero token that the joint attention counts 256 times
                                 (RepeatedLastToken, set on the transformer at load): hidden (B, 77 + 1, D_T5),
                                 the same function at a fraction of the cost; SD3(literal_zero_t5=True): the 256
                                 literal zeros, the pipeline's conditioning byte for byte
    pooled  (B, 768 + 1280)      both CLIP encoders' pooled, projected embeddings
The unconditional branch is the "" prompt's (SD3 has no zeroed negative). The transformer predicts the
flow's velocity v = ε − x₀ at timestep σ·1000; the sampler is samplers.Flow (shift 3.0 for SD3-Medium and
SD3.5; a dynamic μ from the token count where the config says use_dynamic_shifting). Latents (B, 16, h, w),
decoded as vae.decode(z / scaling_factor + shift_factor) (SD3: 1.5305, 0.0609, read from the VAE config).
The adapter group wraps the joint blocks' attention: q/k/v/out of the image stream and the added-context
projections of the text stream (diffusers' train_dreambooth_lora_sd3.py targets); LoRA files use its
"transformer." key prefix (SD3LoraLoaderMixin).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import samplers
from backbones import Backbone, Cond, loading_error, require_subfolders

# diffusers' examples/dreambooth/train_dreambooth_lora_sd3.py: attention of both streams (attn2 of SD3.5's
# dual-attention blocks is not among them: ".attn.to_q" does not end "attn2.to_q")
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

# Every LoRA-target linear (attention q/k/v/out, the transformer feed-forward DRaFT adapts, and the text
# stream's twins add_q/k/v_proj, to_add_out, ff_context, which diffusers' SD3/FLUX LoRA scripts target) at
# the native resolution: (where, tokens per image, in, out) from the diffusers config; M = batch · tokens.
# The kernel compile matrix and gpu-check run these (rid_kernels/bench.py, via backbones.lora_shapes()).
# SD3-Medium MMDiT, 1024²: 24 blocks of width 1536 (24 heads × 64), 4096 image tokens (64² patches of 2×2) and
# 333 text tokens (77 CLIP + 256 T5) in their own projections, GELU feed-forward 1536 → 6144
LORA_SHAPES = {
    "sd3": [("image q/k/v/out", 4096, 1536, 1536), ("text add_q/k/v, to_add_out", 333, 1536, 1536),
            ("image ff in", 4096, 1536, 6144), ("image ff out", 4096, 6144, 1536),
            ("text ff in", 333, 1536, 6144), ("text ff out", 333, 6144, 1536)],
}

MAX_SEQUENCE_LENGTH = 256  # the pipeline's default max_sequence_length for T5


#### without T5: its max_sequence_length zero tokens as one ####

class RepeatedLastToken:
    """SD3's joint attention (diffusers' JointAttnProcessor2_0: the same projections called the same way, so rid's
    adapter group on to_q/k/v, to_out.0, add_q/k/v_proj and to_add_out composes; qk-norm where the model has it)
    for a context whose LAST token stands for `m` identical copies of itself.

    Without a T5, the context's T5 part is m = 256 zero vectors. They stay identical through every block: the
    context has no positional embedding, and everything but attention acts per token. As keys and values m
    copies of one token give softmax weight m·e^s = e^(s + log m), so one copy whose logit is raised by log m
    gives the same attention, and their outputs are the one copy's (the naive form: the 256 tokens and
    JointAttnProcessor2_0, which tests/test_flow.py compares against). The bias is in the query's dtype, as
    SDPA's fused kernels take it: exact in fp32; in bf16 log 256 = 5.545 rounds to 5.531 (the token counts 252.5
    times), in fp16 to 5.547 (256.4 times)."""

    def __init__(self, m: int):
        self.log_m = math.log(m)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        b, n = hidden_states.shape[:2]                               # image tokens (B, N, D)
        heads = lambda x: x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)   # (B, H, L, d)
        norm = lambda f, x: x if f is None else f(x)
        q = torch.cat([norm(attn.norm_q, heads(attn.to_q(hidden_states))),
                       norm(attn.norm_added_q, heads(attn.add_q_proj(encoder_hidden_states)))], 2)
        k = torch.cat([norm(attn.norm_k, heads(attn.to_k(hidden_states))),
                       norm(attn.norm_added_k, heads(attn.add_k_proj(encoder_hidden_states)))], 2)
        v = torch.cat([heads(attn.to_v(hidden_states)), heads(attn.add_v_proj(encoder_hidden_states))], 2)
        bias = torch.zeros(1, k.shape[2], dtype=q.dtype, device=q.device)   # (1, N + L): every query alike
        bias[0, -1] = self.log_m                                     # the last key counts m times
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # (B, H, N + L, d)
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3])
        x, ctx = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            ctx = attn.to_add_out(ctx)
        return attn.to_out[1](attn.to_out[0](x)), ctx


def joint_attentions(transformer: nn.Module) -> list:
    """The attention modules that read the context (each joint block's attn; not SD3.5's image-only attn2)."""
    return [m for m in transformer.modules() if hasattr(m, "add_k_proj") and m.add_k_proj is not None]


@dataclass
class SD3(Backbone):
    """SD3's components, frozen and in eval mode; text_encoder_3/tokenizer_3 None: a pipeline without T5."""
    transformer: nn.Module
    vae: nn.Module
    text_encoder: nn.Module      # CLIP ViT-L (CLIPTextModelWithProjection)
    text_encoder_2: nn.Module    # OpenCLIP ViT-bigG (CLIPTextModelWithProjection)
    text_encoder_3: nn.Module | None  # T5-XXL encoder
    tokenizer: object
    tokenizer_2: object
    tokenizer_3: object | None
    _uncond: Cond | None = field(default=None, repr=False)
    resolution: int | None = None
    scheduler_config: dict = field(default_factory=lambda: {"_class_name": samplers.FLOW_CLASS, "shift": 3.0})
    max_sequence_length: int = MAX_SEQUENCE_LENGTH
    # Without T5 only. False (the default): the conditioning's T5 part is ONE zero token and the transformer's
    # joint attention counts it max_sequence_length times (RepeatedLastToken, set on it here): the model the
    # pipeline runs, up to rounding; a train.py step on the reduced mini flow world (CPU, one thread, 20 Euler
    # steps) takes 3.5x less CPU time than on the 256 tokens (docs/backbones.md).
    # True: the pipeline's max_sequence_length literal zeros (its conditioning byte for byte) and diffusers' own
    # attention. dataclasses.replace(models, literal_zero_t5=...) switches both; the transformer is shared, so the
    # object replaced is then stale.
    literal_zero_t5: bool = False

    lora_prefix = "transformer"  # SD3LoraLoaderMixin reads transformer.<layer>

    def __post_init__(self):
        from diffusers.models.attention_processor import JointAttnProcessor2_0
        self._uncond = None  # its T5 part's length follows literal_zero_t5
        for attn in joint_attentions(self.transformer):
            if self.repeats_zero_t5:
                attn.set_processor(RepeatedLastToken(self.max_sequence_length))
            elif isinstance(attn.processor, RepeatedLastToken):  # only what this class set
                attn.set_processor(JointAttnProcessor2_0())

    @property
    def repeats_zero_t5(self) -> bool:
        """Whether the zero T5 part is one token counted max_sequence_length times (no T5, not literal_zero_t5)."""
        return self.text_encoder_3 is None and not self.literal_zero_t5

    @property
    def unet(self) -> nn.Module:
        """The denoiser under the name the CLIs still use (train.py, eval.py inject and load through it)."""
        return self.transformer

    @property
    def guidance_embedded(self) -> bool:
        return False

    @property
    def resolution_multiple(self) -> int:
        return self.vae_factor * self.transformer.config.patch_size

    @property
    def latent_shape(self) -> tuple:
        return (self.transformer.config.in_channels, *self.latent_hw)

    def sampler(self, steps: int, kind: str = "auto", generator: torch.Generator | None = None):
        """samplers.Flow from the scheduler config, μ from the image token count where the config shifts
        dynamically (StableDiffusion3Pipeline: (h/p)(w/p) tokens, max_shift 1.16 unless configured)."""
        mu = None
        if self.scheduler_config.get("use_dynamic_shifting"):
            p = self.transformer.config.patch_size
            h, w = self.latent_hw
            mu = samplers.flow_mu(self.scheduler_config, (h // p) * (w // p), max_shift=1.16)
        return samplers.build(self.scheduler_config, steps, kind, generator, mu=mu)

    # -- conditioning --------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, prompts: list) -> Cond:
        """Prompts → Cond(hidden (B, 77 + 256, D_T5), pooled (B, P₁ + P₂)) as encode_prompt makes them; without
        T5 hidden (B, 77 + 1, D_T5) unless literal_zero_t5 (the one zero token stands for 256)."""
        prompts = list(prompts)
        clip, pooled = [], []
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(enc.device)
            out = enc(ids, output_hidden_states=True)
            pooled.append(out[0])  # the projected pooled embedding (text_embeds)
            clip.append(out.hidden_states[-2])  # penultimate layer, as SD3 was trained
        dim = self.transformer.config.joint_attention_dim
        if self.text_encoder_3 is None:  # StableDiffusion3Pipeline(text_encoder_3=None): zeros, CLIP-L's dtype
            n = 1 if self.repeats_zero_t5 else self.max_sequence_length  # 1: RepeatedLastToken counts it 256 times
            t5 = torch.zeros(len(prompts), n, dim, device=self.device, dtype=clip[0].dtype)
        else:
            ids = self.tokenizer_3(prompts, padding="max_length", max_length=self.max_sequence_length,
                                   truncation=True, add_special_tokens=True, return_tensors="pt").input_ids
            t5 = self.text_encoder_3(ids.to(self.text_encoder_3.device))[0]
        clip = torch.cat(clip, -1)  # (B, 77, D₁ + D₂)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero-padded to T5's width
        hidden = torch.cat([clip.to(t5.device, t5.dtype), t5], dim=-2)  # (B, 77 + 256 or 1, D_T5)
        return Cond(hidden.to(self.device, self.dtype), pooled=torch.cat(pooled, -1).to(self.device, self.dtype))

    def uncond(self) -> Cond:
        return self.encode([""])

    @staticmethod
    def _cfg_batch(uncond: Cond, cond: Cond) -> Cond:
        return Cond.cat([uncond.expand(len(cond)), cond])

    def _forward(self, z: torch.Tensor, t: torch.Tensor, cond: Cond, w_emb=None) -> torch.Tensor:
        return self.transformer(hidden_states=z, timestep=t.expand(len(z)), encoder_hidden_states=cond.hidden,
                                pooled_projections=cond.extra["pooled"]).sample

    # -- pixels ----------------------------------------------------------------------------------------
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (B, 16, h, w) → images (B, 3, H, W) in [0, 1]: z / scaling_factor + shift_factor."""
        c = self.vae.config
        z = z.to(self.vae.dtype) / c.scaling_factor + (c.shift_factor or 0.0)
        return (self.vae.decode(z).sample.float() / 2 + 0.5).clamp(0, 1)

    def kohya_keys(self, layer: str) -> tuple:
        raise ValueError("a kohya-format LoRA export is for UNet models (SD, SDXL); SD3 exports the diffusers "
                         "format (lora_keys), which StableDiffusion3Pipeline.load_lora_weights reads")


SUBFOLDERS = ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


def load(model: str, model_id: str, index: dict, device="cpu", dtype=torch.float32, text_encoder_3: str = "auto") -> SD3:
    """The components and the scheduler config from a local diffusers-layout dir or a hub id; T5 where the
    model_index.json lists it (text_encoder_3 null: without) unless text_encoder_3 is "none": then neither
    text_encoder_3/ nor tokenizer_3/ is read (nor downloaded), and encode puts zeros where T5's states go."""
    require_subfolders(model, SUBFOLDERS)
    with_t5 = (index.get("text_encoder_3") or [None])[0] is not None and text_encoder_3 != "none"
    try:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
        from transformers import AutoTokenizer, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel

        transformer = SD3Transformer2DModel.from_pretrained(model, subfolder="transformer", torch_dtype=dtype)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=dtype)
        encoders = [CLIPTextModelWithProjection.from_pretrained(model, subfolder=s, dtype=dtype)
                    for s in ("text_encoder", "text_encoder_2")]
        tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=s) for s in ("tokenizer", "tokenizer_2")]
        t5 = T5EncoderModel.from_pretrained(model, subfolder="text_encoder_3", dtype=dtype) if with_t5 else None
        tok3 = AutoTokenizer.from_pretrained(model, subfolder="tokenizer_3") if with_t5 else None
        config = dict(FlowMatchEulerDiscreteScheduler.load_config(model, subfolder="scheduler"))
    except (ImportError, OSError, ValueError, RuntimeError) as e:
        raise loading_error(model, e) from e
    for m in (transformer, vae, *encoders, t5):
        if m is not None:
            m.to(device).eval().requires_grad_(False)
    transformer.rid_base_model = model_id
    transformer.rid_lora_targets = LORA_TARGETS  # rid.inject's default targets for this denoiser
    return SD3(transformer, vae, *encoders, t5, *tokenizers, tok3, scheduler_config=config)
