"""Rewards without a gradient, and LaSRO's latent surrogate that gives them one.

Black-box rewards score decoded uint8 images and return plain floats; no gradient can flow through
them. Built in (higher is better, as for every reward):

    jpeg-kb   −(JPEG size in kB at quality 80), PIL: exactly eval.py's "JPEG kB" metric, negated
    png-kb    −(lossless PNG size in kB), PIL: eval.py's "PNG kB", negated

and any user callable named `package.module:function` with the signature

    f(images: list[PIL.Image.Image], prompts: list[str]) -> sequence of floats (one per image)

LaSRO (seed 001, Jia et al., CVPR 2025) makes such a reward trainable: a surrogate s(z, c) on the
diffusion model's *final latent* z (no VAE decode) and the prompt c, learned from the true reward
with a Bradley–Terry ranking loss on pairs of samples of the same prompt. Its backbone is the
pre-trained UNet's own encoder (conv_in, the down blocks and the mid block at timestep 0, the
prompt entering through the UNet's cross-attention), frozen; the trainable part is a small head on
spatially pooled features of every down block and the mid block. The paper's ablation found this
backbone better than CLIP or BLIP ones. Two stages per task:

    1. pre-train: N_s noises per training prompt sampled from the model at the task's start
       (off-policy exploration: several initial noises per prompt), scored by the true reward;
    2. fine-tune: the generator maximises the surrogate's score normalised by running statistics,
       and every k generator steps the surrogate adapts for m steps on pairs drawn from a bounded
       FIFO replay buffer of the batches' own samples, scored by the true reward. The online
       adaptation is what keeps the generator from hacking a stale surrogate.

The surrogate's head, its optimizer, the buffer, the running statistics and its generator are all
in `state_dict()`, so a resumed run continues bit-exactly.
"""
from __future__ import annotations

import copy
import importlib
import io
import math
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

JPEG_QUALITY = 80  # eval.py's JPEG kB metric and the jpeg-kb reward share it
BUILT_IN = ("jpeg-kb", "png-kb")


#### BLACK-BOX REWARDS ####

def to_pil(images: torch.Tensor) -> list:
    """(N, 3, H, W) in [0, 1] → uint8 RGB PIL images (round to nearest, as a saved PNG would)."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in arr]


def encoded_kb(pils: list, fmt: str) -> list:
    """Encoded size in kB (1000 bytes) of each PIL image: JPEG at quality 80, or lossless PNG."""
    sizes = []
    for im in pils:
        buf = io.BytesIO()
        im.save(buf, format=fmt, **({"quality": JPEG_QUALITY} if fmt == "JPEG" else {}))
        sizes.append(buf.tell() / 1000)
    return sizes


def _jpeg_kb(pils, prompts):
    return [-kb for kb in encoded_kb(pils, "JPEG")]


def _png_kb(pils, prompts):
    return [-kb for kb in encoded_kb(pils, "PNG")]


def is_black_box(task: str) -> bool:
    """True for the built-in black boxes and for plugin names (`module:function`)."""
    return task in BUILT_IN or ":" in task


def black_box(task: str) -> Callable:
    """The callable scoring PIL images for a black-box task; ValueError naming the task otherwise."""
    if task == "jpeg-kb":
        return _jpeg_kb
    if task == "png-kb":
        return _png_kb
    mod_name, _, fn_name = task.partition(":")
    if not mod_name or not fn_name:
        raise ValueError(f"task {task!r} is not a black-box reward; allowed: {', '.join(BUILT_IN)} or "
                         "package.module:function")
    try:
        mod = importlib.import_module(mod_name)
    except Exception as e:  # noqa: BLE001 — any import failure of user code is the user's to see, in one line
        raise ValueError(f"task {task!r}: module {mod_name!r} could not be imported ({type(e).__name__}: {e})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"task {task!r}: {mod_name!r} has no callable {fn_name!r}; expected "
                         "f(images: list[PIL.Image], prompts: list[str]) -> sequence of floats")
    return fn


def true_scores(task: str, fn: Callable, images: torch.Tensor, prompts: list) -> torch.Tensor:
    """The black box on (N, 3, H, W) images in [0, 1] → float64 (N,), checked: one finite float per image."""
    try:
        out = fn(to_pil(images), list(prompts))
        scores = torch.as_tensor(np.asarray(out, dtype=np.float64).reshape(-1))
    except Exception as e:  # noqa: BLE001 — the user's reward failing is reported in one line
        raise ValueError(f"task {task!r}: the reward raised {type(e).__name__}: {e}") from None
    if scores.numel() != len(images):
        raise ValueError(f"task {task!r}: the reward returned {scores.numel()} scores for {len(images)} images; "
                         "expected one float per image")
    if not torch.isfinite(scores).all():
        raise ValueError(f"task {task!r}: the reward returned non-finite scores {scores.tolist()[:8]}; "
                         "expected finite floats")
    return scores


#### THE SURROGATE ####

class LatentSurrogate(nn.Module):
    """s(z, c): a frozen copy of the base UNet's encoder at timestep 0 (conv_in, down blocks, mid
    block; the prompt through its cross-attention) and a trainable MLP head on the spatial means of
    every down block's output and the mid block's output."""

    def __init__(self, unet: nn.Module, hidden: int = 128, generator: torch.Generator | None = None):
        super().__init__()
        import backbones
        import rid  # the adapter wrapper to strip: the surrogate's backbone is the frozen base model

        enc = copy.deepcopy(backbones.surrogate_encoder(unet))
        for parent in list(enc.modules()):  # LoRALinear → its frozen base Linear
            for name, child in list(parent.named_children()):
                if isinstance(child, rid.LoRALinear):
                    setattr(parent, name, child.base)
        self.encoder = enc.requires_grad_(False).eval()
        widths = backbones.encoder_widths(enc)
        self.head = nn.Sequential(nn.Linear(sum(widths), hidden), nn.SiLU(), nn.Linear(hidden, 1))
        with torch.no_grad():  # its own generator: the surrogate's init does not shift anyone else's draws
            for p in self.head.parameters():
                bound = 1 / math.sqrt(p.shape[-1]) if p.dim() > 1 else 1 / math.sqrt(hidden)
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))

    def train(self, mode: bool = True):
        super().train(mode)
        self.encoder.eval()  # frozen: never in training mode
        return self

    def features(self, z: torch.Tensor, emb) -> torch.Tensor:
        """(B, 4, h, w) latents and the prompts' conditioning (backbone.encode: SD (B, L, D)) → (B, Σ widths)."""
        import backbones

        return torch.cat(backbones.encoder_features(self.encoder, z, emb), 1)

    def forward(self, z: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(z, emb)).squeeze(-1)


def same_prompt_pairs(prompt_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
    """(P, 2) index pairs (i, j), i < j, of samples of the same prompt whose true scores differ."""
    ids, s = prompt_ids.view(-1), scores.view(-1)
    i, j = torch.triu_indices(len(ids), len(ids), 1)
    keep = (ids[i] == ids[j]) & (s[i] != s[j])
    return torch.stack([i[keep], j[keep]], 1)


def bradley_terry(s: torch.Tensor, r: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Mean over pairs of −log P(the better-rewarded sample wins), P = σ(s_better − s_worse)."""
    if len(pairs) == 0:
        return s.sum() * 0.0
    a, b = pairs[:, 0], pairs[:, 1]
    sign = torch.sign(r[a] - r[b]).to(s.dtype)
    return F.softplus(-sign * (s[a] - s[b])).mean()


def pair_accuracy(s: torch.Tensor, r: torch.Tensor, pairs: torch.Tensor) -> float:
    """Share of pairs the surrogate orders as the true reward does (nan without pairs)."""
    if len(pairs) == 0:
        return float("nan")
    a, b = pairs[:, 0], pairs[:, 1]
    return float(((s[a] - s[b]) * (r[a] - r[b]) > 0).double().mean())


def kendall_tau(x, y) -> float:
    """Kendall's τ-b of two sequences (ties handled as scipy.stats.kendalltau does); nan when either is constant."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    i, j = np.triu_indices(len(x), 1)
    dx, dy = np.sign(x[i] - x[j]), np.sign(y[i] - y[j])
    n0 = len(i)
    n1, n2 = np.sum(dx == 0), np.sum(dy == 0)
    denom = math.sqrt((n0 - n1) * (n0 - n2))
    return float(np.sum(dx * dy) / denom) if denom else float("nan")


@dataclass
class SurrogateConfig:
    """LaSRO's knobs (train.py's --surrogate-* flags)."""
    hidden: int = 128          # head width
    lr: float = 1e-3           # the head's Adam lr
    pretrain_prompts: int = 0  # training prompts explored in pre-training (0: all of them)
    pretrain_noises: int = 8   # N_s: initial noises per explored prompt in pre-training
    pretrain_steps: int = 200  # Bradley–Terry steps of pre-training
    adapt_every: int = 1       # k: online adaptation every k generator steps (0: never; the frozen ablation)
    adapt_steps: int = 2       # m: surrogate steps per adaptation
    buffer: int = 512          # replay buffer size (samples, FIFO)
    pair_batch: int = 32       # pairs per Bradley–Terry step (drawn from the buffer)
    pairs: str = "prompt"      # "prompt": pairs of the same prompt (the paper); "any": any two samples
    stats_momentum: float = 0.9  # EMA of the score statistics the generator's reward is normalised by

    def __post_init__(self):
        for name in ("hidden", "pretrain_noises", "adapt_steps", "buffer", "pair_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"surrogate {name} {v!r} is not allowed; allowed: an integer ≥ 1")
        for name in ("pretrain_prompts", "pretrain_steps", "adapt_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"surrogate {name} {v!r} is not allowed; allowed: an integer ≥ 0")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"surrogate lr {self.lr!r} is not allowed; allowed: a finite number > 0")
        if not (isinstance(self.stats_momentum, (int, float)) and 0 <= self.stats_momentum < 1):
            raise ValueError(f"surrogate stats_momentum {self.stats_momentum!r} is not allowed; allowed: a number in [0, 1)")
        if self.pairs not in ("prompt", "any"):
            raise ValueError(f"surrogate pairs {self.pairs!r} is not allowed; allowed: prompt, any")


class RunningStats:
    """Mean and variance of the surrogate's scores, to normalise the generator's reward: set from the
    whole buffer after pre-training (`reset`), then tracked as an exponential moving average of each
    step's batch (`track`), so they follow the surrogate as it adapts without re-scoring the buffer."""

    def __init__(self):
        self.n, self.mean, self.var = 0, 0.0, 1.0

    def reset(self, x: torch.Tensor):
        x = x.detach().double().view(-1)
        self.n, self.mean = len(x), float(x.mean()) if len(x) else 0.0
        self.var = float(x.var()) if len(x) > 1 else 1.0

    def track(self, x: torch.Tensor, momentum: float):
        if self.n == 0:
            return self.reset(x)
        x = x.detach().double().view(-1)
        self.n += len(x)
        self.mean = momentum * self.mean + (1 - momentum) * float(x.mean())
        if len(x) > 1:
            self.var = momentum * self.var + (1 - momentum) * float(x.var())

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def normalise(self, s: torch.Tensor) -> torch.Tensor:
        return (s - self.mean) / max(self.std, 1e-6)

    def state_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "var": self.var}

    def load_state_dict(self, d: dict):
        self.n, self.mean, self.var = int(d["n"]), float(d["mean"]), float(d["var"])


class Surrogate:
    """One black-box task's surrogate reward: the model, its optimizer, the replay buffer (final
    latents, prompt ids, true scores) and the running statistics of its scores. `prompt_emb` (P, L, D)
    holds the conditioning (backbone.encode; SDXL's is a backbones.Cond) of the P prompts the ids index
    (recomputed on resume, never saved)."""

    def __init__(self, unet: nn.Module, cfg: SurrogateConfig, prompt_emb: torch.Tensor, seed: int = 0):
        self.cfg, self.prompt_emb = cfg, prompt_emb
        self.gen = torch.Generator().manual_seed(seed)
        self.model = LatentSurrogate(unet, cfg.hidden, self.gen)
        self.opt = torch.optim.Adam(self.model.head.parameters(), lr=cfg.lr)
        self.stats = RunningStats()
        self.buf: dict = {"z": [], "pid": [], "r": []}
        self.steps = 0  # generator steps seen by observe()

    def score(self, z: torch.Tensor, pid: torch.Tensor) -> torch.Tensor:
        """Raw surrogate scores of final latents of prompts `pid`: (B,)."""
        return self.model(z, self.prompt_emb[pid.to(self.prompt_emb.device)])

    #### the generator's reward ####
    def __call__(self, z: torch.Tensor, pid: torch.Tensor) -> torch.Tensor:
        """Normalised surrogate score (differentiable in z): (B,)."""
        return self.stats.normalise(self.score(z, pid))

    #### data ####
    def add(self, z: torch.Tensor, pid: torch.Tensor, r: torch.Tensor):
        """Append samples to the FIFO buffer, dropping the oldest beyond cfg.buffer."""
        for key, v in (("z", z.float()), ("pid", pid.long()), ("r", r.double())):
            self.buf[key].extend(v.detach().cpu().unbind(0))
            del self.buf[key][:max(0, len(self.buf[key]) - self.cfg.buffer)]

    def _pairs(self, n: int):
        """n same-prompt pairs of the buffer with different true scores, drawn with self.gen → (idx, pairs)
        with pairs indexing idx; None when the buffer has no such pair."""
        pid = torch.stack(self.buf["pid"]).tolist()
        r = torch.stack(self.buf["r"]).tolist()
        by_prompt: dict = {}
        for i, p in enumerate(pid):
            by_prompt.setdefault(p if self.cfg.pairs == "prompt" else 0, []).append(i)
        groups = [ix for _, ix in sorted(by_prompt.items()) if len({r[i] for i in ix}) > 1]
        if not groups:
            return None
        chosen = set()
        for g in torch.randint(len(groups), (n,), generator=self.gen).tolist():
            ix = groups[g]
            while True:
                a, b = torch.randint(len(ix), (2,), generator=self.gen).tolist()
                if r[ix[a]] != r[ix[b]]:
                    break
            chosen.add((min(ix[a], ix[b]), max(ix[a], ix[b])))
        flat = sorted({i for p in chosen for i in p})
        where = {i: k for k, i in enumerate(flat)}
        return torch.tensor(flat), torch.tensor([[where[a], where[b]] for a, b in sorted(chosen)])

    #### training ####
    def fit(self, steps: int) -> float:
        """`steps` Bradley–Terry steps, each on cfg.pair_batch same-prompt pairs of the buffer; the last loss."""
        loss = float("nan")
        device = next(self.model.parameters()).device
        self.model.train()
        for _ in range(steps):
            drawn = self._pairs(self.cfg.pair_batch)
            if drawn is None:
                break
            idx, pairs = drawn
            z = torch.stack([self.buf["z"][i] for i in idx.tolist()]).to(device)
            pid = torch.stack([self.buf["pid"][i] for i in idx.tolist()])
            r = torch.stack([self.buf["r"][i] for i in idx.tolist()]).to(device)
            l_bt = bradley_terry(self.score(z, pid).double(), r, pairs.to(device))
            self.opt.zero_grad(set_to_none=True)
            l_bt.backward()
            self.opt.step()
            loss = float(l_bt.detach())
        self.model.eval()
        return loss

    @torch.no_grad()
    def refresh_stats(self):
        """The statistics of the current surrogate's scores over the whole buffer (after pre-training)."""
        device, scores = next(self.model.parameters()).device, []
        for i in range(0, len(self.buf["r"]), 64):
            z = torch.stack(self.buf["z"][i:i + 64]).to(device)
            scores.append(self.score(z, torch.stack(self.buf["pid"][i:i + 64])).cpu())
        self.stats.reset(torch.cat(scores) if scores else torch.zeros(0))

    def observe(self, z, pid, r, scores: torch.Tensor | None = None) -> bool:
        """A generator step's samples with their true scores: into the buffer; adapt every k steps;
        `scores` (the surrogate's raw scores of z) move the running statistics. Returns whether it adapted."""
        if scores is not None:
            self.stats.track(scores, self.cfg.stats_momentum)
        self.add(z, pid, r)
        self.steps += 1
        k = self.cfg.adapt_every
        if k and self.steps % k == 0:
            self.fit(self.cfg.adapt_steps)
            return True
        return False

    @torch.no_grad()
    def evaluate(self, z, emb, pid, r) -> dict:
        """Pair accuracy (same-prompt pairs) and Kendall τ against the true reward on samples given
        with their own prompt embeddings `emb` (B, L, D), e.g. held-out prompts'."""
        s = self.model(z, emb).double().cpu()
        r = r.double().cpu()
        return {"pair_acc": pair_accuracy(s, r, same_prompt_pairs(pid.cpu(), r)), "kendall_tau": kendall_tau(s, r)}

    #### checkpoint ####
    def state_dict(self) -> dict:
        return {"config": asdict(self.cfg), "head": self.model.head.state_dict(), "opt": self.opt.state_dict(),
                "stats": self.stats.state_dict(), "gen": self.gen.get_state(), "steps": self.steps,
                "buf": {k: (torch.stack(v) if v else None) for k, v in self.buf.items()}}

    def load_state_dict(self, d: dict):
        self.model.head.load_state_dict(d["head"])
        self.opt.load_state_dict(d["opt"])
        self.stats.load_state_dict(d["stats"])
        self.gen.set_state(d["gen"])
        self.steps = int(d["steps"])
        self.buf = {k: (list(v.unbind(0)) if v is not None else []) for k, v in d["buf"].items()}


#### ONE BLACK-BOX TASK IN TRAINING ####

@torch.no_grad()
def explore(models, prompts: list, noise: torch.Tensor, steps: int, guidance: float, batch: int = 16,
            kind: str = "auto") -> torch.Tensor:
    """Final latents (N, 4, h, w) of the model's sampler (`kind`: samplers.build's) from `noise` (N, ...)
    for `prompts` (N), with whatever adapters are active: the off-policy samples the surrogate is
    pre-trained and evaluated on."""
    import rid

    sampler, out = models.sampler(steps, kind), []
    for i in range(0, len(prompts), batch):
        text = models.conditioning(prompts[i:i + batch], guidance)
        out.append(rid.denoise(models, text, noise[i:i + batch].to(models.device, models.dtype), sampler,
                               range(steps), guidance).float())
    return torch.cat(out)


class SurrogateTask:
    """A black-box task as train.py runs it: the true reward `fn`, its Surrogate over the training
    prompts, and the reward the methods call. The methods score final latents with it directly
    (`on_latents`: rid.score skips the VAE decode); every latent it scores is kept until after the
    optimizer step, when `after_step` decodes them, asks the true reward and lets the surrogate adapt."""

    on_latents = True

    def __init__(self, task: str, fn: Callable, models, train_prompts: list, cfg: SurrogateConfig, seed: int):
        self.task, self.fn, self.models = task, fn, models
        self.prompts = list(train_prompts)
        self.index = {p: i for i, p in enumerate(self.prompts)}
        self.sur = Surrogate(models.unet, cfg, models.encode(self.prompts), seed)
        self.sur.model.to(models.device)
        self._seen: list = []
        self.held: dict | None = None  # pre-training samples of held-out explored prompts: never trained on
        self.pair_acc = float("nan")  # the surrogate's pair accuracy on them, after its latest fit

    def __call__(self, z: torch.Tensor, prompts: list) -> torch.Tensor:
        pid = torch.tensor([self.index[p] for p in prompts])
        self._seen.append((z.detach(), pid))
        return self.sur(z, pid)

    def _true(self, z: torch.Tensor, prompts: list) -> torch.Tensor:
        with torch.no_grad():
            images = torch.cat([self.models.decode(z[i:i + 16].to(self.models.dtype)) for i in range(0, len(z), 16)])
        return true_scores(self.task, self.fn, images, prompts)

    def explored(self, generator: torch.Generator) -> list:
        """The training prompts pre-training explores: cfg.pretrain_prompts of them (0: all), drawn."""
        k = self.sur.cfg.pretrain_prompts
        if not k or k >= len(self.prompts):
            return list(self.prompts)
        return [self.prompts[i] for i in sorted(torch.randperm(len(self.prompts), generator=generator)[:k].tolist())]

    def pretrain(self, prompts: list, noise: torch.Tensor, steps: int, guidance: float, kind: str = "auto") -> dict:
        """Stage 1: cfg.pretrain_noises samples of each of `prompts` from the current model (`noise`:
        (N_s · P, ...), prompt-major), scored by the true reward, then cfg.pretrain_steps fits.
        The last fifth of the explored prompts (at least one, when there are two) is held out: its
        samples never enter the buffer and give the pair accuracy logged after every fit."""
        n = self.sur.cfg.pretrain_noises
        n_held = len(prompts) // 5 or (1 if len(prompts) > 1 else 0)
        many = [p for p in prompts for _ in range(n)]
        z = explore(self.models, many, noise, steps, guidance, kind=kind)
        r = self._true(z, many)
        pid = torch.tensor([self.index[p] for p in many])
        cut = (len(prompts) - n_held) * n
        self.sur.add(z[:cut], pid[:cut], r[:cut])
        self.held = {"z": z[cut:], "pid": pid[cut:], "r": r[cut:]}
        loss = self.sur.fit(self.sur.cfg.pretrain_steps)
        self.sur.refresh_stats()
        self._held_acc()
        return {"pretrain_samples": len(many), "pretrain_loss": loss, "true_reward": float(r.mean()),
                "pair_acc": self.pair_acc}

    def _held_acc(self):
        h = self.held
        if h is not None and len(h["r"]):
            with torch.no_grad():
                s = self.sur.score(h["z"].to(self.models.device), h["pid"]).double().cpu()
            pairs = same_prompt_pairs(h["pid"] if self.sur.cfg.pairs == "prompt" else torch.zeros_like(h["pid"]), h["r"])
            self.pair_acc = pair_accuracy(s, h["r"], pairs)

    def after_step(self) -> dict:
        """Stage 2, after each optimizer step: the step's samples → true reward → buffer; adapt every k."""
        z = torch.cat([z for z, _ in self._seen])
        pid = torch.cat([p for _, p in self._seen])
        self._seen = []
        with torch.no_grad():
            raw = self.sur.score(z, pid)
        r = self._true(z, [self.prompts[i] for i in pid.tolist()])
        if self.sur.observe(z, pid, r, raw):
            self._held_acc()
        return {"true_reward": float(r.mean()), "surrogate": float(raw.double().mean()), "pair_acc": self.pair_acc}

    def heldout(self, prompts: list, noise: torch.Tensor, steps: int, guidance: float, reps: int,
                kind: str = "auto") -> dict:
        """Pair accuracy and Kendall τ on `reps` samples of each held-out prompt from the current model."""
        many = [p for p in prompts for _ in range(reps)]
        z = explore(self.models, many, noise, steps, guidance, kind=kind)
        r = self._true(z, many)
        emb = self.models.encode(many)
        pid = torch.tensor([i for i in range(len(prompts)) for _ in range(reps)])
        return {**self.sur.evaluate(z, emb, pid, r), "true_reward": float(r.mean())}

    def state_dict(self) -> dict:
        return {**self.sur.state_dict(), "held": self.held, "pair_acc": self.pair_acc}

    def load_state_dict(self, d: dict):
        self.sur.load_state_dict(d)
        self.held, self.pair_acc = d["held"], float(d["pair_acc"])
