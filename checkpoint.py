"""What a run leaves on disk, and how it is written: adapter groups (save, load, model soup,
LoRA export in diffusers and kohya names) and the run-directory contract shared by train.py and eval.py.

    <run>/run.json                  tasks, method, model, reward spec, finished stages, seed, config
    <run>/train_prompts.txt, test_prompts.txt      the prompt split (paths in run.json are relative)
    <run>/stageK-<task>/            adapters.safetensors + adapters.json (all K adapters), config.json,
                                    metrics.jsonl, samples.png, pytorch_lora_weights.safetensors (the stage's
                                    model as one LoRA: pipe.load_lora_weights(stage dir)), lora_kohya.safetensors
                                    (the same in kohya names, UNet models: ComfyUI, A1111)
    <run>/stageK-<task>/ckpt/       resumable mid-task state while stage K runs (removed when it ends);
                                    ckpt.old/ the checkpoint before it, the fallback when ckpt/ is unreadable
    <run>/eval/                     eval.py's per-stage cache
    <run>/.lock                     pid and host of the train.py writing the run (flock-held)

Every file is written through `atomic_write` (a temp file unique to the process, then os.replace),
every directory through `save_dir_atomic`: a reader never sees half a file, a kill never leaves one.
Paths stored in run.json are relative to the run directory and never resolve outside it (`inside`).
Every way a file can fail to load (truncated, garbage, missing keys, wrong shapes) surfaces as one
UsageError naming the file (`reading`); adapters.json carries the sha256 of adapters.safetensors,
checked on every load.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch

import rid
from cli import Parser, UsageError

FORMAT_VERSION = 1


def check_device(flag: str, name: str) -> str:
    """A device this machine has: cpu, cuda or cuda:N (N below the device count), mps."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"{flag} {name!r} is not allowed; allowed: cpu, cuda, cuda:N, mps")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{flag} {name}: no CUDA device is available here; use {flag} cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"{flag} {name}: MPS is not available here; use {flag} cpu")
    return name


#### LOAD ERRORS: one place, one line ####

def _why(e: BaseException) -> str:
    if isinstance(e, KeyError):
        return f"missing key {e.args[0]!r}" if e.args else "missing key"
    if isinstance(e, pickle.UnpicklingError):
        return "not a weights-only torch file (UnpicklingError)"
    if isinstance(e, EOFError):
        return "truncated (EOFError)"
    text = next((l.strip() for l in str(e).splitlines() if l.strip()), "")
    text = getattr(e, "strerror", None) or text
    return f"{type(e).__name__}: {text[:200]}" if text else type(e).__name__


def load_errors() -> tuple:
    """What reading a file we wrote can raise when it was truncated, overwritten or edited: OSError,
    EOF/unpickling (torch.load), JSON, safetensors' own error, missing keys, shape mismatches
    (RuntimeError from copy_/cat), wrong types."""
    from safetensors import SafetensorError

    return (OSError, EOFError, pickle.UnpicklingError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, RuntimeError, SafetensorError)


@contextmanager
def reading(what):
    """Every load error inside -> UsageError("<what>: <why>"), one line. `what` names the file (and, when
    it helps, what it is). UsageErrors pass through untouched (they already name their file)."""
    try:
        yield
    except UsageError:
        raise
    except load_errors() as e:
        raise UsageError(f"{what}: unreadable or corrupt ({_why(e)})") from None


#### ATOMIC WRITES ####

def atomic_write(path, data) -> None:
    """Write `data` (str, bytes, or a function taking the temp path) to `path` via a temp file in the
    same directory, then os.replace: `path` is either the old file or the complete new one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        if callable(data):
            data(tmp)
        else:
            Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=1) + "\n")


def save_dir_atomic(path: Path, write, keep_old: bool = False) -> None:
    """write(tmp_dir) then swap it in: a reader finds `path` (or, mid-swap, `path.old`) complete. The temp
    directory's name is unique to the call (mkdtemp). keep_old: the replaced `path` stays as `path.old`
    (the previous checkpoint, a fallback when the new one turns out unreadable or non-finite)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(path.name + ".old")
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if not keep_old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_temps(d: Path) -> None:
    """Temp files/dirs a killed writer left in `d` (names from atomic_write/save_dir_atomic). Call only
    while holding the run's lock: no other writer can own them."""
    for p in Path(d).glob(".*.tmp") if Path(d).is_dir() else []:
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def ckpt_candidates(stage_dir: Path) -> list[Path]:
    """The stage's mid-task checkpoints, newest first: ckpt/, then ckpt.old/ (the one before it, or the
    only one when a kill fell between the two renames of a swap)."""
    return [p for p in (stage_dir / "ckpt", stage_dir / "ckpt.old") if (p / "trainer.pt").exists()]


def find_ckpt(stage_dir: Path) -> Path | None:
    found = ckpt_candidates(stage_dir)
    return found[0] if found else None


def remove_ckpts(stage_dir: Path) -> None:
    """Every mid-task checkpoint of a finished stage (ckpt/, ckpt.old/ and any set aside as unreadable)."""
    for name in ("ckpt", "ckpt.old", "ckpt.unreadable", "ckpt.old.unreadable"):
        shutil.rmtree(Path(stage_dir) / name, ignore_errors=True)


def load_trainer(ckpt: Path) -> dict:
    """trainer.pt of a mid-task checkpoint: {"step": int ≥ 1, "optimizer": AdamW state dict}."""
    path = Path(ckpt) / "trainer.pt"
    with reading(path):
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(state, dict) and isinstance(state["step"], int) and state["step"] >= 1
                and isinstance(state["optimizer"], dict)):
            raise ValueError(f"expected {{'step': int >= 1, 'optimizer': dict}}, got {type(state).__name__}")
    return state


#### RUN DIRECTORY ####

def inside(run_dir, value, what: str) -> Path:
    """A path stored in run.json (`what` names its key), resolved inside the run directory: relative to
    it, or absolute and within it (runs written before paths were relative). Anything that resolves
    outside it (.., an absolute path elsewhere, a symlink out) is refused."""
    root = Path(run_dir).resolve()
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{Path(run_dir) / 'run.json'}: {what} {value!r} is not allowed; allowed: a path "
                         "inside the run directory")
    p = (root / value).resolve()  # an absolute value replaces root
    if p == root or not p.is_relative_to(root):
        raise UsageError(f"{Path(run_dir) / 'run.json'}: {what} {value!r} resolves outside the run directory "
                         f"{root}; allowed: a path inside it")
    return p


def read_run(run_dir, need: tuple = ("model", "test_prompts")) -> dict:
    """run.json, checked: a JSON object whose `need`ed keys are present, whose "stages" is a list of
    paths inside the run, and whose prompt files ("train_prompts", "test_prompts") are inside it too."""
    path = Path(run_dir) / "run.json"
    with reading(path):
        info = json.loads(path.read_text())
        if not isinstance(info, dict):
            raise ValueError(f"expected a JSON object, got {type(info).__name__}")
        missing = [key for key in need if key not in info]
        if missing:
            raise KeyError(missing[0])
        if not isinstance(info.get("stages", []), list):
            raise ValueError(f"'stages' must be a list, got {info['stages']!r}")
        if not isinstance(info.get("config", {}), dict):
            raise ValueError(f"'config' must be an object, got {type(info['config']).__name__}")
    for s in info.get("stages", []):
        inside(run_dir, s, "stage")
    for key in ("train_prompts", "test_prompts"):
        if key in info:
            inside(run_dir, info[key], key)
    return info


def read_metrics(path: Path, log=None) -> list[dict]:
    """metrics.jsonl rows. The file is appended a line per step, so a kill can tear only its last line:
    that one is dropped (with a message to `log`); an unreadable earlier line is an error."""
    lines = Path(path).read_text().splitlines()
    rows = []
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
            if not (isinstance(row, dict) and isinstance(row["step"], int) and isinstance(row["time"], (int, float))):
                raise ValueError
        except (ValueError, KeyError):
            if i == len(lines) - 1:
                if log:
                    log(f"{path}: dropping its torn last line {line[:60]!r} (a kill while it was written)")
                break
            raise UsageError(f"{path}: line {i + 1} is not a metrics row ({line[:60]!r}); fix or delete "
                             "the line") from None
        rows.append(row)
    return rows


class RunLock:
    """<out>/.lock: one train.py per run directory. The file holds {"pid", "host"} of its holder, and the
    holder keeps an exclusive flock on it (the kernel drops it when the process dies, however it dies).
    A lock whose holder is gone (flock free; on this host, pid not running) is taken over with a
    message; a live holder means exit 2 with one line naming it."""

    def __init__(self, out: Path, log=print, name: str = ".lock", label: str | None = None):
        """name: the lock file's name in `out` (one lock per file written there); label: how messages name what is
        locked (default `--out OUT`)."""
        import fcntl

        self.path = Path(out) / name
        label = label or f"--out {out}"
        me = {"pid": os.getpid(), "host": socket.gethostname()}
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
            while True:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    held = self._holder()
                    os.close(self.fd)
                    raise UsageError(f"{label} is in use by {self._who(held)} ({self.path}); wait for it "
                                     "to finish or choose another --out") from None
                try:  # the holder before us may have unlinked the file after we opened it: retry
                    if os.fstat(self.fd).st_ino == os.stat(self.path).st_ino:
                        break
                except FileNotFoundError:
                    pass
                os.close(self.fd)
        except OSError as e:
            raise UsageError(f"{label}: not writable ({e.strerror or e})") from None
        held = self._holder()
        if held and held != me:
            if held.get("host") != me["host"] or _pid_running(held.get("pid")):
                os.close(self.fd)  # flock free but the holder may be alive (another host; no flock there)
                raise UsageError(f"{label} is locked by {self._who(held)} ({self.path}); if no train.py runs "
                                 "there any more, delete the lock file")
            log(f"{self.path}: taking over the lock of {self._who(held)}, which is no longer running")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(me).encode(), 0)
        os.fsync(self.fd)
        self.me = me

    def _holder(self) -> dict | None:
        try:
            held = json.loads(os.pread(self.fd, 4096, 0) or b"null")
            return held if isinstance(held, dict) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def _who(held) -> str:
        return f"pid {held.get('pid')} on host {held.get('host')}" if held else "another process"

    def release(self) -> None:
        """Remove the file (a later run then finds no stale lock) and drop the flock."""
        if self.fd is None:
            return
        try:
            if self._holder() == self.me:
                self.path.unlink(missing_ok=True)
        finally:
            os.close(self.fd)
            self.fd = None


def _pid_running(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


#### ADAPTER GROUPS ####

def fingerprint(group: rid.AdapterGroup) -> str:
    """Hash of a strided sample of the wrapped base weights (bf16-rounded, so fp32/bf16/fp16 loads of
    the same model agree): recognises the base model after its directory moved."""
    h = hashlib.sha256()
    for name, layer in group.layers.items():
        w = layer.base.weight.detach().flatten()
        sample = w[:: max(1, w.numel() // 16)][:16].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(name.encode() + bytes(sample.numpy().tobytes()))
    return h.hexdigest()[:16]


def save(group: rid.AdapterGroup, dir, extra: dict | None = None) -> None:
    """dir/adapters.safetensors (every task's A/B per layer, the EMA buffer) + dir/adapters.json."""
    from safetensors.torch import save_file

    os.makedirs(dir, exist_ok=True)
    tensors = {}
    for i in range(len(group.tasks)):
        for name, (A, B) in group.task_tensors(i).items():
            tensors[f"{i}/{name}/A"] = A.detach().float().contiguous().cpu().clone()
            tensors[f"{i}/{name}/B"] = B.detach().float().contiguous().cpu().clone()
    if group.trainable:
        tensors["ema"] = group.ema.detach().cpu().clone()
    meta = {"format": "rid-adapters", "version": FORMAT_VERSION, "tasks": group.tasks, "scales": group.scales,
            "rank": group.rank, "targets": list(group.targets), "layers": list(group.layers),
            "trainable": group.trainable, "base_model": group.base_model,
            "fingerprint": fingerprint(group), "extra": extra or {}}
    digest = []

    def write(tmp):  # the checksum of exactly the bytes that are renamed into place
        save_file(tensors, tmp)
        digest.append(file_sha256(tmp))
    atomic_write(os.path.join(dir, "adapters.safetensors"), write)
    atomic_write(os.path.join(dir, "adapters.json"), json.dumps({**meta, "sha256": digest[0]}, indent=1))


def file_sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify(dir) -> str:
    """sha256 of dir/adapters.safetensors, checked against the one adapters.json recorded at save (groups
    saved before checksums existed have none: their safetensors header is checked instead). -> the hash."""
    from safetensors import safe_open

    meta, st = read_meta(dir), Path(dir) / "adapters.safetensors"
    with reading(st):
        digest = file_sha256(st)
        if "sha256" not in meta:
            with safe_open(str(st), "pt") as f:  # offsets within the file: catches truncation
                f.keys()
    if meta.get("sha256", digest) != digest:
        raise UsageError(f"{st}: checksum mismatch (adapters.json recorded {str(meta['sha256'])[:12]}…, the file "
                         f"hashes to {digest[:12]}…): it changed after it was saved")
    return digest


def export_lora(group: rid.AdapterGroup, path, keys=None, fmt: str = "diffusers") -> str:
    """ONE standard LoRA file: Σ_i s_i B_i A_i = [s_1 B_1 … s_T B_T]·[A_1; …; A_T], exact at rank T·r.
    keys: the backbone (models, or key_map's stand-in) whose lora_keys / kohya_keys name the tensors
    (default: SD-1.5's). fmt "diffusers": diffusers/peft names, no alpha keys, so diffusers sets
    alpha = rank and the scale is 1 (pipe.load_lora_weights). fmt "kohya": kohya/sgm names with
    alpha = rank (scale 1), the task scales folded into the up weights (ComfyUI, A1111; diffusers
    converts it). A directory `path` gets diffusers' default name pytorch_lora_weights.safetensors."""
    if not group.tasks:
        raise ValueError("export_lora: the adapter group has no tasks; call add_task or checkpoint.load first")
    per_task = [group.task_tensors(i) for i in range(len(group.tasks))]
    return _write_lora(list(group.layers), per_task, group.scales, path, keys, fmt)


FORMATS = ("diffusers", "kohya")
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' default: load_lora_weights(stage_dir) finds it
KOHYA_FILE = "lora_kohya.safetensors"           # the same model in kohya names, for ComfyUI / A1111


def _sd_keys():
    from backbones.sd import SD

    return SD.__new__(SD)  # SD-1.5's key map needs no component: unet.<layer>, lora_unet_<layer>


def _write_lora(layers: list, per_task: list, scales: list, path, keys=None, fmt: str = "diffusers") -> str:
    """export_lora's file from [{layer: (A_i, B_i)}] and the scales s_i."""
    from safetensors.torch import save_file

    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    keys = keys or _sd_keys()
    path = str(path)
    if os.path.isdir(path):
        path = os.path.join(path, LORA_FILE)
    tensors = {}
    for name in layers:
        A = torch.cat([t[name][0] for t in per_task]).detach().float().cpu().contiguous()  # (T·r, in)
        B = torch.cat([s * t[name][1] for s, t in zip(scales, per_task)], 1).detach().float().cpu().contiguous()  # (out, T·r)
        if fmt == "kohya":  # alpha = rank: kohya's scale alpha / rank is 1, the s_i already sit in B
            down, up, alpha = keys.kohya_keys(name)
            tensors.update({down: A, up: B, alpha: torch.tensor(float(A.shape[0]))})
        else:
            a_key, b_key = keys.lora_keys(name)
            tensors.update({a_key: A, b_key: B})
    atomic_write(path, lambda p: save_file(tensors, p))
    return path


def write_stage_lora(group: rid.AdapterGroup, models, dir) -> list:
    """A finished stage's loadable files: pytorch_lora_weights.safetensors (diffusers; load_lora_weights(dir))
    and, where the backbone has kohya names (UNet models), lora_kohya.safetensors. -> the paths written."""
    written = [export_lora(group, os.path.join(dir, LORA_FILE), models)]
    try:
        models.kohya_keys(next(iter(group.layers)))
    except ValueError:  # SD3, FLUX: no kohya format
        return written
    return written + [export_lora(group, os.path.join(dir, KOHYA_FILE), models, "kohya")]


class _Configs:
    """A denoiser stand-in for key_map: its config.json, read when first asked for (SD's keys never ask)."""

    def __init__(self, model: str, subfolder: str):
        self.model, self.subfolder = model, subfolder

    @property
    def config(self):
        from types import SimpleNamespace

        from diffusers import ConfigMixin

        class Denoiser(ConfigMixin):  # what every diffusers model reads its config.json with: a local dir or the hub
            config_name = "config.json"

        if not hasattr(self, "_config"):
            try:
                self._config = SimpleNamespace(**Denoiser.load_config(self.model, subfolder=self.subfolder))
            except (OSError, ValueError) as e:
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UsageError(f"model {self.model!r}: its {self.subfolder}/config.json is unreadable ({first[:200]})") from None
        return self._config


def key_map(model: str):
    """The LoRA key maps (lora_keys, kohya_keys) of the backbone `model`'s model_index.json names, from its
    configs alone: no weights are loaded. -> a stand-in of the backbone's class; `.pipeline` its pipeline class."""
    from importlib import import_module

    import backbones

    model_id, index = backbones.resolve(model)  # ValueError: one line naming the model
    cls = (index or {}).get("_class_name", "StableDiffusionPipeline")
    if cls not in backbones.REGISTRY:
        raise ValueError(f"model={str(model)!r} is a {cls} (model_index.json); supported pipeline classes: "
                         f"{', '.join(backbones.REGISTRY)}")
    module = import_module(f"backbones.{backbones.REGISTRY[cls]}")
    kind = next(v for v in vars(module).values() if isinstance(v, type) and issubclass(v, backbones.Backbone)
                and v.__module__ == module.__name__)
    keys = kind.__new__(kind)
    denoiser = "transformer" if "transformer" in (index or {}) else "unet"
    keys.__dict__[denoiser] = _Configs(str(model), denoiser)
    keys.pipeline = cls
    return keys


def run_key_map(run, model: str | None = None):
    """key_map of a run's base model: `model` if given, else run.json's "model", else the base_model its
    adapters were saved with. UsageError (one line) when none can be read."""
    if model is not None:
        try:
            return key_map(model)
        except ValueError as e:
            raise UsageError(f"--model {model!r}: {e}") from None
    info, tried = read_run(run, need=()), []
    stages = info.get("stages") or []
    saved = read_meta(inside(run, stages[-1], "stage")).get("base_model") if stages else None
    for m in dict.fromkeys(x for x in (info.get("model"), saved) if isinstance(x, str)):
        try:
            return key_map(m)
        except ValueError as e:
            tried.append(f"{m!r} ({str(e).splitlines()[0][:120]})")
    raise UsageError(f"RUN {str(run)!r}: its base model cannot be read for the LoRA key names (tried "
                     f"{'; '.join(tried) or 'nothing: run.json names no model'}); pass --model DIR or a hub id of "
                     "the same base model")


def export_saved(dirs: list, path, weights: list | None = None, keys=None, fmt: str = "diffusers") -> str:
    """export_lora of saved adapter groups without loading the base model: one stage directory, or a soup
    Σ_j w_j Δ_j of several (equal weights by default), exactly what soup() + export_lora write."""
    weights = weights or [1.0 / len(dirs)] * len(dirs)
    saved = [_read_saved(d) for d in dirs]
    layers = saved[0][0]["layers"]
    per_task, scales = [], []
    for d, w, (meta, tensors) in zip(dirs, weights, saved):
        if meta["layers"] != layers or meta["rank"] != saved[0][0]["rank"]:
            raise UsageError(f"{d}: its layers or rank differ from {dirs[0]}'s; a soup needs the same base and rank")
        with reading(os.path.join(d, "adapters.safetensors")):
            for i, s in enumerate(meta["scales"]):
                per_task.append(_task_adapters(tensors, i, layers))
                scales.append(float(w) * s)
    return _write_lora(layers, per_task, scales, path, keys, fmt)


def read_meta(dir) -> dict:
    """adapters.json of a saved group, checked to be one (format and version)."""
    js = os.path.join(dir, "adapters.json")
    if not (os.path.isfile(js) and os.path.isfile(os.path.join(dir, "adapters.safetensors"))):
        raise UsageError(f"dir={str(dir)!r} holds no adapter group; expected adapters.json + adapters.safetensors "
                         "(written by checkpoint.save)")
    with reading(js):
        with open(js) as f:
            meta = json.load(f)
        if not isinstance(meta, dict):
            raise ValueError(f"expected a JSON object, got {type(meta).__name__}")
    if meta.get("format") != "rid-adapters" or meta.get("version") != FORMAT_VERSION:
        raise UsageError(f"{js} format/version {(meta.get('format'), meta.get('version'))!r} is not allowed; "
                         f"allowed: {('rid-adapters', FORMAT_VERSION)!r}")
    with reading(js):
        for key, kind in (("tasks", list), ("scales", list), ("rank", int), ("targets", list), ("layers", list),
                          ("trainable", bool), ("base_model", object), ("fingerprint", str)):
            if not isinstance(meta[key], kind):  # a missing key: KeyError, named by `reading`
                raise ValueError(f"{key!r} must be a {kind.__name__}, got {meta[key]!r}")
        if len(meta["tasks"]) != len(meta["scales"]):
            raise ValueError(f"{len(meta['tasks'])} tasks but {len(meta['scales'])} scales")
    return meta


def _read_saved(dir) -> tuple[dict, dict]:
    """(adapters.json, adapters.safetensors' tensors), the checksum verified."""
    from safetensors.torch import load_file

    verify(dir)
    meta = read_meta(dir)
    with reading(os.path.join(dir, "adapters.safetensors")):
        return meta, load_file(os.path.join(dir, "adapters.safetensors"))


def _task_adapters(tensors: dict, i: int, layers) -> dict:
    return {name: (tensors[f"{i}/{name}/A"], tensors[f"{i}/{name}/B"]) for name in layers}


def _emptied_group(unet, meta: dict, dir) -> rid.AdapterGroup:
    """The UNet's existing group (emptied) or a new one, checked against a saved group's settings."""
    group = rid.group_of(unet)
    if group is None:
        group = rid.inject(unet, meta["rank"], tuple(meta["targets"]))
    for key, have in (("rank", group.rank), ("targets", list(group.targets)), ("layers", list(group.layers))):
        if meta[key] != have:
            shown = (lambda v: f"{len(v)} layers, e.g. {v[:2]}") if key == "layers" else repr
            raise ValueError(f"{dir}: saved {key} {shown(meta[key])} differs from this UNet's {shown(have)}")
    if meta["base_model"] != group.base_model and meta["fingerprint"] != fingerprint(group):
        raise ValueError(f"{dir}: saved base_model {meta['base_model']!r} differs from this UNet's "
                         f"{group.base_model!r} (and the base weights differ); load the same base model")
    group.clear()
    return group


def load(unet, dir) -> rid.AdapterGroup:
    """inject (or reuse the UNet's group) and restore a saved group bit-exactly, the last task
    trainable again with its EMA teacher."""
    meta, tensors = _read_saved(dir)
    group = _emptied_group(unet, meta, dir)
    n = len(meta["tasks"])
    with reading(os.path.join(dir, "adapters.safetensors")):  # missing keys, wrong shapes
        _check_shapes(tensors, meta, group)
        for i in range(n - bool(meta["trainable"])):
            group.append_frozen(meta["tasks"][i], meta["scales"][i], _task_adapters(tensors, i, group.layers))
        if meta["trainable"]:
            group.start_task(meta["tasks"][-1])
            with torch.no_grad():
                for name, layer in group.layers.items():
                    A_t, B_t = layer.current(group.flat)
                    A_t.copy_(tensors[f"{n - 1}/{name}/A"]), B_t.copy_(tensors[f"{n - 1}/{name}/B"])
                group.ema.copy_(tensors["ema"])
            group.set_scale(-1, meta["scales"][-1])
    return group


def _check_shapes(tensors: dict, meta: dict, group: rid.AdapterGroup) -> None:
    """Every task's A (r, in) and B (out, r) per layer, and the EMA when trainable, present and shaped
    to fit the UNet (copy_ would broadcast some wrong shapes silently)."""
    r = group.rank
    for i in range(len(meta["tasks"])):
        for name, layer in group.layers.items():
            for part, shape in (("A", (r, layer.base.in_features)), ("B", (layer.base.out_features, r))):
                got = tuple(tensors[f"{i}/{name}/{part}"].shape)
                if got != shape:
                    raise ValueError(f"tensor {i}/{name}/{part} has shape {got}, this UNet needs {shape}")
    numel = sum(r * (layer.base.in_features + layer.base.out_features) for layer in group.layers.values())
    if meta["trainable"] and tuple(tensors["ema"].shape) != (numel,):
        raise ValueError(f"tensor ema has shape {tuple(tensors['ema'].shape)}, this UNet needs ({numel},)")


def soup(unet, dirs: list, weights: list | None = None) -> rid.AdapterGroup:
    """Model soup Σ_j w_j Δ_j of independently trained runs. Each Δ_j = Σ_i s_i B_i A_i is an adapter
    group, so the soup is one too: every run's adapters as frozen tasks with scales w_j·s_i.
    Equal weights by default. Evaluation only (no trainable task)."""
    dirs = list(dirs)
    if weights is None and dirs:
        weights = [1.0 / len(dirs)] * len(dirs)
    if not dirs or len(weights) != len(dirs):
        raise ValueError(f"weights {weights!r} is not allowed; allowed: None or {len(dirs)} floats, one per "
                         "run dir (dirs must be non-empty)")
    saved = [_read_saved(d) for d in dirs]
    first = saved[0][0]
    for d, (meta, _) in zip(dirs[1:], saved[1:]):
        for key in ("rank", "targets", "layers"):
            if meta[key] != first[key]:
                raise ValueError(f"soup: {d} has {key} {meta[key]!r} but {dirs[0]} has {first[key]!r}; "
                                 "runs must share rank, targets and layers")
        if meta["base_model"] != first["base_model"] and meta["fingerprint"] != first["fingerprint"]:
            raise ValueError(f"soup: {d} has base_model {meta['base_model']!r} but {dirs[0]} has "
                             f"{first['base_model']!r}; runs must share the base model")
    group = _emptied_group(unet, first, dirs[0])
    for j, (w, (meta, tensors)) in enumerate(zip(weights, saved)):
        with reading(os.path.join(dirs[j], "adapters.safetensors")):
            _check_shapes(tensors, {**meta, "trainable": False}, group)
            for i, (name, s) in enumerate(zip(meta["tasks"], meta["scales"])):
                group.append_frozen(f"{j}:{name}", float(w) * s, _task_adapters(tensors, i, group.layers))
    return group


#### python -m checkpoint export ####

USAGE_LOAD = """    pipe = {pipeline}.from_pretrained("{model}")
    pipe.load_lora_weights("{dir}", weight_name="{name}")"""


def stage_dir(run: Path, stage: int | None, flag: str) -> Path:
    """The directory of stage `stage` (1-based; None: the last finished) of the run in `run`."""
    info = read_run(run, need=("stages",))
    stages = info["stages"]
    if not stages:
        raise UsageError(f"{flag} {run}: the run has no finished stage yet")
    if stage is not None and not 1 <= stage <= len(stages):
        raise UsageError(f"--stage {stage} is not allowed; allowed: 1 to {len(stages)} ({', '.join(stages)})")
    return inside(run, stages[(stage or len(stages)) - 1], "stage")


def main(argv=None) -> int:
    """python -m checkpoint export RUN [--stage K | --soup RUN ...] [--format diffusers|kohya] OUT: one LoRA file."""
    import sys

    p = Parser(prog="python -m checkpoint", description="Export a run's adapters as ONE standard LoRA file that "
               "diffusers' load_lora_weights reads, or ComfyUI / A1111 (--format kohya) (exact: Σ_i s_i B_i A_i "
               "stacked at rank T·r). Key names follow the run's backbone, read from its model_index.json and "
               "denoiser config; no weights are loaded.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    e = sub.add_parser("export", help="a stage (or a soup of runs) -> OUT (a .safetensors file, or a directory: "
                                      "pytorch_lora_weights.safetensors in it)")
    e.add_argument("run", metavar="RUN", help="run directory (what train.py --out wrote)")
    e.add_argument("out", metavar="OUT", help="file to write, or an existing directory")
    e.add_argument("--stage", type=int, help="stage K = the model after K tasks, 1 to the number finished "
                                             "(default: the last finished)")
    e.add_argument("--soup", nargs="+", metavar="RUN", help="also average in these runs' last stages (a model "
                                                            "soup, equal weights unless --weights)")
    e.add_argument("--weights", help="comma list of soup weights, one per run, RUN first (default: equal)")
    e.add_argument("--format", default="diffusers", help="diffusers: diffusers/peft key names (load_lora_weights); "
                   "kohya: kohya/sgm names, alpha = rank, for ComfyUI and A1111 (UNet models) (default: diffusers)")
    e.add_argument("--model", help="the run's base model (a diffusers directory or hub id) for the key names "
                                   "(default: the run's own, from run.json)")
    try:
        args = p.parse_args(argv)
        if args.soup and args.stage is not None:
            raise UsageError("--stage and --soup: give one (a soup takes each run's last stage)")
        if args.format not in FORMATS:
            raise UsageError(f"--format {args.format!r} is not allowed; allowed: {', '.join(FORMATS)}")
        run = Path(args.run)
        if not (run / "run.json").is_file():
            raise UsageError(f"RUN {args.run!r} is not a run directory (no run.json); allowed: a train.py --out")
        dirs = [stage_dir(run, args.stage, "RUN")] + [stage_dir(Path(r), None, "--soup") for r in args.soup or []]
        weights = None
        if args.weights is not None:
            try:
                weights = [float(w) for w in args.weights.split(",")]
            except ValueError:
                raise UsageError(f"--weights {args.weights!r} is not allowed; allowed: comma-separated numbers") from None
            if len(weights) != len(dirs):
                raise UsageError(f"--weights {args.weights!r} gives {len(weights)} weights for {len(dirs)} runs")
        out = Path(args.out)
        if not out.is_dir() and out.suffix != ".safetensors":
            raise UsageError(f"OUT {args.out!r} is not allowed; allowed: an existing directory or a .safetensors path")
        if not out.is_dir() and not out.parent.is_dir():
            raise UsageError(f"OUT {args.out!r}: its folder {str(out.parent)!r} does not exist")
        keys = run_key_map(run, args.model)
        written = export_saved([str(d) for d in dirs], out, weights, keys, args.format)
    except (UsageError, ValueError, OSError) as err:
        print(f"python -m checkpoint: error: {err}", file=sys.stderr)
        return 2
    model = args.model or read_run(Path(args.run), need=()).get("model", "<base model>")
    print(f"wrote {written} ({args.format} format; {', '.join(str(d) for d in dirs)}); load it with diffusers:")
    print(USAGE_LOAD.format(pipeline=keys.pipeline, model=model, dir=Path(written).parent, name=Path(written).name))
    if args.format == "kohya":
        print("or copy it into ComfyUI's models/loras or A1111's models/Lora")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
