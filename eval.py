"""Evaluate reward-incremental runs: every stage -> metrics -> forgetting (the paper's Eq. 3) -> report.

    python eval.py --ckpt out/                       one run, report in out/
    python eval.py --ckpt out/rid out/baseline       methods side by side in one table
    python eval.py --soup out/a out/b out/c          model soup of independently trained runs

Stage 0 is the base model; stage k is the adapter group after task k (out/stageK-<task>/, listed in
out/run.json). Every stage samples at the run's DDIM steps (--steps overrides); an r0 run's few-step
generator is thus evaluated at its own K, and its base model both at K ("stage0-base-Ksteps") and at
its usual steps (the mini world's 20, SD's 50: "stage0-base-Nsteps", method "base (N steps)"). Every stage and method samples the same test prompts from the same initial noise:
image i of prompt p starts from noise drawn with a generator seeded by (--seed, p, i), whatever the
batch size. The sampler is the run's (--sampler overrides); a stochastic one (LCM) draws its fresh noise
from a generator seeded by (--seed, the batch's first image): reproducible, its images depend on --batch. Metrics per stage (direction in brackets):

    aesthetic (up)  LAION aesthetic predictor v2, 1-10          hps (up)   HPSv2 cosine
    clip (up)       100 * cos(image, prompt), rewards.clip_score
    compress (up)   the compress reward, -||x - JPEG(x)||^2 per image through the differentiable JPEG (q80)
    png_kb (down)   lossless PNG size, PIL, kB                  jpeg_kb (down)  JPEG size at quality 80, kB
    fid (down)      Frechet distance to --fid-ref images: Inception features (torchmetrics), or CLIP
                    features (rewards.clip_features) in the mini world / with --fid-features clip.
                    --fid coco --coco DIR: the paper's zero-shot FID on MS-COCO instead: one image per
                    caption for the first --coco-n (1000) images of COCO's val captions, against those
                    images (coco_pairs); cached by a hash of the captions and image bytes

Forgetting of a metric m at stage T is the paper's Eq. 3, the largest drop from any stage 0..T to T:
F = max_{i∈{0..T}} (m_i - m_T) for higher-is-better m and max_{i∈{0..T}} (m_T - m_i) otherwise. The
range includes i = T (a zero term), so F ≥ 0 and lower is better for every metric; a metric that only
improved has F = 0. As the paper's Tables 2 and 3, the report prints F for CLIP and FID at every stage
and for a target metric (aesthetic; hps; compress, PNG kB, JPEG kB) only once its task was trained
before stage T, "-" otherwise; report.json keeps every stage's raw values and every F.
Results per stage are cached in <run>/eval/ keyed by a hash of the adapters and every setting that
changes a number; a re-run computes only what is missing. Writes report.md (Table-2 layout: "value
(forgetting)" on every stage after the base), report.csv, report.json and the figures grid.png
(stages x prompts), stages.png (metrics across stages) and forgetting.png to --out.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io
import json
import math
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import checkpoint
import cli
import mini
import plots
import rewards
import rid
import surrogate
from cli import UsageError

# name: (column label, higher is better, decimals)
METRICS = {
    "aesthetic": ("Aesthetic", True, 3),
    "hps": ("HPS", True, 4),
    "clip": ("CLIP", True, 2),
    "compress": ("Compress", True, 3),
    "png_kb": ("PNG kB", False, 2),
    "jpeg_kb": ("JPEG kB", False, 2),
    "fid": ("FID", False, 2),
}
# The task whose reward targets each metric; the others (CLIP, FID) measure general quality.
TARGET_OF = {"aesthetic": "aesthetic", "hps": "hps", "compress": "compress", "png_kb": "compress",
             "jpeg_kb": "compress"}
# The black-box tasks whose true reward is a metric's negation (surrogate.py), targeting it too.
BLACK_BOX_TARGET = {"jpeg_kb": "jpeg-kb", "png_kb": "png-kb"}
JPEG_QUALITY = surrogate.JPEG_QUALITY  # the JPEG size metric's quality (rewards.DEFAULT_JPEG_QUALITY trains towards the same)
CACHE_VERSION = 2  # bump when a metric's definition changes: old caches then miss
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MAX_IMAGES_PER_PROMPT = 10_000  # 500 k images per stage at 50 prompts, far past FID's usual 30-50 k
MAX_SEED = 2**63 - 1            # as train.py's: one range of seeds for both CLIs
# The COCO FID's size. The paper gives no N; the usual 30 k (GLIDE, Imagen) is ~30 × 80 TFLOP per stage
# at SD-1.5's 50 steps, ~5 GPU-hours per stage on an A100 (docs/sd15_cost.md's rate); 1000 captions per
# stage make base + 3 stages about an hour (~13 min a stage). FID at N = 1000 is biased upwards against
# N = 30 k: compare stages and methods at the same N, not with published FIDs.
COCO_N = 1000
COCO_SPLITS = ("val2017", "val2014")


#### RUNS AND STAGES ####

@dataclass
class Run:
    dir: Path
    info: dict  # run.json
    prompts: list
    label: str = ""


@dataclass
class Stage:
    run: Run                      # where model, prompts, reward spec and sampler settings come from
    index: int                    # 0 = base model
    name: str                     # "stage0-base", "stage2-hps", "soup(a+b)"
    method: str                   # table label
    dirs: tuple = ()              # adapter dirs: () base, (dir,) a stage, several for a soup
    weights: tuple | None = None  # soup weights
    cache_dir: Path | None = None
    steps: int | None = None      # DDIM steps of this stage alone (the base at its usual steps); None: as all
    config: dict | None = field(default=None, repr=False)  # stage_config(): everything that changes a number
    key: str = ""                                          # hash of config + adapters (the cache key)
    result: dict | None = field(default=None, repr=False)


def load_run(path) -> Run:
    """A train.py run directory, read through checkpoint's run-directory contract: run.json checked, its
    stage and prompt paths resolved inside the run (run.info["stages"] then holds them relative)."""
    d = Path(path)
    if not (d / "run.json").is_file():
        raise UsageError(f"--ckpt {str(path)!r} is not a run directory (no run.json; train.py writes one)")
    info = checkpoint.read_run(d, need=("model",))
    root = d.resolve()
    info["stages"] = [checkpoint.inside(d, s, "stage").relative_to(root).as_posix() for s in info.get("stages", [])]
    prompts_file = checkpoint.inside(d, info.get("test_prompts", "test_prompts.txt"), "test_prompts")
    with checkpoint.reading(prompts_file):
        prompts = [l.strip() for l in prompts_file.read_text(encoding="utf-8").splitlines() if l.strip()]
    if not prompts:
        raise UsageError(f"--ckpt {str(path)!r}: {prompts_file.name} holds no prompts")
    for s in info["stages"]:
        if not (d / s / "adapters.json").is_file():
            raise UsageError(f"--ckpt {str(path)!r}: run.json lists stage {s!r} but {d / s} has no adapters.json")
    if not isinstance(info["model"], str):
        raise UsageError(f"--ckpt {str(path)!r}: run.json 'model' must be a string, got {info['model']!r}")
    return Run(d, info, prompts)


def usual_steps(run: Run) -> int:
    """The base model's own steps: a mini flow world's (its flow.json), the mini world's (world.json), else
    SD-1.5's 50 (rid.StepConfig)."""
    if is_mini(run):
        world = flow_world(run.info["model"]) or Path(mini.WORLD) / "world.json"
        with checkpoint.reading(world):
            return int(json.loads(world.read_text()).get("steps", rid.StepConfig.steps))
    return rid.StepConfig.steps


def few_step(run: Run) -> bool:
    """An r0 run: a K-step generator, compared with its base model at K and at its usual steps."""
    return run.info.get("method") == "r0"


def stages_of(run: Run) -> list[Stage]:
    out = [Stage(run, 0, "stage0-base", "base", cache_dir=run.dir / "eval")]
    for k, s in enumerate(run.info.get("stages", []), 1):  # relative to the run, inside it (load_run)
        out.append(Stage(run, k, s, run.label, (str(run.dir / s),), cache_dir=run.dir / "eval"))
    return out


def soup_stage(paths: list, weights: list | None, cache_dir: Path) -> Stage:
    """A soup of runs: each path is a run dir (its last finished stage is used) or a stage dir."""
    dirs, runs = [], []
    for p in map(Path, paths):
        if (p / "run.json").is_file():
            run = load_run(p)
            if not run.info.get("stages"):
                raise UsageError(f"--soup {str(p)!r}: the run has no finished stage yet")
            dirs.append(str(p / run.info["stages"][-1]))
        elif (p / "adapters.json").is_file() and (p.parent / "run.json").is_file():
            run = load_run(p.parent)
            dirs.append(str(p))
        else:
            raise UsageError(f"--soup {str(p)!r} is neither a run directory (run.json) nor a stage directory "
                             "(adapters.json inside a run directory)")
        runs.append(run)
    if weights is not None and len(weights) != len(dirs):
        raise UsageError(f"--weights {weights} gives {len(weights)} weights for {len(dirs)} --soup runs")
    name = "soup(" + "+".join(Path(d).parent.name for d in dirs) + ")"
    return Stage(runs[0], 1, name, "soup", tuple(dirs), tuple(weights) if weights else None, cache_dir=cache_dir)


#### SETTINGS AND CACHE KEYS ####

@dataclass
class Settings:
    images_per_prompt: int = 4     # 200 images per stage at the paper's 50 test prompts
    seed: int = 0
    steps: int | None = None       # None: the run's own (run.json config)
    guidance: float | None = None
    sampler: str | None = None     # None: the run's own (run.json config; "auto" before it was saved)
    dtype: str = "fp32"
    device: str = "cpu"
    batch: int = 8
    reward_spec: str | None = None  # None: the run's own
    fid_ref: str | None = None      # None: the mini world's held-out images when the run is mini
    fid_features: str | None = None  # inception | clip | None (auto: clip in the mini world)
    max_prompts: int | None = None
    grid_prompts: int = 8
    resolution: int | None = None  # None: the run's own (train.py --resolution), else the model's
    text_encoder_3: str | None = None  # None: the run's own (train.py --text-encoder-3; auto before it was saved)
    coco: str | None = None         # --fid coco: a local MS-COCO folder (annotations/captions_val2017.json + val2017/)
    coco_n: int = COCO_N            # captions (and reference images) of the COCO FID


def flow_world(model: str) -> Path | None:
    """The flow.json of a mini flow world's model directory (train.py's flow_world), else None."""
    f = Path(model) / "flow.json"
    return f if f.is_file() else None


def is_mini(run: Run) -> bool:
    """The mini world's model, or a mini flow world (the world's rewards, prompts and FID reference)."""
    return mini.is_model(run.info["model"]) or flow_world(run.info["model"]) is not None


# The sampler's ranges, as rid.StepConfig declares them for training (one declaration per setting).
SAMPLER = {f.name: f.metadata for f in dataclasses.fields(rid.StepConfig) if f.name in ("steps", "guidance", "sampler")}


def stage_config(stage: Stage, s: Settings) -> dict:
    """Everything that changes a stage's numbers (hashed into its cache key)."""
    run, cfg = stage.run, stage.run.info.get("config", {})
    spec_path = run.info.get("reward_spec") if s.reward_spec is None else s.reward_spec
    spec = rewards.load_spec(spec_path)
    in_mini = is_mini(run)
    features = s.fid_features or ("clip" if in_mini else "inception")
    ref = s.fid_ref if s.fid_ref is not None else (str(Path(mini.WORLD) / "fid_ref.safetensors") if in_mini else None)
    prompts = run.prompts if s.max_prompts is None else run.prompts[: s.max_prompts]
    fid = {"features": features, "ref": _ref_id(ref)}
    n = len(prompts) * s.images_per_prompt
    if s.coco is not None:  # the images of the captions are the reference: its content, not its path, is the key
        pairs, digest = coco_pairs(s.coco, s.coco_n)
        fid = {"features": features, "ref": {"coco": digest, "n": len(pairs)}}
    elif ref is not None and n < 2:  # a Frechet distance needs a covariance: 2 images at least
        why = (f"FID needs at least 2 images per stage, and {len(prompts)} prompt(s) x --images-per-prompt "
               f"{s.images_per_prompt} make {n}")
        if s.fid_ref is not None:
            raise UsageError(f"--fid-ref given, but {why}; raise --images-per-prompt or --max-prompts")
        fid = {"features": features, "ref": None, "why": why}
    sampler = {}
    for name, default in (("steps", 50), ("guidance", 7.5)):  # the run's own, unless a flag says otherwise
        value = cfg.get(name, default) if getattr(s, name) is None else getattr(s, name)
        if name == "steps" and stage.steps is not None:
            value = stage.steps
        if not SAMPLER[name]["check"](value):
            raise UsageError(f"{run.dir / 'run.json'}: config {name} {value!r} is not allowed; allowed: "
                             f"{SAMPLER[name]['allowed']} (or pass --{name})")
        sampler[name] = value
    kind = cfg.get("sampler", "auto") if s.sampler is None else s.sampler
    if kind not in SAMPLER["sampler"]["choices"]:
        raise UsageError(f"{run.dir / 'run.json'}: config sampler {kind!r} is not allowed; allowed: "
                         f"{', '.join(SAMPLER['sampler']['choices'])} (or pass --sampler)")
    t5 = cfg.get("text_encoder_3", "auto") if s.text_encoder_3 is None else s.text_encoder_3
    if t5 not in rid.TEXT_ENCODER_3:
        raise UsageError(f"{run.dir / 'run.json'}: config text_encoder_3 {t5!r} is not allowed; allowed: "
                         f"{', '.join(rid.TEXT_ENCODER_3)} (or pass --text-encoder-3)")
    return {
        "version": CACHE_VERSION, "model": run.info["model"], "prompts": prompts, "seed": s.seed,
        "images_per_prompt": s.images_per_prompt, "dtype": s.dtype,
        "steps": int(sampler["steps"]), "guidance": float(sampler["guidance"]),
        "spec": dataclasses.asdict(spec), "fid": fid,
        "jpeg_quality": JPEG_QUALITY, "grid_prompts": s.grid_prompts,
        **({"resolution": res} if (res := cfg.get("resolution") if s.resolution is None else s.resolution) else {}),
        **({"sampler": kind} if kind != "auto" else {}),  # auto: the model's own, as every cache before --sampler
        **({"text_encoder_3": t5} if t5 != "auto" else {}),  # auto: every text encoder, as caches before the flag
    }


@lru_cache(maxsize=2)
def coco_pairs(folder: str, n: int) -> tuple[list, str]:
    """The COCO FID's fixed (caption, image file) pairs and their content hash: the first n images of the
    val split by image id (val2017 preferred, else val2014), each with its first caption by annotation id.
    DIR holds annotations/captions_<split>.json and <split>/ (the layout of cocodataset.org's zips).
    The hash covers every caption and every image's bytes: a changed or re-encoded file misses the cache."""
    root = Path(folder)
    for split in COCO_SPLITS:
        ann = root / "annotations" / f"captions_{split}.json"
        if ann.is_file():
            break
    else:
        raise UsageError(f"--coco {folder!r} holds no annotations/captions_val2017.json nor captions_val2014.json; "
                         "allowed: a folder with annotations/ and val2017/ (or val2014/) from cocodataset.org")
    with checkpoint.reading(ann):
        data = json.loads(ann.read_text())
        files = {im["id"]: im["file_name"] for im in data["images"]}
        first = {}
        for a in sorted(data["annotations"], key=lambda a: a["id"]):
            first.setdefault(a["image_id"], a["caption"].strip())
    ids = sorted(i for i in files if i in first)[:n]
    if len(ids) < 2:
        raise UsageError(f"--coco {folder!r}: {ann.name} lists {len(ids)} captioned image(s); FID needs at least 2")
    pairs = [(first[i], root / split / files[i]) for i in ids]
    missing = [str(f) for _, f in pairs if not f.is_file()]
    if missing:
        raise UsageError(f"--coco {folder!r}: {len(missing)} of the {len(pairs)} images are missing, e.g. {missing[0]}; "
                         f"unzip {split}.zip into it")
    h = hashlib.sha256()
    for caption, f in pairs:
        h.update(caption.encode() + b"\0" + f.read_bytes())
    return pairs, h.hexdigest()[:16]


def images_of(config: dict) -> int:
    """Images a stage generates: its test prompts', and one per caption of the COCO FID."""
    ref = config["fid"]["ref"] or {}
    return len(config["prompts"]) * config["images_per_prompt"] + (ref["n"] if "coco" in ref else 0)


def _ref_id(ref):
    if ref is None:
        return None
    p = Path(ref)
    if p.is_dir():
        return {"dir": str(p.resolve()), "n": sum(1 for f in p.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)}
    return {"file": str(p.resolve()), "size": p.stat().st_size if p.exists() else None}


def stage_key(stage: Stage, config: dict) -> str:
    adapters = [checkpoint.verify(d) for d in stage.dirs]  # the checksum saved with them, checked
    blob = json.dumps({"config": config, "adapters": adapters, "weights": stage.weights}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cache_paths(stage: Stage) -> tuple[Path, Path]:
    stem = f"{stage.name.replace('/', '_')}.{stage.key}"  # flat in the cache dir, whatever the stage's path
    return stage.cache_dir / f"{stem}.json", stage.cache_dir / f"{stem}.png"


def find_cached(stage: Stage, dirs: list, enabled: set) -> dict | None:
    """A cached result for this key (in any run's eval/ dir) that has every enabled metric."""
    for d in [stage.cache_dir, *dirs]:
        for f in sorted(Path(d).glob(f"*.{stage.key}.json")) if Path(d).is_dir() else []:
            res = _cached_result(f, stage.key, enabled)
            if res is not None:
                return {**res, "strip": str(f.with_suffix(".png"))}
    return None


def _cached_result(f: Path, key: str, enabled: set) -> dict | None:
    """A cache file's result when it is whole: JSON with this key, a finite number for every enabled
    metric, and a readable sample strip beside it. Anything else (garbled, torn, missing keys or the
    PNG) is a cache miss, recomputed and rewritten."""
    try:
        res = json.loads(f.read_text())
        metrics = res["metrics"]
        ok = (res["key"] == key and enabled <= set(metrics)
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                      for v in metrics.values()))
        with Image.open(f.with_suffix(".png")) as im:
            im.verify()
    except Exception:  # whatever is wrong with it, the entry is a miss
        return None
    return res if ok else None


#### FORGETTING (Eq. 3) ####

def forgetting(values: list, higher_is_better: bool) -> float | None:
    """Eq. 3: the largest drop from any stage i ∈ {0..T} to the last stage T (≥ 0; lower is better
    either way). None when there is no earlier stage or a value is missing."""
    if len(values) < 2 or any(v is None for v in values):
        return None
    last = values[-1]
    return max(m - last for m in values) if higher_is_better else max(last - m for m in values)


def forgetting_shown(trained_before: list) -> list:
    """The metrics whose forgetting the paper prints at a stage, given the tasks trained before it
    (a joint task counts as each of its rewards): CLIP and FID always, a target metric once its
    task was trained before this stage ("(-)" otherwise: Table 2, HPS after the aesthetic stage)."""
    return [m for m in METRICS if m not in TARGET_OF or TARGET_OF[m] in trained_before
            or BLACK_BOX_TARGET.get(m) in trained_before]


#### METRICS ####

def file_kb(images: torch.Tensor, fmt: str) -> list[float]:
    """Encoded size in kB (1000 bytes) per image, PIL, as DDPO measures compressibility: the definition
    the black-box rewards jpeg-kb / png-kb negate (surrogate.encoded_kb)."""
    return surrogate.encoded_kb(surrogate.to_pil(images), fmt)


class _ClipFeatures(torch.nn.Module):
    """rewards.clip_features as the custom feature extractor torchmetrics' FID accepts."""

    def __init__(self, spec, device):
        super().__init__()
        self.spec, self.device = spec, device
        self.num_features = int(rewards.clip_features(torch.zeros(1, 3, 8, 8), spec, device).shape[-1])

    def forward(self, x):
        return rewards.clip_features(x, self.spec, self.device)


def reference_batches(ref: str, size: tuple, batch: int = 64):
    """FID reference images in batches (B, 3, H, W) in [0, 1] at the generated size, streamed (MS-COCO
    does not fit in memory): a folder (centre crop to square, bicubic resize, as clean-fid prepares
    reference sets) or a .safetensors file with a uint8 tensor "images" (N, 3, H, W)."""
    p = Path(ref)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        for chunk in load_file(str(p))["images"].split(batch):
            x = chunk.float() / 255
            if tuple(x.shape[-2:]) != tuple(size):
                x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True).clamp(0, 1)
            yield x
        return
    files = sorted(x for x in p.iterdir() if x.suffix.lower() in IMAGE_SUFFIXES)
    yield from _image_batches(files, size, batch)


def _image_batches(files: list, size: tuple, batch: int = 64):
    for b in range(0, len(files), batch):
        out = []
        for f in files[b:b + batch]:
            im = Image.open(f).convert("RGB")
            side = min(im.size)
            left, top = (im.width - side) // 2, (im.height - side) // 2
            im = im.crop((left, top, left + side, top + side)).resize((size[1], size[0]), Image.BICUBIC)
            out.append(torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1))
        yield torch.stack(out).float() / 255


def count_reference(ref: str) -> int:
    """Images in an FID reference (a folder, or a .safetensors with uint8 "images" (N, 3, H, W)); a
    missing or malformed one is a UsageError naming it."""
    p = Path(ref)
    if p.is_dir():
        return sum(1 for x in p.iterdir() if x.suffix.lower() in IMAGE_SUFFIXES)
    if not (p.is_file() and p.suffix == ".safetensors"):
        raise UsageError(f"--fid-ref {ref!r} is not allowed; allowed: a folder of images or a .safetensors file "
                         'with a uint8 tensor "images" (N, 3, H, W)')
    from safetensors import safe_open

    with checkpoint.reading(f"--fid-ref {ref}"), safe_open(str(p), "pt") as f:
        images = f.get_slice("images")
        shape, dtype = images.get_shape(), images.get_dtype()
        if dtype != "U8" or len(shape) != 4 or shape[1] != 3:
            raise ValueError(f'"images" is {dtype} {shape}; expected uint8 (N, 3, H, W)')
        return shape[0]


class Scorer:
    """The metrics of one (reward spec, FID setting). Every model loads here, once, before any image:
    what is missing is skipped with one line saying how to supply it; a weight file that is there but
    unreadable (truncated, garbage) is bad input, a UsageError naming it."""

    def __init__(self, config: dict, spec_path: str | None, device: str, log, coco: list | None = None):
        self.spec, self.device, self.config = rewards.load_spec(spec_path), device, config
        self.coco = coco  # --fid coco: [(caption, image file)]; FID then scores those captions' images only
        self.fns, self.skipped, self.fid, self.fid_ready = {}, {}, None, False
        spec = f" (reward spec {spec_path})" if spec_path else ""
        for name in ("aesthetic", "hps", "compress"):
            with checkpoint.reading(f"{name} weights{spec}"):
                try:
                    self.fns[name] = rewards.get(name, self.spec, device)
                except ValueError as e:
                    self.skipped[name] = str(e)
        with checkpoint.reading(f"CLIP weights{spec}"):
            try:
                rewards.clip_features(torch.zeros(1, 3, 8, 8), self.spec, device)  # loads the CLIP once
                self.fns["clip"] = lambda x, p: rewards.clip_score(x, p, self.spec, device)
            except ValueError as e:
                self.skipped["clip"] = str(e)
        self._setup_fid(config["fid"])
        for name, why in self.skipped.items():
            log(f"skipping {name}: {why}")
        self.enabled = {"png_kb", "jpeg_kb", *self.fns} | ({"fid"} if self.fid is not None else set())

    def _setup_fid(self, fid: dict):
        """torchmetrics' FrechetInceptionDistance: Inception v3 (torch-fidelity's FID weights, fetched on
        first use) or rewards.clip_features as its custom feature extractor."""
        if fid["ref"] is None:
            self.skipped["fid"] = fid.get("why", "no reference images; pass --fid-ref DIR (the paper: MS-COCO images)")
            return
        self.fid_ref = fid["ref"].get("dir") or fid["ref"].get("file") or "--coco"
        try:  # main() has checked an explicit --fid-ref; this is the mini world's own reference set
            n = len(self.coco) if self.coco else count_reference(self.fid_ref)
        except UsageError as e:
            n, self.skipped["fid"] = 0, str(e)
        if n < 2:
            self.skipped.setdefault("fid", f"--fid-ref {self.fid_ref!r} holds fewer than 2 images")
            return
        if fid["features"] == "clip" and "clip" in self.skipped:
            self.skipped["fid"] = "--fid-features clip needs the CLIP model: " + self.skipped["clip"]
            return
        from torchmetrics.image.fid import FrechetInceptionDistance

        try:
            feat = _ClipFeatures(self.spec, self.device) if fid["features"] == "clip" else 2048
            self.fid = FrechetInceptionDistance(feature=feat, normalize=True, reset_real_features=False)
            self.fid = self.fid.to(self.device)
        except Exception as e:  # no network for the Inception weights, ...
            self.skipped["fid"] = (f"Inception weights unavailable ({type(e).__name__}: {e}); run once with "
                                   "network access so torch-fidelity caches them, or pass --fid-features clip")

    def _fid_update(self, images):
        if not self.fid_ready:  # reference statistics once; reset() keeps them (reset_real_features=False)
            with checkpoint.reading(f"--fid-ref {self.fid_ref}"):  # an unreadable image among them
                refs = (_image_batches([f for _, f in self.coco], tuple(images.shape[-2:])) if self.coco
                        else reference_batches(self.fid_ref, tuple(images.shape[-2:])))
                for x in refs:
                    self.fid.update(x.to(self.device), real=True)
            self.fid_ready = True
        self.fid.update(images.float().to(self.device), real=False)

    def start(self):
        self.values = {k: [] for k in self.enabled if k != "fid"}
        if self.fid is not None:
            self.fid.reset()

    @torch.no_grad()
    def update(self, images: torch.Tensor, prompts: list):
        for name, fn in self.fns.items():
            self.values[name] += fn(images, prompts).float().cpu().tolist()
        self.values["png_kb"] += file_kb(images, "PNG")
        self.values["jpeg_kb"] += file_kb(images, "JPEG")
        if "fid" in self.enabled and not self.coco:
            self._fid_update(images)

    @torch.no_grad()
    def update_fid(self, images: torch.Tensor):
        """--fid coco: the COCO captions' images, for FID alone."""
        if "fid" in self.enabled:
            self._fid_update(images)

    def result(self) -> dict:
        out = {k: sum(v) / len(v) for k, v in self.values.items()}
        if "fid" in self.enabled:
            out["fid"] = float(self.fid.compute())
        return out


#### GENERATION ####

def noise_for(seed: int, p: int, i: int, shape: tuple) -> torch.Tensor:
    """Initial latents of image i of prompt p: fixed by (seed, p, i), shared by every stage and method."""
    s = int(hashlib.sha256(f"{seed}/{p}/{i}".encode()).hexdigest()[:15], 16)
    return torch.randn(shape, generator=torch.Generator().manual_seed(s))


def generator_for(seed: int, tag, b: int) -> torch.Generator:
    """The fresh noise a stochastic sampler (LCM) draws for the batch starting at job b: fixed by (seed, tag, b),
    so an eval is reproducible (with a stochastic sampler its images depend on --batch; DDIM draws nothing)."""
    s = int(hashlib.sha256(f"{seed}/sampler/{tag}/{b}".encode()).hexdigest()[:15], 16)
    return torch.Generator().manual_seed(s)


def evaluate_stage(stage: Stage, models: rid.Models, scorer: Scorer, s: Settings, bar) -> dict:
    """Generate the stage's images batch by batch, score them, cache the result and a sample strip."""
    config, group = stage.config, None
    if stage.method == "soup":
        group = checkpoint.soup(models.unet, list(stage.dirs), list(stage.weights) if stage.weights else None)
    elif stage.dirs:
        group = checkpoint.load(models.unet, stage.dirs[0])
    prompts, n = config["prompts"], config["images_per_prompt"]
    jobs = [(p, i) for p in range(len(prompts)) for i in range(n)]
    scorer.start()
    strip = []
    bar.set_description(f"{stage.method} {stage.name}")
    for b in range(0, len(jobs), s.batch):
        batch = jobs[b:b + s.batch]
        noise = torch.stack([noise_for(config["seed"], p, i, models.latent_shape) for p, i in batch])
        texts = [prompts[p] for p, _ in batch]
        images = rid.sample(models, texts, noise, steps=config["steps"], guidance=config["guidance"], group=group,
                            sampler=config.get("sampler", "auto"), generator=generator_for(config["seed"], "test", b))
        scorer.update(images, texts)  # (B, 3, H, W) in [0, 1]
        strip += [img for (p, i), img in zip(batch, images.cpu()) if i == 0 and p < config["grid_prompts"]]
        bar.update(len(batch))
    if scorer.coco and "fid" in scorer.enabled:  # the paper's zero-shot COCO FID: one image per caption
        captions = [c for c, _ in scorer.coco]
        for b in range(0, len(captions), s.batch):
            noise = torch.stack([noise_for(config["seed"], "coco", j, models.latent_shape)
                                 for j in range(b, min(b + s.batch, len(captions)))])
            scorer.update_fid(rid.sample(models, captions[b:b + s.batch], noise, steps=config["steps"],
                                         guidance=config["guidance"], group=group, sampler=config.get("sampler", "auto"),
                                         generator=generator_for(config["seed"], "coco", b)))
            bar.update(len(noise))
    result = {"key": stage.key, "stage": stage.name, "index": stage.index, "n_images": len(jobs),
              "metrics": scorer.result(), "config": config}
    js, png = _cache_paths(stage)
    js.parent.mkdir(parents=True, exist_ok=True)
    _save_strip(torch.stack(strip), png)
    checkpoint.atomic_write(js, json.dumps(result, indent=1))  # a killed eval leaves no half-written cache
    result["strip"] = str(png)
    return result


def _save_strip(images: torch.Tensor, path: Path, max_side: int = 256):
    """One row of thumbnails (first image of each grid prompt)."""
    imgs = [Image.fromarray((x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()) for x in images]
    imgs = [im if max(im.size) <= max_side else im.resize((max_side, max_side * im.height // im.width), Image.BICUBIC)
            for im in imgs]
    w, h = imgs[0].size
    row = Image.new("RGB", (w * len(imgs), h))
    for j, im in enumerate(imgs):
        row.paste(im, (j * w, 0))
    checkpoint.atomic_write(path, lambda tmp: row.save(tmp, format="PNG"))


#### EVALUATION ####

def plan(ckpts: list, soup: list | None, weights: list | None, s: Settings, out: Path | None):
    """Validate the inputs; list the stage chains (base, stage 1, ..., stage T per run; base, soup).
    Raises UsageError. -> (chains, out dir, runs)."""
    runs = [load_run(c) for c in ckpts]
    methods = [r.info.get("method", "run") for r in runs]
    for r, m in zip(runs, methods):  # the method name, or the directory name when methods repeat
        r.label = m if methods.count(m) == 1 else f"{m} ({r.dir.name})"
    if out is None:
        first = Path(ckpts[0] if ckpts else soup[0])
        out = first if len(ckpts) == 1 and not soup else first.resolve().parent / ("eval-" + "+".join(
            Path(p).resolve().name for p in [*ckpts, *(soup or [])]))
    chains = [stages_of(r) for r in runs]
    for r in (r for r in runs if few_step(r)):  # the base at its usual steps: a chain of its own
        n = usual_steps(r)
        chains.append([Stage(r, 0, f"stage0-base-{n}steps", f"base ({n} steps)", cache_dir=r.dir / "eval", steps=n)])
    if soup:
        sp = soup_stage(soup, weights, out / "eval")
        chains.append([Stage(sp.run, 0, "stage0-base", "base", cache_dir=sp.run.dir / "eval"), sp])
    for st in (st for chain in chains for st in chain):
        try:
            st.config = stage_config(st, s)
        except ValueError as e:
            raise UsageError(str(e)) from None
        st.key = stage_key(st, st.config)
        if st.index == 0 and few_step(st.run) and st.steps is None:  # the base at the generator's K
            st.name = f"stage0-base-{st.config['steps']}steps"
    return chains, out, runs


def _adapter_layout(stage: Stage):
    """(rank, targets) of a stage's adapters; None for the base model."""
    if not stage.dirs:
        return None
    meta = checkpoint.read_meta(stage.dirs[0])
    return meta["rank"], tuple(meta["targets"])


def evaluate(ckpts: list, soup: list | None = None, weights: list | None = None, s: Settings | None = None,
             out: Path | None = None, log=print) -> dict:
    """Evaluate every stage (cached ones are read back) and write the report. -> report dict with
    "computed": the number of stages generated and scored in this call."""
    s = s or Settings()
    chains, out, runs = plan(ckpts, soup, weights, s, out)
    n_flow = sum(flow_world(r.info["model"]) is not None for r in runs)
    n_mini = sum(map(is_mini, runs)) - n_flow
    if n_mini:
        log(f"{n_mini} of {len(runs)} run(s) trained in the mini world ({mini.MODEL}, CPU-scale; train.py without "
            f"--model): evaluated there. eval.py follows each run's model; for the paper's setting train with "
            f"--model stable-diffusion-v1-5/stable-diffusion-v1-5")
    if n_flow:
        log(f"{n_flow} of {len(runs)} run(s) trained in a mini flow world (CPU-scale, the mini world's rewards, "
            f"prompts and FID reference): evaluated there, each on its run's model")
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # transformers' per-load "Loading weights" bar, as in train.py
    stages = [st for chain in chains for st in chain]
    cache_dirs = sorted({str(st.cache_dir) for st in stages})
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[s.dtype]
    scorers, loaded = {}, {}  # loaded: (model id, text_encoder_3) -> (Models, adapter layout injected into its UNet)

    def base(st):  # the loaded model a stage samples with: its run's model, with or without SD3's T5
        return st.run.info["model"], st.config.get("text_encoder_3", "auto")

    def scorer_for(st):
        key = json.dumps([st.config["spec"], st.config["fid"]], sort_keys=True)
        if key not in scorers:
            coco = coco_pairs(s.coco, s.coco_n)[0] if s.coco is not None else None
            scorers[key] = Scorer(st.config, s.reward_spec or st.run.info.get("reward_spec"), s.device, log, coco)
        return scorers[key]

    def load(st):
        model, t5 = base(st)
        with checkpoint.reading(f"{st.run.dir / 'run.json'}: model {model}"):  # garbage weight files
            try:
                loaded[model, t5] = (rid.load_models(model, device=s.device, dtype=dtype, text_encoder_3=t5,
                                                     name=lambda option: "--" + option.replace("_", "-")), None)
            except ValueError as e:  # not a model directory or hub id: rid says why
                raise UsageError(f"{st.run.dir / 'run.json'}: {e}") from None

    def models_for(st):
        """The run's base model; reloaded only when a stage needs another adapter layout, or the base
        model after adapters were injected (checkpoint.load reuses a UNet's group of the same layout)."""
        model, layout = base(st), _adapter_layout(st)
        if loaded[model][1] is not None and loaded[model][1] != layout:
            load(st)
        models = loaded[model][0]
        loaded[model] = (models, layout or loaded[model][1])
        return models

    todo = {}
    for st in stages:
        st.result = find_cached(st, cache_dirs, scorer_for(st).enabled)
        if st.result is None:
            todo.setdefault(st.key, st)  # a base model shared by several runs is generated once
    order = sorted(todo.values(), key=lambda t: (t.index > 0, str(_adapter_layout(t))))  # bases first
    for st in order:  # load the base models up front: a bad model id fails before any progress bar
        if base(st) not in loaded:
            load(st)
    for st in order:  # and every stage's image size against its model's
        try:
            loaded[base(st)][0].set_resolution(st.config.get("resolution"), "--resolution")
        except ValueError as e:
            raise UsageError(f"{st.name}: {e}") from None
    total = sum(images_of(t.config) for t in order)
    with tqdm(total=total, unit="img", disable=not order) as bar:
        for st in order:
            models = models_for(st)
            try:
                models.set_resolution(st.config.get("resolution"), "--resolution")
                st.result = evaluate_stage(st, models, scorer_for(st), s, bar)
            except ValueError as e:  # adapters that do not fit the run's base model
                raise UsageError(f"{st.name}: {e}") from None
    for st in stages:
        st.result = st.result or todo[st.key].result
    report = build_report(chains, runs, s, scorers)
    report["computed"] = len(order)
    write_report(report, out)
    n = len({st.key for st in stages})
    log(f"{len(order)} of {n} distinct stage(s) computed, {n - len(order)} read from cache; report in {out}")
    return report


#### REPORT ####

def _trained_before(st: Stage) -> list:
    """The rewards trained in the stages before `st` of its run (a joint task: each of its parts)."""
    info = st.run.info
    parts = lambda task: list((info.get("config") or {}).get("joint") or []) if task == "joint" else [task]  # noqa: E731
    return [p for task in list(info.get("tasks") or [])[:st.index - 1] for p in parts(task)]


def _trained_on_clip_metric(st: Stage) -> bool:
    """Whether the adapters of `st` were trained on the clip reward with the very CLIP model that scores
    the CLIP metric here (then that column measures the reward the stage maximised, not a judge)."""
    info = st.run.info
    joint = (info.get("config") or {}).get("joint") or []
    parts = [p for task in list(info.get("tasks") or [])[:st.index] for p in (list(joint) if task == "joint" else [task])]
    if "clip" not in parts:
        return False
    trained = rewards.load_spec(info.get("reward_spec"))
    return (trained.clip_arch, trained.clip_weights) == (st.config["spec"]["clip_arch"], st.config["spec"]["clip_weights"])


def _row(st: Stage, chain: list | None) -> dict:
    """A table row. chain: the run's stages 0..this one, for forgetting (None for the base model and
    a soup, which have no trajectory). "forgetting" holds Eq. 3 for every metric; "forgetting_shown"
    the metrics the paper prints it for at this stage."""
    f, shown = None, []
    if chain is not None and len(chain) > 1:
        f = {m: forgetting([x.result["metrics"].get(m) for x in chain], METRICS[m][1]) for m in METRICS}
        shown = forgetting_shown(_trained_before(st))
    sur = None  # a black-box stage's surrogate check (train.py's surrogate.json): held-out pair accuracy, τ
    if len(st.dirs) == 1 and (Path(st.dirs[0]) / "surrogate.json").is_file():
        try:
            sur = json.loads((Path(st.dirs[0]) / "surrogate.json").read_text())
        except (OSError, json.JSONDecodeError):
            sur = None
    return {"method": st.method, "stage": st.index, "name": st.name, "run": str(st.run.dir), "key": st.key,
            "metrics": st.result["metrics"], "forgetting": f, "forgetting_shown": shown, "strip": st.result["strip"],
            "surrogate": sur}


def build_report(chains: list, runs: list, s: Settings, scorers: dict) -> dict:
    """Rows in the paper's Table-2 order: the base model once per distinct base, then stage by stage
    every run side by side, the soup last."""
    rows, seen = [], set()
    for chain in chains:
        if chain[0].key not in seen:
            seen.add(chain[0].key)
            rows.append(_row(chain[0], None))
    runs_chains = [c for c in chains if c[-1].method != "soup"]
    for k in range(1, max(len(c) for c in chains)):
        rows += [_row(c[k], c[:k + 1]) for c in runs_chains if len(c) > k]
    rows += [_row(c[-1], None) for c in chains if c[-1].method == "soup"]
    skipped = {k: v for sc in scorers.values() for k, v in sc.skipped.items()}
    on_metric = [st.name if st.method == "base" else f"{st.method} {st.name}" for chain in chains for st in chain
                 if st.index > 0 and st.method != "soup" and _trained_on_clip_metric(st)]
    return {"settings": dataclasses.asdict(s), "clip_metric_trained_on": on_metric,
            "runs": [{"label": r.label, "dir": str(r.dir), "method": r.info.get("method"), "tasks": r.info.get("tasks")}
                     for r in runs],
            "rows": rows, "skipped": skipped}


def _fmt(v, m):
    return "–" if v is None else f"{v:.{METRICS[m][2]}f}"


def _fmt_forgetting(row: dict, m: str) -> str:
    """" (F)" where the paper prints forgetting, " (-)" where it prints a dash, "" without a trajectory."""
    if row["forgetting"] is None:
        return ""
    return f" ({_fmt(row['forgetting'].get(m), m)})" if m in row["forgetting_shown"] else " (-)"


FORGETTING_NOTE = ("Rows after the base model: value (forgetting F, the paper's Eq. 3: the largest drop from any "
                   "stage 0..k to this stage k; F ≥ 0, lower is better for every metric). As in the paper's "
                   "tables, F is printed for CLIP and FID at every stage and for a target metric only once its task "
                   "was trained before the stage, \"-\" otherwise; report.json keeps every value.")


def write_report(report: dict, out: Path):
    out.mkdir(parents=True, exist_ok=True)
    rows = report["rows"]
    cols = [m for m in METRICS if any(m in r["metrics"] for r in rows)]
    head = ["Method", "Stage"] + [f"{METRICS[m][0]} {'↑' if METRICS[m][1] else '↓'}" for m in cols]
    md = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [_fmt(r["metrics"].get(m), m) + _fmt_forgetting(r, m) for m in cols]
        md.append(f"| {r['method']} | {r['stage']}: {r['name']} | " + " | ".join(cells) + " |")
    figures = write_figures(rows, out)
    notes = ["", FORGETTING_NOTE, "", "Figures: " + ", ".join(f"[{what}]({name})" for what, name in figures)]
    notes += [f"Skipped {k}: {v}" for k, v in report["skipped"].items()]
    surs = [r for r in rows if isinstance(r.get("surrogate"), dict) and isinstance(r["surrogate"].get("final"), dict)]
    if surs:
        notes += ["", "Black-box stages: the surrogate against the true reward on held-out prompts (train.py's "
                  "surrogate.json; pair accuracy over same-prompt pairs, Kendall τ over all samples):", "",
                  "| Method | Stage | Task | pair acc. (pre-trained) | pair acc. (end) | Kendall τ (end) | true reward (end) |",
                  "|---|---|---|---|---|---|---|"]
        for r in surs:
            g, pre = r["surrogate"], r["surrogate"].get("pretrain") or {}
            num = lambda v, d=3: "–" if not isinstance(v, (int, float)) else f"{v:.{d}f}"  # noqa: E731
            notes.append(f"| {r['method']} | {r['stage']}: {r['name']} | {g.get('task')} | {num(pre.get('pair_acc'))} | "
                         f"{num(g['final'].get('pair_acc'))} | {num(g['final'].get('kendall_tau'))} | "
                         f"{num(g['final'].get('true_reward'), 4)} |")
    if report.get("clip_metric_trained_on"):
        notes += ["", "Trained on the CLIP metric's own model (the clip reward is 100·cos with the model that scores "
                  "the CLIP column), so their CLIP values measure the reward they maximised: "
                  + ", ".join(report["clip_metric_trained_on"]) + "."]
    checkpoint.atomic_write(out / "report.md", "\n".join(md + notes) + "\n")
    table = io.StringIO(newline="")
    w = csv.writer(table)
    w.writerow(["method", "stage", "name", "run"] + cols + [f"{m}_forgetting" for m in cols])
    for r in rows:  # forgetting where the paper prints it, empty otherwise (report.json has every value)
        fg = {m: v for m, v in (r["forgetting"] or {}).items() if m in r["forgetting_shown"]}
        w.writerow([r["method"], r["stage"], r["name"], r["run"]] + [r["metrics"].get(m, "") for m in cols]
                   + ["" if fg.get(m) is None else fg[m] for m in cols])
    checkpoint.atomic_write(out / "report.csv", table.getvalue())
    checkpoint.atomic_write(out / "report.json", json.dumps(report, indent=1))


def last_stage_rows(rows: list) -> list:
    """Each run's last row, its forgetting kept where the paper prints it (None elsewhere): what the
    forgetting figure and tables average over runs."""
    last = {}
    for r in rows:
        if r["forgetting"] is not None and r["stage"] >= last.get(r["run"], {"stage": -1})["stage"]:
            last[r["run"]] = r
    return [{**r, "forgetting": {m: (v if m in r["forgetting_shown"] else None) for m, v in r["forgetting"].items()}}
            for r in last.values()]


def write_figures(rows: list, out: Path) -> list:
    """grid.png (samples), stages.png (every metric across stages per method), forgetting.png (each run's
    last stage); each plot's data beside it as JSON. -> [(what, file name)] for the report's links."""
    write_grid(rows, out / "grid.png")
    figures = [("samples", "grid.png")]
    plots.stage_figure(rows, METRICS, out / "stages.png")
    figures.append(("metrics across stages", "stages.png"))
    last = last_stage_rows(rows)
    if any(v is not None for r in last for v in r["forgetting"].values()):
        plots.forgetting_figure(last, METRICS, out / "forgetting.png")
        figures.append(("forgetting", "forgetting.png"))
    return figures


def write_grid(rows: list, path: Path, label_w: int = 160):
    """Rows = the table's rows, columns = the first grid prompts (first image of each)."""
    strips = [Image.open(r["strip"]).convert("RGB") for r in rows]
    up = max(1, -(-64 // max(s.height for s in strips)))  # tiny images (mini world): enlarge, no blur
    strips = [s.resize((s.width * up, s.height * up), Image.NEAREST) for s in strips]
    w, h = max(s.width for s in strips), max(s.height for s in strips)
    grid = Image.new("RGB", (label_w + w, h * len(strips)), "white")
    draw = ImageDraw.Draw(grid)
    for j, (r, strip) in enumerate(zip(rows, strips)):
        grid.paste(strip, (label_w, j * h))
        label = f"{r['method']}\n{r['name']}".replace("λ", "lam")   # PIL's built-in font has no Greek glyphs
        draw.text((4, j * h + 4), label, fill="black")
    checkpoint.atomic_write(path, lambda tmp: grid.save(tmp, format="PNG"))


#### CLI ####

def build_parser() -> argparse.ArgumentParser:
    d = Settings()
    p = cli.Parser(prog="eval.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--ckpt", nargs="+", default=[], help="run directories written by train.py (several: side by side)")
    a("--soup", nargs="+", help="runs (or stage dirs) to average into one model soup, evaluated like a stage")
    a("--weights", nargs="+", type=float, help="soup weights, one per --soup entry (default: equal)")
    a("--out", help="report directory (default: the --ckpt dir; a new eval-<names> dir beside it for several)")
    a("--images-per-prompt", type=int, default=d.images_per_prompt,
      help=f"images per test prompt, 1 to {MAX_IMAGES_PER_PROMPT} (default: {d.images_per_prompt})")
    a("--seed", type=int, default=d.seed, help=f"noise seed shared by every stage and method, 0 to 2**63-1 (default: {d.seed})")
    a("--batch", type=int, default=d.batch, help=f"images per sampling batch (default: {d.batch}); the noise per image is fixed, so images "
                                                  "agree up to float rounding")
    a("--steps", type=int, help="DDIM steps (default: the run's; for an r0 run its generator's K, and its base "
                                "model is also evaluated at its usual steps)")
    a("--guidance", type=float, help="classifier-free guidance (default: the run's)")
    a("--sampler", help=f"{SAMPLER['sampler']['help']}; one of {', '.join(SAMPLER['sampler']['choices'])} "
                        "(default: the run's)")
    a("--max-prompts", type=int, help="evaluate only the first N test prompts (quick looks)")
    a("--resolution", type=int, help="image side in pixels (default: the run's train.py --resolution, else the "
                                     "model's own: 512 for SD-1.5, 32 in the mini world)")
    a("--reward-spec", help="reward spec JSON (default: the run's; see rewards.RewardSpec)")
    a("--text-encoder-3", choices=rid.TEXT_ENCODER_3, help=f"{rid.TEXT_ENCODER_3_HELP} (default: the run's)")
    a("--fid", choices=("test", "coco"), default="test",
      help="test: FID of the test prompts' images against --fid-ref (the mini world: its own reference set); "
           "coco: the paper's zero-shot FID on MS-COCO, one image per caption of the first --coco-n images of "
           "COCO's val captions against those images (needs --coco) (default: test)")
    a("--coco", metavar="DIR", help="local MS-COCO: DIR/annotations/captions_val2017.json and DIR/val2017/*.jpg "
                                    "(cocodataset.org: annotations_trainval2017.zip and val2017.zip; val2014 too)")
    a("--coco-n", type=int, default=COCO_N, help=f"captions of the COCO FID, 2 to 40504 (default: {COCO_N}: about "
                                                 "an hour for base + 3 stages of SD-1.5 on one A100)")
    a("--fid-ref", help="folder of reference images for FID of the test prompts' images; mini world: its own")
    a("--fid-features", choices=("inception", "clip"), help="FID feature space (default: inception; clip in the mini world)")
    a("--dtype", choices=("fp32", "fp16", "bf16"), help="sampling precision (default: fp16 on CUDA, fp32 on CPU)")
    a("--device", help="cuda or cpu (default: cuda if available)")
    return p


def check_settings(args) -> None:
    """Every numeric flag, up front: integers in range, floats finite. --steps and --guidance take
    the range rid.StepConfig declares for them (the training sampler's)."""
    ints = {"images_per_prompt": (1, MAX_IMAGES_PER_PROMPT), "batch": (1, None), "max_prompts": (1, None),
            "seed": (0, MAX_SEED), "resolution": (8, 8192)}  # the model's own multiple is checked when it loads
    for name, (lo, hi) in ints.items():
        v = getattr(args, name)
        if v is not None and not (lo <= v and (hi is None or v <= hi)):
            allowed = f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}"
            raise UsageError(f"--{name.replace('_', '-')} {v} is not allowed; allowed: {allowed}")
    for name in ("steps", "guidance"):
        v = getattr(args, name)
        if v is not None and not SAMPLER[name]["check"](v):
            raise UsageError(f"--{name} {v} is not allowed; allowed: {SAMPLER[name]['allowed']}")
    if args.sampler is not None and args.sampler not in SAMPLER["sampler"]["choices"]:
        raise UsageError(f"--sampler {args.sampler!r} is not allowed; allowed: {', '.join(SAMPLER['sampler']['choices'])}")
    for w in args.weights or []:
        if not (math.isfinite(w) and w > 0):
            raise UsageError(f"--weights {w} is not allowed; allowed: finite numbers > 0, one per --soup entry")


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        device = checkpoint.check_device("--device", args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        s = Settings(images_per_prompt=args.images_per_prompt, seed=args.seed, steps=args.steps,
                     guidance=args.guidance, sampler=args.sampler, dtype=args.dtype or ("fp16" if device.startswith("cuda") else "fp32"),
                     device=device, batch=args.batch, reward_spec=args.reward_spec, fid_ref=args.fid_ref,
                     fid_features=args.fid_features, max_prompts=args.max_prompts, resolution=args.resolution,
                     text_encoder_3=args.text_encoder_3,
                     coco=args.coco if args.fid == "coco" else None, coco_n=args.coco_n)
        check_settings(args)
        if args.fid == "coco":
            if args.coco is None:
                raise UsageError("--fid coco needs --coco DIR (a local MS-COCO with annotations/captions_val2017.json "
                                 "and val2017/)")
            if not 2 <= args.coco_n <= 40504:
                raise UsageError(f"--coco-n {args.coco_n} is not allowed; allowed: an integer in [2, 40504]")
            if args.fid_ref is not None:
                raise UsageError("--fid-ref and --fid coco: give one (with --fid coco the COCO images are the reference)")
            coco_pairs(args.coco, args.coco_n)  # a bad folder fails now, in one line
        elif args.coco is not None:
            raise UsageError(f"--coco {args.coco!r} is used by --fid coco only; add --fid coco")
        if not args.ckpt and not args.soup:
            raise UsageError("nothing to evaluate: pass --ckpt RUN_DIR [...] and/or --soup RUN_DIR [...]")
        if args.weights and not args.soup:
            raise UsageError("--weights applies to --soup; pass the soup runs with --soup")
        if args.fid_ref is not None:
            if not Path(args.fid_ref).exists():
                raise UsageError(f"--fid-ref {args.fid_ref!r} does not exist; pass a folder of reference images")
            n = count_reference(args.fid_ref)
            if n < 2:
                raise UsageError(f"--fid-ref {args.fid_ref!r} holds {n} image(s); FID needs at least 2")
        if args.out is not None:
            try:
                Path(args.out).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise UsageError(f"--out {args.out!r}: not a writable directory ({e.strerror or e})") from None
        evaluate(args.ckpt, args.soup, args.weights, s, Path(args.out) if args.out is not None else None,
                 log=tqdm.write)
    except UsageError as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
