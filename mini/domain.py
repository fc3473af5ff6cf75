"""The mini world's image domain: seeded, captioned 32×32 scenes of coloured shapes, and their rating.

A scene is one or two shapes (circle, square, triangle, diamond) of a colour and a size, placed at a
named position, over a plain, striped or checkered background of another colour. Its caption names
every discrete attribute, e.g.

    "a big red circle on the left and a small blue square on the right, striped green background"

so a caption fixes a scene up to jitter (±2 px position, ±10 % size). Images are drawn with PIL at
4× resolution and box-filtered down to 32×32 (anti-aliased edges, like a photograph of the scene).

Train/test split ("held-out combinations"): a caption is in the test split iff crc32(caption) % 10
== 0. Every word of a test caption occurs in training; the combination never does. The mini
model, its CLIP and the aesthetic MLP are trained on train-split scenes only.

Everything here is numpy + PIL and deterministic for a seed.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32            # image side in pixels
_SS = 4              # supersampling factor for drawing
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = {           # name -> sRGB uint8
    "red": (215, 40, 40), "orange": (240, 140, 30), "yellow": (240, 215, 50),
    "green": (50, 160, 70), "blue": (45, 85, 210), "purple": (135, 60, 180),
    "white": (240, 240, 240), "gray": (128, 128, 128), "black": (25, 25, 25),
}
SIZES = {"small": 5.0, "big": 7.5}          # half-extent in pixels at 32×32
POSITIONS = {                                # where -> centre (x, y) in pixels at 32×32
    "on the left": (9.0, 16.0), "on the right": (23.0, 16.0), "at the top": (16.0, 9.0),
    "at the bottom": (16.0, 23.0), "in the center": (16.0, 16.0),
}
LAYOUTS = (("on the left", "on the right"), ("at the top", "at the bottom"))  # two-shape scenes
PATTERNS = ("plain", "striped", "checkered")
P_TWO = 0.4          # probability of a two-shape scene
JITTER_PX, JITTER_SIZE = 2.0, 0.1


@dataclass(frozen=True)
class Shape:
    kind: str        # one of SHAPES
    color: str       # one of COLORS
    size: str        # one of SIZES
    where: str       # one of POSITIONS
    cx: float        # jittered centre and half-extent, pixels at 32×32
    cy: float
    r: float


@dataclass(frozen=True)
class Scene:
    shapes: tuple[Shape, ...]
    background: str  # one of COLORS, different from every shape's colour
    pattern: str     # one of PATTERNS

    @property
    def caption(self) -> str:
        return caption(self)


# ---------------------------------------------------------------------------- captions and split

def caption(scene: Scene) -> str:
    things = " and ".join(f"a {s.size} {s.color} {s.kind} {s.where}" for s in scene.shapes)
    return f"{things}, {scene.pattern} {scene.background} background"


def split_of(text: str) -> str:
    """'test' for the held-out caption combinations (crc32 % 10 == 0), else 'train'."""
    return "test" if zlib.crc32(text.encode("utf-8")) % 10 == 0 else "train"


_THING = re.compile(r"a (\w+) (\w+) (\w+) (on the left|on the right|at the top|at the bottom|in the center)")
_CAPTION = re.compile(rf"^({_THING.pattern})(?: and ({_THING.pattern}))?, (\w+) (\w+) background$")


def parse(text: str) -> dict:
    """Caption -> {'shapes': [(size, color, kind, where), ...], 'background', 'pattern'}.

    ValueError if the text is not a caption of this domain."""
    m = _CAPTION.match(text.strip())
    things = [t.groups() for t in _THING.finditer(text)] if m else []
    ok = m and all(s in SIZES and c in COLORS and k in SHAPES for s, c, k, _ in things)
    if not ok or m.group(11) not in PATTERNS or m.group(12) not in COLORS:
        raise ValueError(f"text={text!r} is not a mini-world caption; expected e.g. "
                         f"'a big red circle on the left, plain blue background'")
    return {"shapes": things, "pattern": m.group(11), "background": m.group(12)}


# ---------------------------------------------------------------------------- sampling scenes

def _place(rng: np.random.Generator, size: str, color: str, kind: str, where: str) -> Shape:
    x, y = POSITIONS[where]
    dx, dy = rng.uniform(-JITTER_PX, JITTER_PX, size=2)
    r = SIZES[size] * rng.uniform(1 - JITTER_SIZE, 1 + JITTER_SIZE)
    return Shape(kind, color, size, where, float(x + dx), float(y + dy), float(r))


def scene_for(text: str, rng: np.random.Generator) -> Scene:
    """A random rendering (jitter only) of the scene a caption describes."""
    p = parse(text)
    shapes = tuple(_place(rng, *t) for t in p["shapes"])
    return Scene(shapes, p["background"], p["pattern"])


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def sample_scene(rng: np.random.Generator, split: str | None = None) -> Scene:
    """One random scene; with split='train'/'test', rejection-sampled into that caption split."""
    if split not in (None, "train", "test"):
        raise ValueError(f"split={split!r}; allowed: None, 'train', 'test'")
    colors = tuple(COLORS)
    while True:
        wheres = LAYOUTS[int(rng.integers(2))] if rng.random() < P_TWO else (_pick(rng, tuple(POSITIONS)),)
        shapes = tuple(_place(rng, _pick(rng, tuple(SIZES)), _pick(rng, colors), _pick(rng, SHAPES), w)
                       for w in wheres)
        used = {s.color for s in shapes}
        background = _pick(rng, tuple(c for c in colors if c not in used))
        scene = Scene(shapes, background, _pick(rng, PATTERNS))
        if split is None or split_of(scene.caption) == split:
            return scene


def sample(rng: np.random.Generator, n: int, split: str | None = "train") -> tuple[np.ndarray, list[str]]:
    """n random scenes -> (images uint8 (n, 32, 32, 3), captions)."""
    scenes = [sample_scene(rng, split) for _ in range(n)]
    return np.stack([render(s) for s in scenes]), [s.caption for s in scenes]


def prompt_sets(seed: int, n_train: int = 750, n_test: int = 50) -> tuple[list[str], list[str]]:
    """Distinct train and test captions in the order a seeded scene stream first produces them."""
    rng = np.random.default_rng(seed)
    out = {"train": {}, "test": {}}
    want = {"train": n_train, "test": n_test}
    while any(len(out[k]) < want[k] for k in out):
        text = sample_scene(rng).caption
        k = split_of(text)
        if len(out[k]) < want[k]:
            out[k].setdefault(text, None)
    return list(out["train"]), list(out["test"])


# ---------------------------------------------------------------------------- rendering

def _shade(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """The second colour of a background pattern: darker, or lighter for dark colours."""
    c = np.array(rgb, dtype=np.float64)
    luma = c @ (0.299, 0.587, 0.114) / 255
    c = c + 0.45 * (255 - c) if luma < 0.35 else 0.55 * c
    return tuple(int(round(v)) for v in c)


def render(scene: Scene) -> np.ndarray:
    """Scene -> uint8 (32, 32, 3)."""
    n = SIZE * _SS
    bg, alt = COLORS[scene.background], _shade(COLORS[scene.background])
    img = Image.new("RGB", (n, n), bg)
    draw = ImageDraw.Draw(img)
    period = 8 * _SS                                      # 8 px stripes/checks period at 32×32
    if scene.pattern == "striped":                        # diagonal stripes, half duty
        for k in range(-n, n, period):
            draw.polygon([(k, 0), (k + period // 2, 0), (k + period // 2 + n, n), (k + n, n)], fill=alt)
    elif scene.pattern == "checkered":
        h = period // 2
        for i in range(0, n, h):
            for j in range(0, n, h):
                if (i // h + j // h) % 2:
                    draw.rectangle([i, j, i + h - 1, j + h - 1], fill=alt)
    for s in scene.shapes:
        x, y, r = s.cx * _SS, s.cy * _SS, s.r * _SS
        fill = COLORS[s.color]
        if s.kind == "circle":
            draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
        elif s.kind == "square":
            q = 0.85 * r                                  # same area feel as the circle
            draw.rectangle([x - q, y - q, x + q, y + q], fill=fill)
        elif s.kind == "triangle":
            draw.polygon([(x, y - r), (x + r, y + 0.8 * r), (x - r, y + 0.8 * r)], fill=fill)
        else:                                             # diamond
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    return np.asarray(img.resize((SIZE, SIZE), Image.Resampling.BOX), dtype=np.uint8)


# ---------------------------------------------------------------------------- the rating

def rating(images: np.ndarray) -> np.ndarray:
    """Aesthetic rating of images, uint8 (..., H, W, 3) -> float64 (...,), roughly 1 (dull) to 10.

        rating = 1 + 9 · (0.45·min(M / 0.5, 1) + 0.25·min(C / 0.25, 1) + 0.30·min(D / 0.1, 1))

    M  colourfulness of Hasler & Süsstrunk (2003), on [0, 1] RGB: with rg = R − G,
       yb = (R + G)/2 − B, M = √(σ_rg² + σ_yb²) + 0.3·√(μ_rg² + μ_yb²)  (their "extremely colourful"
       ≈ 0.43 on this scale);
    C  RMS contrast: standard deviation of luma Y = 0.299R + 0.587G + 0.114B;
    D  detail: mean absolute difference of neighbouring pixels over R, G, B, averaged over the
       horizontal and vertical directions (edges and texture).

    Why this formula. It stands in for what LAION's aesthetic predictor is known to favour —
    vivid colour, figure/ground contrast, crisp detail — with a published colourfulness measure
    instead of an invented one, and it is a pure function of the pixels, so generated images are
    rated by the same rule as real ones. It deliberately conflicts, in part, with JPEG
    compressibility: detail (stripes, checks, sharp edges) is the high-frequency energy JPEG's
    quantiser discards, and vivid colour edges are what its 4:2:0 chroma subsampling smears, so
    tuning a model for the compress reward (−‖x − JPEG(x)‖²) flattens textures and softens
    colour edges and lowers this rating — the forgetting the RIL experiment must be able to show.
    Flat, vivid, high-contrast scenes keep a mid-high rating under both, so the conflict is partial.
    The caps saturate each term near the domain's top so no single cue can be pushed without bound.
    """
    x = np.asarray(images, dtype=np.float64) / 255.0
    if x.ndim < 3 or x.shape[-1] != 3:
        raise ValueError(f"images shape {x.shape}; expected (..., H, W, 3) uint8")
    R, G, B = x[..., 0], x[..., 1], x[..., 2]
    rg, yb = R - G, 0.5 * (R + G) - B
    ax = (-2, -1)
    M = np.sqrt(rg.std(axis=ax) ** 2 + yb.std(axis=ax) ** 2) + 0.3 * np.sqrt(rg.mean(axis=ax) ** 2 + yb.mean(axis=ax) ** 2)
    C = (0.299 * R + 0.587 * G + 0.114 * B).std(axis=ax)
    D = 0.5 * (np.abs(np.diff(x, axis=-3)).mean(axis=(-3, -2, -1)) + np.abs(np.diff(x, axis=-2)).mean(axis=(-3, -2, -1)))
    score = 0.45 * np.minimum(M / 0.5, 1) + 0.25 * np.minimum(C / 0.25, 1) + 0.30 * np.minimum(D / 0.1, 1)
    return 1.0 + 9.0 * score


# ---------------------------------------------------------------------------- the preference (hps)

VIGNETTE = 0.5       # how much a vignette of depth 1 darkens the corners (centre: not at all)


def falloff(n: int = SIZE) -> np.ndarray:
    """ρ² on an n×n pixel grid: squared distance from the image centre over that of a corner, 0 … 1."""
    c = (n - 1) / 2
    i = np.arange(n, dtype=np.float64)
    return ((i[:, None] - c) ** 2 + (i[None, :] - c) ** 2) / (2 * c * c)


def vignette(images: np.ndarray, depth) -> np.ndarray:
    """Darken uint8 images (..., H, W, 3) towards their corners: x · max(0, 1 − VIGNETTE·depth·ρ²).

    `depth` is a scalar or one value per image (shape images.shape[:-3]); depth 2 makes corners black."""
    x = np.asarray(images, dtype=np.float64)
    if x.ndim < 3 or x.shape[-1] != 3 or x.shape[-3] != x.shape[-2]:
        raise ValueError(f"images shape {x.shape}; expected (..., N, N, 3) uint8")
    d = np.asarray(depth, dtype=np.float64)[..., None, None]
    gain = np.clip(1 - VIGNETTE * d * falloff(x.shape[-2]), 0, None)
    return np.clip(np.round(x * gain[..., None]), 0, 255).astype(np.uint8)


def preference(depth) -> np.ndarray:
    """How much the mini world's people prefer a vignette of this depth: 1 − |depth − 1|, best at 1.

    HPSv2 is CLIP fine-tuned on people's choices between images of one prompt, and those choices
    reward more than fidelity to the prompt — lighting, style, finish — which is why tuning SD on HPS
    changes its look. The mini world's stand-in for that taste is a spotlight look: a vignette
    (`vignette`) of depth 1 is preferred to none and to an overdone one (depth 2, black corners).
    Its hps model is the domain CLIP with the image tower fine-tuned, as HPSv2 is, on pairs of
    renderings of one caption at two depths, the one with the higher preference winning (mini/build.py).

    Why this cue. No training scene has a vignette, so the base model draws none and the hps reward has
    headroom; a pure caption-fidelity cosine has none, because the base model already matches its
    captions as well as real renderings do. It is low-frequency, so JPEG keeps it: compress neither
    needs it nor erases it. It is apart from the aesthetic rating's cues but not free of them: darker
    corners are less colourful, so depth 1 costs about 0.4 rating points (6.03 -> 5.61 on test
    scenes), a mild conflict between the aesthetic and hps tasks, as between LAION aesthetics and HPS.
    """
    return 1.0 - np.abs(np.asarray(depth, dtype=np.float64) - 1.0)
