"""What a run leaves on disk, and how it is written: adapter groups (save, load, model soup,
diffusers LoRA export) and the run-directory contract shared by train.py and eval.py.

    <run>/run.json                  tasks, method, model, reward spec, finished stages, seed, config
    <run>/train_prompts.txt, test_prompts.txt      the prompt split (paths in run.json are relative)
    <run>/stageK-<task>/            adapters.safetensors + adapters.json (all K adapters), config.json,
                                    metrics.jsonl, samples.png
    <run>/stageK-<task>/ckpt/       resumable mid-task state while stage K runs (removed when it ends)
    <run>/eval/                     eval.py's per-stage cache

Every file is written through `atomic_write` (a temp file unique to the process, then os.replace),
every directory through `save_dir_atomic`: a reader never sees half a file, a kill never leaves one.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

import rid

FORMAT_VERSION = 1


class UsageError(ValueError):
    """Bad input at a boundary (a flag, a file the user pointed at): the CLIs print it as one line
    and exit 2."""


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


def save_dir_atomic(path: Path, write) -> None:
    """write(tmp_dir) then swap it in: a reader finds `path` (or, mid-swap, `path.old`) complete."""
    tmp, old = path.with_name(f"{path.name}.tmp{os.getpid()}"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def find_ckpt(stage_dir: Path) -> Path | None:
    """The stage's mid-task checkpoint: ckpt/, or ckpt.old/ when a kill fell between the two renames."""
    for p in (stage_dir / "ckpt", stage_dir / "ckpt.old"):
        if (p / "trainer.pt").exists():
            return p
    return None


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
    atomic_write(os.path.join(dir, "adapters.safetensors"), lambda p: save_file(tensors, p))
    atomic_write(os.path.join(dir, "adapters.json"), json.dumps(meta, indent=1))


def export_lora(group: rid.AdapterGroup, path) -> str:
    """ONE standard LoRA file that diffusers' pipe.load_lora_weights(dir, weight_name=...) loads:
    Σ_i s_i B_i A_i = [s_1 B_1 … s_T B_T]·[A_1; …; A_T], exact at rank T·r. Keys follow the
    diffusers/peft naming; no alpha keys, so diffusers sets alpha = rank and the scale is 1.
    A directory `path` gets diffusers' default name pytorch_lora_weights.safetensors."""
    from safetensors.torch import save_file

    if not group.tasks:
        raise ValueError("export_lora: the adapter group has no tasks; call add_task or checkpoint.load first")
    path = str(path)
    if os.path.isdir(path):
        path = os.path.join(path, "pytorch_lora_weights.safetensors")
    per_task = [group.task_tensors(i) for i in range(len(group.tasks))]
    tensors = {}
    for name in group.layers:
        A = torch.cat([t[name][0] for t in per_task])  # (T·r, in)
        B = torch.cat([s * t[name][1] for s, t in zip(group.scales, per_task)], 1)  # (out, T·r)
        tensors[f"unet.{name}.lora_A.weight"] = A.detach().float().cpu().contiguous()
        tensors[f"unet.{name}.lora_B.weight"] = B.detach().float().cpu().contiguous()
    atomic_write(path, lambda p: save_file(tensors, p))
    return path


def read_meta(dir) -> dict:
    """adapters.json of a saved group, checked to be one (format and version)."""
    js = os.path.join(dir, "adapters.json")
    if not (os.path.isfile(js) and os.path.isfile(os.path.join(dir, "adapters.safetensors"))):
        raise ValueError(f"dir={str(dir)!r} holds no adapter group; expected adapters.json + adapters.safetensors "
                         "(written by checkpoint.save)")
    with open(js) as f:
        meta = json.load(f)
    if meta.get("format") != "rid-adapters" or meta.get("version") != FORMAT_VERSION:
        raise ValueError(f"{js} format/version {(meta.get('format'), meta.get('version'))!r} is not allowed; "
                         f"allowed: {('rid-adapters', FORMAT_VERSION)!r}")
    return meta


def _read_saved(dir) -> tuple[dict, dict]:
    from safetensors.torch import load_file

    meta = read_meta(dir)
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
        for i, (name, s) in enumerate(zip(meta["tasks"], meta["scales"])):
            group.append_frozen(f"{j}:{name}", float(w) * s, _task_adapters(tensors, i, group.layers))
    return group
