"""Hardening of train.py and eval.py (issue 15): what a hostile but fair user can do to them ends in
exit 0, 2 (one line naming the flag or file) or 3 (a non-finite value, one line naming the last good
checkpoint), never in a traceback, a lost checkpoint or a write outside the run. docs/reliability.md
maps every failure mode to its test here or in test_train.py / test_eval.py.

Oracles: the exit code and the one stderr line; the files on disk (what exists, what is finite, what is
listed as finished); a snapshot of the directory tree (nothing written outside --out and the runs'
eval/). The tiny model comes from tests/tiny.py, rewards are tiny.toy_reward (train.reward_fn patched)
or test_rewards.tiny_spec's tiny CLIP models (eval.py).
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import checkpoint
import config
import eval as ev
import rewards
import rid
import tiny
import train
from test_eval import make_run
from test_rewards import tiny_spec

HOSTILE = ["", "   ", "nan", "inf", "-inf", "0", "-1", str(2**70), "<file>", "<dir>"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny SD, 10 prompts (train.py splits 8/2), a 2-prompt file, a tiny reward spec, FID references."""
    d = tmp_path_factory.mktemp("reliability")
    prompts = tiny.write_prompts(d / "prompts.txt")
    (d / "two.txt").write_text("a red cat\na blue dog\n")  # split 1 train / 1 test: one step per epoch at batch 1
    (d / "spec").mkdir()
    tiny_spec(d / "spec")
    ref = d / "ref"
    ref.mkdir()
    g = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(g.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(ref / f"{i}.png")
    sd = tiny.tiny_sd(d / "sd")
    return {"dir": d, "sd": sd, "model": sd, "prompts": str(prompts), "two": str(d / "two.txt"),
            "spec": str(d / "spec" / "rewards.json"), "ref": str(ref)}


def tiny_args(world, out, *extra, tasks="aesthetic", steps=2):
    """One task by default, DDIM 2, batch 2 as 2 micro-batches of 1, a checkpoint after every step."""
    return ["--model", world["sd"], "--prompts", world["prompts"], "--tasks", tasks, "--steps", "2",
            "--batch", "2", "--micro-batch", "1", "--max-steps", str(steps), "--lr", "1e-2", "--ckpt-every", "1",
            "--device", "cpu", "--out", str(out), *extra]


def use_reward(monkeypatch, fn=tiny.toy_reward):
    """Every task's reward is `fn`; the reward spec is still read, as the real reward_fn does."""
    monkeypatch.setattr(train, "reward_fn", lambda task, cfg: (rewards.load_spec(cfg.reward_spec), fn)[1])


def run_cli(cli, argv, capsys):
    """-> (exit code, stderr lines); the code is main()'s return: an exception would fail the test."""
    capsys.readouterr()
    code = cli.main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def one_line(err, prog="train.py"):
    assert len(err) == 1 and err[0].startswith(f"{prog}: error:"), err
    return err[0]


def errors_only(err):
    """stderr without tqdm's progress lines."""
    return [l for l in err if "error" in l]


#### 1. A NON-FINITE UPDATE: exit 3 before anything is saved ####

def nan_gradient_from(step):
    """A reward whose value is finite but whose gradient is NaN from optimizer step `step` on (batch 2 as
    2 micro-batches: 2 calls per step): the loss stays finite, the update does not."""
    calls = [0]

    def reward(images, prompts):
        calls[0] += 1
        if calls[0] > 2 * (step - 1):
            images.register_hook(lambda g: torch.full_like(g, float("nan")))
        return tiny.toy_reward(images, prompts)
    return reward


def test_nonfinite_update_exits_3_and_nothing_nonfinite_is_saved(world, tmp_path, monkeypatch, capsys):
    # the only step's update is NaN: before, the stage was saved as finished with NaN adapters, exit 0
    use_reward(monkeypatch, nan_gradient_from(1))
    code, err = run_cli(train, tiny_args(world, tmp_path / "a", steps=1), capsys)
    msg = one_line(errors_only(err))
    assert code == 3 and "adapters non-finite" in msg and "step 1" in msg and "none, the stage starts over" in msg
    assert json.loads((tmp_path / "a" / "run.json").read_text())["stages"] == []
    assert not (tmp_path / "a" / "stage1-aesthetic" / "adapters.safetensors").exists()
    # step 1 fine (checkpoint), step 2's update NaN: the step-1 checkpoint stays the last good one
    use_reward(monkeypatch, nan_gradient_from(2))
    code, err = run_cli(train, tiny_args(world, tmp_path / "b", steps=3), capsys)
    ckpt = tmp_path / "b" / "stage1-aesthetic" / "ckpt"
    assert code == 3 and f"Last good checkpoint: {ckpt}" in one_line(errors_only(err))
    assert checkpoint.load_trainer(ckpt)["step"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(str(ckpt / "adapters.safetensors")).values())


def test_huge_learning_rates(world, tmp_path, monkeypatch, capsys):
    use_reward(monkeypatch)
    code, err = run_cli(train, tiny_args(world, tmp_path / "inf", "--lr", "inf"), capsys)
    assert code == 2 and "--lr 'inf'" in one_line(err) and not (tmp_path / "inf" / "run.json").exists()
    # 1e30: step 1's weights are finite (|w| ~ 1e30) but overflow the forward: step 2's loss is NaN. The
    # step-1 checkpoint holds exactly those weights, so it is not called the last good one.
    code, err = run_cli(train, tiny_args(world, tmp_path / "big", "--lr", "1e30"), capsys)
    msg = one_line(errors_only(err))
    assert code == 3 and "loss is nan at step 2" in msg and "holds the weights this was computed from" in msg
    assert "Last good checkpoint" not in msg
    # one step only: the overflow shows first in the stage's samples, which are checked before saving
    code, err = run_cli(train, tiny_args(world, tmp_path / "one", "--lr", "1e30", steps=1), capsys)
    assert code == 3 and "samples after the last step (1) are non-finite" in one_line(errors_only(err))
    assert json.loads((tmp_path / "one" / "run.json").read_text())["stages"] == []
    assert not (tmp_path / "one" / "stage1-aesthetic" / "adapters.safetensors").exists()


#### 2. EVERY NUMERIC FLAG UP FRONT; EMPTY IS NOT "UNSET" ####

@pytest.mark.parametrize("argv, words", [
    (["--seed", str(2**70)], ["--seed 1180591620717411303424", "2**63-1"]),  # crashed in manual_seed at stage end
    (["--rank", str(2**70)], ["--rank", "[1, 1024]"]),
    (["--batch", str(2**70)], ["--batch", "1 to 65536"]),
    (["--lr", "inf"], ["--lr 'inf'", "finite"]),
    (["--lr", "aesthetic=inf"], ["--lr", "'inf'", "finite"]),
    (["--device", ""], ["--device ''", "empty"]),   # was: silently the default device
    (["--out", "  "], ["--out '  '", "empty"]),     # was: a directory named '  '
    (["--model", ""], ["--model ''"]),              # was: the current directory as the model
    (["--tasks", ""], ["--tasks ''"]),              # was: silently all three tasks
    (["--device", "meta"], ["--device 'meta'", "cpu, cuda"]),
])
def test_train_flags_refused_before_the_model_loads(world, tmp_path, monkeypatch, capsys, argv, words):
    use_reward(monkeypatch)
    monkeypatch.setattr(rid, "load_models", lambda *a, **k: pytest.fail("the model loaded"))
    base = [a for a in tiny_args(world, tmp_path / "o") if a]
    flags = {argv[0]}
    keep = [x for i, x in enumerate(base) if not (x in flags or (i and base[i - 1] in flags))]
    code, err = run_cli(train, keep + argv, capsys)
    line = one_line(err)
    assert code == 2 and all(w in line for w in words), line


@pytest.mark.parametrize("argv, words", [
    (["--images-per-prompt", str(2**70)], ["--images-per-prompt", "10000"]),  # was: a 2**70-long job list
    (["--steps", "2000"], ["--steps 2000", "[1, 1000]"]),
    (["--weights", "nan"], ["--weights nan", "finite"]),
    (["--weights", "-1"], ["--weights -1.0"]),
    (["--seed", str(2**70)], ["--seed"]),
    (["--device", ""], ["--device ''", "empty"]),        # was: silently the default device
    (["--out", ""], ["--out ''", "empty"]),              # was: the default report directory
    (["--fid-ref", ""], ["--fid-ref ''", "empty"]),      # was: silently the mini world's reference
    (["--reward-spec", " "], ["--reward-spec ' '"]),     # was: silently the run's spec
    (["--device", "nope"], ["--device 'nope'"]),         # was: a RuntimeError traceback at model load
])
def test_eval_flags_refused_before_anything_runs(world, tmp_path, capsys, argv, words):
    extra = ["--soup", str(tmp_path)] if argv[0] == "--weights" else []
    code, err = run_cli(ev, ["--ckpt", str(tmp_path), *extra, *argv], capsys)
    line = one_line(err, "eval.py")
    assert code == 2 and all(w in line for w in words), line


#### 3. ONE WRITER PER RUN DIRECTORY ####

def test_second_train_on_the_same_out_exits_2_naming_the_holder(world, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(  # another train.py's lock, held the way RunLock holds it
        [sys.executable, "-c", "import fcntl, json, os, socket, threading\n"
         f"fd = os.open({str(out / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "os.write(fd, json.dumps({'pid': os.getpid(), 'host': socket.gethostname()}).encode())\n"
         "print('locked', flush=True)\nthreading.Event().wait()\n"],  # held until killed: no deadline
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        use_reward(monkeypatch)
        code, err = run_cli(train, tiny_args(world, out), capsys)
        line = one_line(err)
        assert code == 2 and f"pid {holder.pid} on host {socket.gethostname()}" in line and "in use" in line
        assert not (out / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died (kill -9: its lock file stays): the next run takes the lock over, with a message
    code, err = run_cli(train, tiny_args(world, out), capsys)
    assert code == 0 and not (out / ".lock").exists()  # released when the run ends


@pytest.mark.skipif(not Path("/proc/sys/kernel/pid_max").exists(), reason="needs Linux's kernel.pid_max")
def test_stale_lock_is_taken_over_and_a_foreign_host_refused(world, tmp_path, monkeypatch, capsys):
    # a pid no process can have: Linux hands out pids below kernel.pid_max only (a pid that merely exited
    # may be handed out again, to a live process, before the lock is read)
    pid = int(Path("/proc/sys/kernel/pid_max").read_text())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    out = tmp_path / "stale"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    use_reward(monkeypatch)
    capsys.readouterr()
    assert train.main(tiny_args(world, out, steps=1)) == 0
    assert f"taking over the lock of pid {pid}" in capsys.readouterr().out
    other = tmp_path / "other"
    other.mkdir()
    (other / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere.example"}))
    code, err = run_cli(train, tiny_args(world, other, steps=1), capsys)
    assert code == 2 and "pid 1 on host elsewhere.example" in one_line(err) and "delete the lock" in err[0]


def test_checkpoint_temp_dirs_are_unique_per_writer(tmp_path):
    """A second writer of the same checkpoint while the first is mid-write (before: both used
    ckpt.tmp<pid>, so the second removed the first's temp dir under it)."""
    ckpt = tmp_path / "ckpt"

    def outer(d):
        (d / "a.txt").write_text("outer")
        checkpoint.save_dir_atomic(ckpt, lambda d2: (d2 / "a.txt").write_text("inner"))
        (d / "b.txt").write_text("outer")
    checkpoint.save_dir_atomic(ckpt, outer)
    assert sorted(p.name for p in ckpt.iterdir()) == ["a.txt", "b.txt"]  # the outer write, whole
    assert (ckpt / "a.txt").read_text() == "outer"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dir and no .old left


#### 4. PATHS IN run.json STAY INSIDE THE RUN ####

def tree(root: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file()}


@pytest.fixture
def eval_run(world, tmp_path):
    return make_run(tmp_path / "run", world, tasks=("aesthetic",))


EVAL_QUICK = ["--images-per-prompt", "1", "--max-prompts", "1", "--steps", "1", "--device", "cpu",
              "--fid-features", "clip"]


@pytest.mark.parametrize("key, value", [("stages", ["../outside"]), ("test_prompts", "../outside/prompts.txt"),
                                        ("stages", ["/abs"]), ("test_prompts", "/etc/hostname")])
def test_eval_refuses_run_json_paths_outside_the_run(world, eval_run, tmp_path, capsys, key, value):
    outside = tmp_path / "outside"  # a stage and a prompt file eval.py could read, next to the run
    outside.mkdir()
    checkpoint.save(_group(world), outside)
    (outside / "prompts.txt").write_text("a cat\n")
    value = [str(tmp_path / "outside")] if value == ["/abs"] else value
    info = json.loads((eval_run / "run.json").read_text())
    (eval_run / "run.json").write_text(json.dumps({**info, key: value}))
    before = tree(outside)
    code, err = run_cli(ev, ["--ckpt", str(eval_run), *EVAL_QUICK], capsys)
    line = one_line(err, "eval.py")
    assert code == 2 and "resolves outside the run directory" in line and key.rstrip("s") in line
    assert tree(outside) == before and not (eval_run / "eval").exists()


def _group(world):
    models = rid.load_models(world["model"])
    group = rid.inject(models.unet, rank=2)
    group.add_task("aesthetic")
    return group


def test_old_absolute_paths_inside_the_run_still_load(world, eval_run, tmp_path, capsys):
    info = json.loads((eval_run / "run.json").read_text())
    info.update(stages=[str(eval_run / s) for s in info["stages"]], test_prompts=str(eval_run / "test_prompts.txt"))
    (eval_run / "run.json").write_text(json.dumps(info))
    run = ev.load_run(eval_run)
    assert run.info["stages"] == ["stage1-aesthetic"] and len(run.prompts) == 3
    code, err = run_cli(ev, ["--ckpt", str(eval_run), *EVAL_QUICK], capsys)
    assert code == 0, err
    assert sorted(p.name.split(".")[0] for p in (eval_run / "eval").glob("*.json")) == ["stage0-base", "stage1-aesthetic"]


def test_resume_refuses_prompt_files_outside_the_run(world, tmp_path, monkeypatch, capsys):
    use_reward(monkeypatch)
    out = tmp_path / "run"
    assert run_cli(train, tiny_args(world, out, steps=1), capsys)[0] == 0
    info = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**info, "train_prompts": world["prompts"]}))  # a file elsewhere
    code, err = run_cli(train, tiny_args(world, out, "--resume", steps=1), capsys)
    assert code == 2 and "train_prompts" in one_line(err) and "outside the run directory" in err[0]
    (out / "run.json").write_text(json.dumps({**info, "train_prompts": str(out / "train_prompts.txt")}))
    assert run_cli(train, tiny_args(world, out, "--resume", steps=1), capsys)[0] == 0  # absolute, inside: fine


#### 5. CORRUPTED FILES: one line naming the file, a fallback where there is one ####

def _corrupt(path: Path, how: str):
    data = path.read_bytes()
    path.write_bytes({"garbage": b"\x00garbage" * 8, "truncated": data[: len(data) // 2],
                      "flipped": data[:-9] + bytes([data[-9] ^ 1]) + data[-8:]}[how])


@pytest.mark.parametrize("what, how, words", [
    ("adapters.safetensors", "garbage", ["adapters.safetensors", "checksum mismatch"]),
    ("adapters.safetensors", "flipped", ["adapters.safetensors", "checksum mismatch"]),  # was: evaluated silently
    ("adapters.safetensors", "truncated-no-checksum", ["adapters.safetensors", "unreadable or corrupt"]),
    ("adapters.json", "garbage", ["adapters.json", "unreadable or corrupt"]),
    ("run.json", "not-an-object", ["run.json", "expected a JSON object"]),
    ("run.json", "no-model", ["run.json", "missing key 'model'"]),
])
def test_eval_corrupted_run_files_exit_2_naming_the_file(world, eval_run, capsys, what, how, words):
    stage = eval_run / "stage1-aesthetic"
    if what == "run.json":
        info = json.loads((eval_run / "run.json").read_text())
        del info["model"]
        (eval_run / "run.json").write_text("[1, 2]" if how == "not-an-object" else json.dumps(info))
    elif how == "truncated-no-checksum":  # a group saved before checksums existed
        meta = json.loads((stage / "adapters.json").read_text())
        del meta["sha256"]
        (stage / "adapters.json").write_text(json.dumps(meta))
        _corrupt(stage / what, "truncated")
    else:
        _corrupt(stage / what, how)
    code, err = run_cli(ev, ["--ckpt", str(eval_run), *EVAL_QUICK], capsys)
    line = one_line(err, "eval.py")
    assert code == 2 and all(w in line for w in words), line


def test_garbled_reward_weights_exit_2_naming_them(world, tmp_path, monkeypatch, capsys):
    spec = tmp_path / "spec"
    spec.mkdir()
    tiny_spec(spec)
    (spec / "aesthetic.pth").write_bytes(b"not a torch file")
    code, err = run_cli(train, tiny_args(world, tmp_path / "t", "--reward-spec", str(spec / "rewards.json")), capsys)
    line = one_line(err)
    assert code == 2 and "reward 'aesthetic'" in line and str(spec / "rewards.json") in line
    run = make_run(tmp_path / "run", world, tasks=("aesthetic",))
    code, err = run_cli(ev, ["--ckpt", str(run), "--reward-spec", str(spec / "rewards.json"), *EVAL_QUICK], capsys)
    line = one_line(err, "eval.py")
    assert code == 2 and "aesthetic weights" in line and "unreadable or corrupt" in line


def test_garbled_eval_cache_entries_are_misses(world, eval_run, capsys, monkeypatch):
    argv = ["--ckpt", str(eval_run), *EVAL_QUICK]
    assert run_cli(ev, argv, capsys)[0] == 0
    base, stage = sorted((eval_run / "eval").glob("*.json"))
    js = json.loads(stage.read_text())
    stage.write_text(json.dumps({**js, "metrics": {**js["metrics"], "aesthetic": "garbled"}}))  # was: crash in the report
    base.with_suffix(".png").write_bytes(b"torn png")  # was: crash in the grid
    calls = []
    sample = rid.sample
    monkeypatch.setattr(rid, "sample", lambda *a, **k: calls.append(1) or sample(*a, **k))
    code, err = run_cli(ev, argv, capsys)
    assert code == 0 and len(calls) == 2  # both recomputed
    assert isinstance(json.loads(stage.read_text())["metrics"]["aesthetic"], float)


#### 6. EVAL OPTIONS CHECKED AGAINST WHAT THE METRICS NEED, BEFORE ANY IMAGE ####

def test_fid_needs_two_images_on_each_side(world, eval_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(rid, "sample", lambda *a, **k: pytest.fail("an image was generated"))
    one = tmp_path / "one"
    one.mkdir()
    Image.new("RGB", (8, 8)).save(one / "a.png")
    code, err = run_cli(ev, ["--ckpt", str(eval_run), *EVAL_QUICK, "--fid-ref", str(one)], capsys)
    assert code == 2 and "holds 1 image(s)" in one_line(err, "eval.py")  # was: FID skipped, exit 0
    code, err = run_cli(ev, ["--ckpt", str(eval_run), *EVAL_QUICK, "--fid-ref", world["ref"]], capsys)
    line = one_line(err, "eval.py")  # 1 prompt x 1 image: was a torchmetrics error after every image
    assert code == 2 and "FID needs at least 2 images" in line and "--images-per-prompt 1" in line
    code, err = run_cli(ev, ["--ckpt", str(eval_run), *EVAL_QUICK, "--fid-ref", str(tmp_path / "one" / "a.png")], capsys)
    assert code == 2 and "a folder of images or a .safetensors" in one_line(err, "eval.py")


#### 8. FUZZ: every flag of both CLIs x hostile values ####

def _flags(parser):
    """(flag, takes a value) for every option of a parser (derived, so a new flag is fuzzed too)."""
    return [(a.option_strings[0], a.nargs != 0) for a in parser._actions
            if a.option_strings and a.dest != "help"]


def _replace(base: list, flag: str, value: str, drop=()) -> list:
    out, skip = [], False
    for i, x in enumerate(base):
        if skip:
            skip = False
            continue
        if x == flag or x in drop:
            skip = True
            continue
        out.append(x)
    return out + [flag, value]


def _hostile(value, root, cli):
    """A file holding one prompt line; an empty directory (one per CLI: train.py --out <dir> fills its own)."""
    return {"<file>": str(root / "a_file.txt"), "<dir>": str(root / f"a_dir_{cli.__name__}")}.get(value, value)


def _check_case(cli, argv, roots, allowed, capsys):
    prog = "train.py" if cli is train else "eval.py"
    before = {k: v for r in roots for k, v in tree(r).items()}
    code, err = run_cli(cli, argv, capsys)
    after = {k: v for r in roots for k, v in tree(r).items()}
    assert code in (0, 2, 3), (argv, code, err)
    if code:
        one_line(errors_only(err), prog)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    outside = {p for p in changed if not any(Path(p).is_relative_to(a) for a in allowed)}
    assert not outside, (argv, sorted(outside)[:5])
    return code


def test_fuzz_every_flag_of_both_clis(world, tmp_path, monkeypatch, capsys):
    """Every flag of train.py and eval.py (read from their parsers) given each hostile value on top of a
    valid quick command: exit 0, 2 or 3 (3: a non-finite stop, e.g. --lr 2**70), one stderr line when
    not 0, never a traceback, and no file written or changed outside --out (and, for eval.py, the runs'
    eval/). ~430 cases; most stop at validation, ~30 run one step / one image (~1.5-2 min on 2 cores)."""
    root = tmp_path
    (root / "a_file.txt").write_text("a red cat\n")
    (root / "a_dir_train").mkdir()
    (root / "a_dir_eval").mkdir()
    (root / "cwd").mkdir()
    (root / "cwd-eval").mkdir()
    monkeypatch.chdir(root / "cwd")  # relative values ("0", "nan") land here
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # a hub lookup fails at once
    use_reward(monkeypatch)
    roots = [root, world["dir"]]  # the hostile targets, the cwd, and the model, prompts and reward spec
    codes = {}
    # train.py: one task, one step of one DDIM step on one prompt
    base = ["--model", world["sd"], "--prompts", world["two"], "--tasks", "aesthetic", "--steps", "1",
            "--batch", "1", "--epochs", "1", "--max-steps", "1", "--device", "cpu"]
    for i, (flag, takes) in enumerate(_flags(config.build_parser())):
        for j, value in enumerate(HOSTILE if takes else [None]):
            out = root / f"t{i}-{j}"
            argv = base + ["--out", str(out)]
            if takes:
                argv = _replace(argv, flag, _hostile(value, root, train), drop=("--tasks",) if flag == "--joint" else ())
            else:
                argv = argv + [flag]
            allowed = [(root / "cwd" / argv[argv.index("--out") + 1]).resolve()]
            codes["train", flag, value] = _check_case(train, argv, roots, allowed, capsys)
    # eval.py: a run with one finished stage, one image of one prompt per stage (cached after the first)
    run = make_run(root / "evalrun", world, tasks=("aesthetic",))
    monkeypatch.chdir(root / "cwd-eval")  # not where train.py's relative --out values made runs
    base = ["--ckpt", str(run), "--images-per-prompt", "1", "--max-prompts", "1", "--steps", "1",
            "--device", "cpu", "--fid-features", "clip"]
    for i, (flag, takes) in enumerate(_flags(ev.build_parser())):
        for j, value in enumerate(HOSTILE):
            argv = _replace(base + ["--out", str(root / f"e{i}-{j}")], flag, _hostile(value, root, ev))
            allowed = [(root / "cwd-eval" / argv[argv.index("--out") + 1]).resolve(), (run / "eval").resolve()]
            codes["eval", flag, value] = _check_case(ev, argv, roots, allowed, capsys)
    for cli in ("train", "eval"):  # the valid path ran too
        assert codes[cli, "--seed", "0"] == 0 and codes[cli, "--seed", str(2**70)] == 2
