"""train.py: CLI and bad input, the paper's schedules, prompt handling, a full tiny run that eval.py
reads, bit-exact resume after a hard crash, and 2-process DDP (gloo) against 1 process.

Oracles: the paper's appendix numbers written out below; an uninterrupted run (for resume); a
1-process run with the same global batch (for DDP); rid.sample on a fresh model loaded from the
stage directory (for samples.png). The tiny model comes from tests/tiny.py; rewards are swapped for
tiny.toy_reward by patching train.reward_fn (in this process, or through tests/train_launcher.py in
a subprocess), so no CLIP weights.
"""
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import checkpoint
import config
import tiny
import train
from cli import UsageError

ROOT = Path(__file__).resolve().parents[1]
HOOK = "test_train:recording_reward"
LAUNCHER = str(ROOT / "tests" / "train_launcher.py")

# The paper's appendix (RIL, "Implementation details"), written out here as the oracle.
PAPER_EPOCHS = {"aesthetic": 10, "hps": 120, "compress": 15}
PAPER_RID_BATCH, PAPER_RID_LR = 8, 5e-5
PAPER_BASELINE_BATCH, PAPER_BASELINE_LR = 128, 1e-3


def recording_reward(images, prompts):
    """tiny.toy_reward that also logs which prompts this process scored (to $RID_TEST_LOG.<rank>)."""
    log = os.environ.get("RID_TEST_LOG")
    if log:
        with open(f"{log}.{os.environ.get('RANK', '0')}", "a") as f:
            f.write(json.dumps(list(prompts)) + "\n")
    return tiny.toy_reward(images, prompts)


_calls = [0]


def nan_from_second_step(images, prompts):
    """NaN from the 3rd micro-batch on (batch 2, micro-batch 1: step 2)."""
    _calls[0] += 1
    r = tiny.toy_reward(images, prompts)
    return r * float("nan") if _calls[0] > 2 else r


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("train")
    prompts = tiny.write_prompts(d / "prompts.txt")
    return SimpleNamespace(dir=d, sd=tiny.tiny_sd(d / "sd"), prompts=str(prompts))


def tiny_args(world, out, *extra, tasks="aesthetic,compress"):
    """2 tasks × 2 steps, DDIM 2, batch 2 as 2 micro-batches of 1, a checkpoint after every step."""
    return ["--model", world.sd, "--prompts", world.prompts, *(["--tasks", tasks] if tasks else []),
            "--steps", "2", "--batch", "2", "--micro-batch", "1", "--max-steps", "2", "--lr", "1e-2",
            "--ckpt-every", "1", "--device", "cpu", "--out", str(out), *extra]


def subprocess_env(**extra):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]),
               OMP_NUM_THREADS=str(torch.get_num_threads()), **extra)
    return env


def use_reward(monkeypatch, hook):
    """Every task's reward becomes the test function `hook` ("module:function")."""
    module, _, name = hook.partition(":")
    fn = getattr(__import__(module), name)
    monkeypatch.setattr(train, "reward_fn", lambda task, cfg: fn)


def run_main(monkeypatch, argv, hook=HOOK, **env):
    if hook:
        use_reward(monkeypatch, hook)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return train.main(argv)


COSINE = ("--lr-schedule", "compress=cosine")  # the full tiny run's second task decays its lr


def adapters(stage_dir):
    return load_file(str(Path(stage_dir) / "adapters.safetensors"))


@pytest.fixture(scope="module")
def full_run(world):
    """The uninterrupted 1-process reference run, recording the prompts each step scored."""
    out = world.dir / "full"
    with pytest.MonkeyPatch.context() as mp:
        assert run_main(mp, tiny_args(world, out, *COSINE, "--report-to", "tensorboard"),
                        RID_TEST_LOG=str(world.dir / "log-full")) == 0
    return out


#### SCHEDULES AND CONFIG ####

def resolve(*argv):
    return config.resolve(config.build_parser().parse_args(list(argv)))[0]


def test_schedules_are_the_papers():
    sd = ["--model", config.SD15, "--tasks", "aesthetic,hps,compress"]
    cfg = resolve(*sd)
    assert cfg.epochs == PAPER_EPOCHS
    assert cfg.batch == dict.fromkeys(PAPER_EPOCHS, PAPER_RID_BATCH)
    assert cfg.lr == dict.fromkeys(PAPER_EPOCHS, PAPER_RID_LR)
    assert (cfg.rank, cfg.lam, cfg.steps, cfg.guidance) == (4, 0.1, 50, 7.5)
    for method in ("baseline", "draft-k", "draft", "draft-lv", "refl"):
        cfg = resolve(*sd, "--method", method)
        assert cfg.epochs == PAPER_EPOCHS
        assert cfg.batch == dict.fromkeys(PAPER_EPOCHS, PAPER_BASELINE_BATCH)
        assert cfg.lr == dict.fromkeys(PAPER_EPOCHS, PAPER_BASELINE_LR)
    # batch 128 by accumulation: micro-batches per step = batch / world / micro-batch
    assert config.micro_plan(cfg, "hps", 1) == (8, 16)
    assert config.micro_plan(cfg, "hps", 4) == (8, 4)
    assert config.micro_plan(resolve(*sd, "--method", "baseline", "--grad-accum", "4"), "hps", 1) == (32, 4)


def test_per_task_overrides_and_joint():
    sd = ["--model", config.SD15]
    cfg = resolve(*sd, "--epochs", "hps=3", "--lr", "aesthetic=1e-4,compress=2e-4", "--batch", "16")
    assert cfg.epochs == {**PAPER_EPOCHS, "hps": 3}
    assert cfg.lr == {"aesthetic": 1e-4, "hps": PAPER_RID_LR, "compress": 2e-4}
    assert cfg.batch == dict.fromkeys(PAPER_EPOCHS, 16)
    assert resolve(*sd, "--tasks", "compress,aesthetic", "--epochs", "5").epochs == {"compress": 5, "aesthetic": 5}
    cfg = resolve(*sd, "--joint", "aesthetic:0.01,hps:2,compress:1")
    assert cfg.tasks == ["joint"] and cfg.joint == {"aesthetic": 0.01, "hps": 2.0, "compress": 1.0}
    assert cfg.epochs == {"joint": max(PAPER_EPOCHS.values())}  # the longest schedule among its rewards


def test_cosine_lr_is_torchs_cosine_annealing():
    for peak, total in ((1e-3, 94), (5e-4, 282), (0.1, 1)):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=peak)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)  # eta_min 0
        for step in range(total):
            assert train.lr_at(peak, step, total, "cosine") == pytest.approx(opt.param_groups[0]["lr"], rel=1e-9)
            assert train.lr_at(peak, step, total, "constant") == peak
            opt.step(), sched.step()
        assert train.lr_at(peak, total - 1, total, "cosine") > 0  # the last step still moves
    assert resolve("--model", config.SD15).lr_schedule == dict.fromkeys(PAPER_EPOCHS, "constant")  # the paper's


@pytest.fixture(scope="module")
def mini_world(tmp_path_factory):
    """The committed mini world, or, while it is not built, a seeded `python -m mini build --small`."""
    mini = pytest.importorskip("mini")
    if (Path(mini.WORLD) / "world.json").exists():
        return Path(mini.WORLD)
    d = tmp_path_factory.mktemp("mini") / "world"
    subprocess.run([sys.executable, "-m", "mini", "build", "--out", str(d), "--small"], cwd=ROOT,
                   env=subprocess_env(), check=True, capture_output=True, timeout=600)
    return d


def test_mini_world_is_the_default_with_its_real_rewards(mini_world, tmp_path, monkeypatch, capsys):
    """The README's main job, `train.py --tasks aesthetic,hps,compress`, 1 step per task, real rewards."""
    import mini

    monkeypatch.setattr(mini, "WORLD", mini_world)
    monkeypatch.setattr(mini, "MODEL", mini_world / "model")
    monkeypatch.setattr(mini, "REWARD_SPEC", mini_world / "rewards.json")
    world = json.loads((mini_world / "world.json").read_text())
    cfg = resolve("--tasks", "aesthetic")
    assert Path(cfg.model) == mini_world / "model" and Path(cfg.reward_spec) == mini_world / "rewards.json"
    assert Path(cfg.prompts).name == "train.txt" and Path(cfg.test_prompts).name == "test.txt"
    assert (cfg.steps, cfg.guidance) == (world["steps"], world["guidance"])
    # the mini schedule: batch 8 and the same epochs for every method, hps longest; hps lr per method
    seq = ["--tasks", "aesthetic,hps,compress"]
    rid_cfg, base_cfg = resolve(*seq), resolve(*seq, "--method", "baseline")
    for cfg_ in (rid_cfg, base_cfg, resolve(*seq, "--method", "draft-k")):
        assert cfg_.epochs == {"aesthetic": 1, "hps": 3, "compress": 1}
        assert cfg_.batch == dict.fromkeys(cfg_.tasks, 8)
    assert rid_cfg.lr == {"aesthetic": 1e-3, "hps": 5e-4, "compress": 1e-3}
    assert rid_cfg.lr_schedule == dict.fromkeys(rid_cfg.tasks, "constant")
    assert base_cfg.lr == {"aesthetic": 1e-3, "hps": 7e-4, "compress": 1e-3}
    assert base_cfg.lr_schedule == {"aesthetic": "constant", "hps": "cosine", "compress": "constant"}
    assert resolve(*seq, "--method", "draft-k").lr_schedule == base_cfg.lr_schedule  # every non-RID method
    flags = resolve(*seq, "--lr", "hps=1e-3", "--epochs", "hps=1", "--lr-schedule", "hps=cosine")
    assert (flags.lr["hps"], flags.epochs["hps"], flags.lr_schedule["hps"]) == (1e-3, 1, "cosine")  # flags win
    joint = resolve("--joint", "aesthetic:1,hps:1", "--method", "baseline")
    assert (joint.epochs, joint.lr, joint.lr_schedule) == ({"joint": 3}, {"joint": 7e-4}, {"joint": "cosine"})
    joint = resolve("--joint", "aesthetic:1,hps:1")  # rid: its own hps lr, still the lowest of the parts
    assert (joint.epochs, joint.lr, joint.lr_schedule) == ({"joint": 3}, {"joint": 5e-4}, {"joint": "constant"})

    out = tmp_path / "mini"
    argv = ["--tasks", "aesthetic,hps,compress", "--steps", "2", "--batch", "2", "--max-steps", "1", "--out", str(out)]
    assert train.main(argv) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "no --model given" in first and "mini world" in first and config.SD15 in first
    run = json.loads((out / "run.json").read_text())
    assert Path(run["model"]) == mini_world / "model" and len(run["stages"]) == 3
    lines = lambda p: [l.strip() for l in Path(p).read_text().splitlines() if l.strip()]  # noqa: E731
    assert lines(out / "test_prompts.txt") == lines(mini_world / "prompts" / "test.txt")
    for stage in run["stages"]:
        row = json.loads((out / stage / "metrics.jsonl").read_text())
        assert math.isfinite(row["reward"]) and row["grad_norm"] > 0


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    parser = config.build_parser()
    for action in parser._actions:
        if action.help == "==SUPPRESS==" or action.dest in ("help", "resume"):
            continue
        assert "default" in action.help, f"{action.option_strings} does not state its default"
    assert "--ema" in capsys.readouterr().out


def test_joint_task_trains_on_the_weighted_sum(world, tmp_path, monkeypatch):
    """--joint goes through rewards.joint (compress needs no weights, so the real reward runs here)."""
    import rewards

    cfg = resolve("--model", world.sd, "--joint", "compress:2", "--device", "cpu")
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    expect = 2 * rewards.get("compress")(images, ["a", "b"])
    torch.testing.assert_close(train.reward_fn("joint", cfg)(images, ["a", "b"]), expect)
    out = tmp_path / "joint"
    argv = tiny_args(world, out, "--joint", "compress:2", tasks=None)
    assert train.main(argv) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["tasks"] == ["joint"] and run["stages"] == ["stage1-joint"]
    assert run["config"]["joint"] == {"compress": 2.0}


#### PROMPTS ####

def test_prompt_files_and_split(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(["p1", "p2", "p1"]))
    (tmp_path / "b.json").write_text(json.dumps([{"prompt": "p1"}, {"caption": "p2", "id": 3}]))
    assert train.read_prompts(str(tmp_path / "a.json")) == ["p1", "p2"]
    assert train.read_prompts(str(tmp_path / "b.json")) == ["p1", "p2"]
    prompts = [f"prompt {i}" for i in range(800)]  # HPD "photo" has 800: the paper splits 750/50
    tr, te = train.split_prompts(prompts, 750, 50, seed=0)
    assert len(tr) == 750 and len(te) == 50 and not set(tr) & set(te) and set(tr) | set(te) == set(prompts)
    assert (tr, te) == train.split_prompts(prompts, 750, 50, seed=0)
    assert te != train.split_prompts(prompts, 750, 50, seed=1)[1]
    # the prompt stream: every epoch visits every training prompt once, in a seed-dependent order
    small = [f"q{i}" for i in range(6)]
    stream = [p for s in range(6) for p in train.batch_prompts(small, s, 4, seed=0)]  # 24 = 4 epochs
    for e in range(4):
        assert sorted(stream[6 * e:6 * e + 6]) == small
    assert stream[:6] != stream[6:12]


def test_the_papers_prompts_are_the_default_for_sd_and_by_name(tmp_path, capsys):
    """The paper's split (750 train / 50 test HPD v2 photo prompts, AlignProp's files): the default for any
    model but the mini world, and `--prompts paper`. Oracle: the shipped files read line by line here."""
    folder = ROOT / "data" / "paper_prompts"
    raw_train = (folder / "hps_v2_all.txt").read_text(encoding="utf-8").split("\n")
    raw_test = (folder / "hps_v2_all_eval.txt").read_text(encoding="utf-8").splitlines()
    assert (folder / "NOTICE.md").is_file() and "MIT License" in (folder / "LICENSE-AlignProp").read_text()
    for cfg in (resolve("--model", config.SD15), resolve("--model", "mini/world/model", "--prompts", "paper")):
        run, tr, te = train.open_run(dataclasses.replace(cfg, out=str(tmp_path / "none")), resume=False)
        assert len(tr) == 750 and len(te) == 50 and not set(tr) & set(te)
        assert tr == [p.strip() for p in raw_train if p.strip()] and te == [p.strip() for p in raw_test]
        assert run["config"]["prompts"] == str(folder / "hps_v2_all.txt")
    assert "2 empty" in capsys.readouterr().out  # AlignProp reads its 2 empty lines as prompts; rid says it drops them
    assert resolve().prompts == str(ROOT / "mini" / "world" / "prompts" / "train.txt")  # the mini world keeps its own


#### MEMORY: --micro-batch auto, the GPU defaults ####

def _real_need(world, batch):
    """Oracle for the planner: the bytes one real training step (tiny SD, real tensors, toy reward; 1 frozen
    task + the current one, DDIM 2, rid) holds at its peak beyond the model's weights, counted live."""
    import memplan
    import rid

    models = rid.load_models(world.sd)
    weights = sum(t.untyped_storage().nbytes() for m in (models.unet, models.vae, models.text_encoder)
                  for t in (*m.parameters(), *m.buffers()))
    r = memplan.step_memory(models, tiny.toy_reward, [], "rid", batch, False, 2, frozen_tasks=0)
    return r["peak"] - weights


def test_micro_batch_auto_picks_the_largest_that_fits_a_given_device(world, tmp_path, monkeypatch, capsys):
    """--micro-batch auto against a fake device size: batch 4 (micro-batches 1, 2 or 4); the device is sized
    between what the real step needs at 2 and at 4 (after the 15 % margin), so 2 is the answer."""
    import memplan as memory

    need = {b: _real_need(world, b) for b in (1, 2, 4)}
    assert need[1] < need[2] < need[4]
    argv = tiny_args(world, tmp_path / "fit", "--batch", "4", "--max-steps", "1", tasks="aesthetic")
    argv[argv.index("--micro-batch") + 1] = "auto"
    for free, want in (((need[2] + need[4]) / 2 / (1 - memory.MARGIN), 2), (need[4] * 2, 4)):
        out = tmp_path / f"fit{want}"
        argv[argv.index("--out") + 1] = str(out)
        monkeypatch.setattr(memory, "free_bytes", lambda device, free=free: int(free))
        assert run_main(monkeypatch, argv) == 0
        assert json.loads((out / "run.json").read_text())["config"]["micro_batch"] == want
        stage = json.loads((out / "stage1-aesthetic" / "config.json").read_text())
        assert (stage["micro_batch_resolved"], stage["grad_accum_resolved"]) == (want, 4 // want)
        assert f"--micro-batch auto: {want} (" in capsys.readouterr().out
    # --resume keeps the micro-batch the run was planned with, whatever this device has free now
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(need[4] * 10))
    argv[argv.index("--out") + 1] = str(tmp_path / "fit2")
    assert run_main(monkeypatch, [*argv, "--resume"]) == 0
    assert json.loads((tmp_path / "fit2" / "run.json").read_text())["config"]["micro_batch"] == 2
    # not even one sample: exit 2, one line naming the flag and what to try
    monkeypatch.setattr(memory, "free_bytes", lambda device: int(need[1] / 2))
    argv[argv.index("--out") + 1] = str(tmp_path / "none")
    capsys.readouterr()
    assert run_main(monkeypatch, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--micro-batch auto: not even 1 sample fits" in err[0] and "--dtype bf16" in err[0]


def test_gpu_defaults_are_bf16_and_micro_batch_auto():
    args = config.build_parser().parse_args(["--model", config.SD15])
    cfg = config.gpu_defaults(config.Config(device="cuda"), args)
    assert (cfg.dtype, cfg.micro_batch) == ("bf16", "auto")
    cfg = config.gpu_defaults(config.Config(device="cpu"), args)
    assert (cfg.dtype, cfg.micro_batch) == ("fp32", 8)
    args = config.build_parser().parse_args(["--dtype", "fp32", "--micro-batch", "2"])
    cfg = config.gpu_defaults(config.Config(device="cuda", micro_batch=2), args)
    assert (cfg.dtype, cfg.micro_batch) == ("fp32", 2)
    assert resolve("--micro-batch", "auto").micro_batch == "auto"


#### BAD INPUT: exit 2, one line, no traceback ####

def test_cli_error_is_one_line_in_a_subprocess():
    p = subprocess.run([sys.executable, str(ROOT / "train.py"), "--tasks", "aesthetic,beauty"],
                       capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr
    assert "'beauty'" in lines[0] and "aesthetic, hps, compress" in lines[0]


@pytest.mark.parametrize("argv, words", [
    (["--tasks", "aesthetic,beauty"], ["beauty", "aesthetic, hps, compress"]),
    (["--method", "ppo"], ["ppo", "baseline, rid, draft-k"]),
    (["--epochs", "aesthetic=abc"], ["--epochs", "abc"]),
    (["--epochs", "hps=3"], ["--epochs", "'hps'", "not in --tasks"]),
    (["--batch", "0"], ["--batch", "> 0"]),
    (["--lr", "aesthetic=-1"], ["--lr", "> 0"]),
    (["--lr-schedule", "compress=linear"], ["--lr-schedule", "'linear'", "constant, cosine"]),
    (["--joint", "aesthetic:0.01", "--tasks", "hps"], ["--joint", "--tasks"]),
    (["--joint", "beauty:1"], ["--joint", "beauty"]),
    (["--batch", "4", "--micro-batch", "3"], ["--micro-batch 3", "does not divide"]),
    (["--micro-batch", "many"], ["--micro-batch 'many'", "auto or an integer"]),
    (["--truncate", "5"], ["truncate", "5"]),
])
def test_bad_flags(world, tmp_path, monkeypatch, capsys, argv, words):
    own_tasks = "--tasks" in argv or "--joint" in argv
    argv = tiny_args(world, tmp_path / "out", *argv, tasks=None if own_tasks else "aesthetic,compress")
    assert run_main(monkeypatch, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train.py: error:"), err
    for w in words:
        assert w in err[0], (w, err[0])


def test_bad_files(world, tmp_path, monkeypatch, capsys):
    def error(argv, hook=HOOK):
        assert run_main(monkeypatch, argv, hook) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no prompts" in error(tiny_args(world, tmp_path / "o1", "--prompts", str(empty)))
    assert "cannot read" in error(tiny_args(world, tmp_path / "o2", "--prompts", str(tmp_path / "nope.txt")))
    missing = tmp_path / "no-model"
    assert str(missing) in error(tiny_args(world, tmp_path / "o3", "--model", str(missing)))
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert "not writable" in error(tiny_args(world, a_file / "out"))
    if not torch.cuda.is_available():
        assert "no CUDA device" in error(tiny_args(world, tmp_path / "o5", "--device", "cuda"))
    # missing reward weights: the real rewards (no test hook), a spec naming a file that does not exist
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"hps_weights": "missing_hps.pt"}))
    monkeypatch.undo()  # the real rewards
    argv = tiny_args(world, tmp_path / "o4", "--reward-spec", str(spec), tasks="hps")
    assert train.main(argv) == 2
    msg = capsys.readouterr().err.strip()
    assert "missing_hps.pt" in msg and "--reward-spec" in msg and len(msg.splitlines()) == 1


#### A FULL TINY RUN ####

def test_full_run_layout_is_what_eval_reads(world, full_run):
    out = full_run
    run = json.loads((out / "run.json").read_text())
    assert run["stages"] == ["stage1-aesthetic", "stage2-compress"]
    assert run["tasks"] == ["aesthetic", "compress"] and run["method"] == "rid" and run["seed"] == 0
    assert Path(run["model"]) == Path(world.sd) and run["config"]["lam"] == 0.1
    tr = (out / "train_prompts.txt").read_text().split("\n")[:-1]
    te = (out / "test_prompts.txt").read_text().split("\n")[:-1]
    assert len(tr) == 8 and len(te) == 2 and not set(tr) & set(te)  # 10 prompts: ≥ 4/5 train

    import eval as evaluate  # eval.py's own reader of the run directory

    loaded = evaluate.load_run(out)
    assert loaded.prompts == te and [s.name for s in evaluate.stages_of(loaded)][-2:] == run["stages"]

    for k, name in enumerate(run["stages"], 1):
        d = out / name
        assert not (d / "ckpt").exists()
        meta = json.loads((d / "adapters.json").read_text())
        assert meta["tasks"] == ["aesthetic", "compress"][:k] and meta["rank"] == 4
        cfg = json.loads((d / "config.json").read_text())
        assert cfg["task"] == name.split("-")[1] and cfg["total_steps"] == 2
        rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in rows] == [1, 2]
        assert {"loss", "reward", "distill", "grad_norm", "lr", "time"} <= set(rows[0])
        assert cfg["lr_schedule"] == {"aesthetic": "constant", "compress": "cosine"}
        # oracle: torch's own CosineAnnealingLR over the task's 2 steps (constant: the lr itself)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=2) if k == 2 else None
        want = []
        for _ in rows:
            want.append(opt.param_groups[0]["lr"])
            opt.step(), sched and sched.step()
        assert [r["lr"] for r in rows] == pytest.approx(want, rel=1e-12) and len(set(want)) == k
    s1, s2 = adapters(out / "stage1-aesthetic"), adapters(out / "stage2-compress")
    for key, t in s1.items():  # stage 1's adapter is frozen in stage 2, untouched
        if key.startswith("0/"):
            assert torch.equal(s2[key], t)
    assert any(t.abs().max() > 0 for k_, t in s2.items() if k_.startswith("1/") and k_.endswith("/B"))


def test_training_curves_and_tensorboard_hold_the_metrics(full_run):
    """training.png's data and the TensorBoard event file hold metrics.jsonl's numbers, stage after stage."""
    rows = [json.loads(l) for stage in ("stage1-aesthetic", "stage2-compress")
            for l in (full_run / stage / "metrics.jsonl").read_text().splitlines()]
    curves = json.loads((full_run / "training.json").read_text())
    assert (full_run / "training.png").stat().st_size > 0
    assert curves["series"]["reward"]["x"] == [1, 2, 3, 4] and curves["boundaries"] == [0, 2]  # stage starts
    assert curves["series"]["reward"]["y"] == pytest.approx([r["reward"] for r in rows], rel=1e-12)
    assert curves["series"]["distill"]["y"] == pytest.approx([r["distill"] for r in rows], rel=1e-12)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full_run / "tensorboard"))
    acc.Reload()
    for stage, steps, part in (("stage1-aesthetic", [1, 2], rows[:2]), ("stage2-compress", [3, 4], rows[2:])):
        for key in ("reward", "loss", "distill", "grad_norm", "lr"):
            events = acc.Scalars(f"{stage}/{key}")
            assert [e.step for e in events] == steps
            assert [e.value for e in events] == pytest.approx([r[key] for r in part], rel=1e-6)
    assert len(acc.Tags()["images"]) == 2  # each stage's samples.png


def test_report_to_tensorboard_without_the_package_exits_2(world, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    assert run_main(monkeypatch, tiny_args(world, tmp_path / "tb", "--report-to", "tensorboard")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install tensorboard" in err[0]
    assert not (tmp_path / "tb" / "run.json").exists()


def test_samples_png_is_rid_sample_on_fixed_noise(world, full_run):
    """Oracle: a fresh model + checkpoint.load of stage 2, rid.sample on noise seeded by --seed."""
    import rid

    models = rid.load_models(world.sd)
    group = checkpoint.load(models.unet, full_run / "stage2-compress")
    test = (full_run / "test_prompts.txt").read_text().split("\n")[:-1]
    noise = torch.randn((len(test), *models.latent_shape), generator=torch.Generator().manual_seed(0))
    imgs = rid.sample(models, test, noise, steps=2, guidance=7.5, group=group)  # (2, 3, 16, 16)
    expect = torch.cat(list(imgs), dim=2)  # one row: (3, 16, 32)
    png = torch.from_numpy(np.array(Image.open(full_run / "stage2-compress" / "samples.png"))).permute(2, 0, 1)
    assert png.shape == expect.shape
    assert (png.float() - expect * 255).abs().max() <= 1.0


def test_stage_dirs_load_in_diffusers_as_the_stage(world, full_run):
    """Every finished stage dir: diffusers' pipe.load_lora_weights(stage_dir) (it picks
    pytorch_lora_weights.safetensors by its default name) and the kohya twin lora_kohya.safetensors (diffusers'
    kohya converter) give the CFG prediction of checkpoint.load's group on a fresh model."""
    import rid
    from diffusers import StableDiffusionPipeline

    models = rid.load_models(world.sd)
    z = torch.randn(2, *models.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = models.conditioning(["a photo of a cat", "a red car"], 7.5)
    with torch.no_grad():
        base = models.predict(z, 501, cond, 7.5)
    for stage in ("stage1-aesthetic", "stage2-compress"):
        d = full_run / stage
        checkpoint.load(models.unet, d)
        with torch.no_grad():
            ours = models.predict(z, 501, cond, 7.5)
        for weight_name in (None, checkpoint.KOHYA_FILE):
            pipe = StableDiffusionPipeline.from_pretrained(world.sd, safety_checker=None)
            pipe.load_lora_weights(str(d), **({"weight_name": weight_name} if weight_name else {}))
            with torch.no_grad():
                theirs = dataclasses.replace(models, unet=pipe.unet).predict(z, 501, cond, 7.5)
            moved, diff = (ours - base).abs().max().item(), (ours - theirs).abs().max().item()
            assert moved > 1e-4, f"{stage}: the adapters move the output by only {moved:.3g}"
            assert diff <= 1e-5, f"{stage} {weight_name or 'load_lora_weights(stage_dir)'}: max |diffusers - rid| = " \
                                 f"{diff:.3g} (the adapters move it {moved:.3g})"


def test_lcm_sdxl_run_samples_with_its_seeded_generator_and_loads_in_diffusers(world, tmp_path, monkeypatch):
    """A real tiny LCM-SDXL run (sampler auto -> lcm, which re-noises between steps): samples.png is rid.sample
    with the LCM sampler and the fresh noise drawn from the generator that drew the initial noise (the global
    RNG is moved first, so a draw from it would differ), and the stage dir loads with load_lora_weights."""
    import rid
    from diffusers import StableDiffusionXLPipeline

    model = tiny.tiny_sdxl(tmp_path / "lcm", scheduler="lcm", time_cond_proj_dim=8)
    out = tmp_path / "run"
    torch.manual_seed(123)
    assert run_main(monkeypatch, tiny_args(world, out, tasks="aesthetic")[2:] + ["--model", model]) == 0
    models = rid.load_models(model)
    group = checkpoint.load(models.unet, out / "stage1-aesthetic")
    test = (out / "test_prompts.txt").read_text().split("\n")[:-1]
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn((len(test), *models.latent_shape), generator=gen)
    imgs = rid.sample(models, test, noise, steps=2, guidance=7.5, group=group, sampler="lcm", generator=gen)
    png = torch.from_numpy(np.array(Image.open(out / "stage1-aesthetic" / "samples.png"))).permute(2, 0, 1)
    assert (png.float() - torch.cat(list(imgs), dim=2) * 255).abs().max() <= 1.0
    other = rid.sample(models, test, noise, steps=2, guidance=7.5, group=group, sampler="lcm",
                       generator=torch.Generator().manual_seed(7))  # other fresh noise: the check can fail
    assert (png.float() - torch.cat(list(other), dim=2) * 255).abs().max() > 1.0

    z = torch.randn(2, *models.latent_shape, generator=torch.Generator().manual_seed(1))
    cond = models.conditioning(test, 7.5)
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.load_lora_weights(str(out / "stage1-aesthetic"))
    with torch.no_grad():
        ours = models.predict(z, 501, cond, 7.5)
        theirs = dataclasses.replace(models, unet=pipe.unet).predict(z, 501, cond, 7.5)
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-5, f"LCM-SDXL stage dir: max |diffusers - rid| = {diff:.3g}"


#### CRASH SAFETY ####

def test_resume_of_a_run_from_before_lr_schedules_means_constant(world, full_run, tmp_path):
    """run.json written before --lr-schedule existed has no lr_schedule: it trained at a constant lr."""
    old = tmp_path / "old"
    old.mkdir()
    for name in ("train_prompts.txt", "test_prompts.txt"):
        shutil.copy(full_run / name, old / name)
    run = json.loads((full_run / "run.json").read_text())
    del run["config"]["lr_schedule"]
    (old / "run.json").write_text(json.dumps(run))
    train.open_run(resolve(*tiny_args(world, old, "--resume")), resume=True)  # constant: accepted
    with pytest.raises(UsageError, match="lr_schedule: was .*'constant'.*now .*'cosine'"):
        train.open_run(resolve(*tiny_args(world, old, *COSINE, "--resume")), resume=True)


def test_resume_after_hard_crash_is_bit_exact(world, full_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "crashed"
    # dies (os._exit) right after step 3 = stage 2, step 1, whose checkpoint is written
    p = subprocess.run([sys.executable, LAUNCHER, "--reward", HOOK, "--die-after-step", "3", "--",
                        *tiny_args(world, out, *COSINE)],
                       capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 17, p.stderr[-2000:]
    assert json.loads((out / "run.json").read_text())["stages"] == ["stage1-aesthetic"]
    assert (out / "stage2-compress" / "ckpt" / "trainer.pt").exists()
    assert not (out / "stage2-compress" / "adapters.safetensors").exists()

    assert run_main(monkeypatch, tiny_args(world, out, *COSINE)) == 2  # no --resume: refuses to overwrite
    assert "--resume" in capsys.readouterr().err
    assert run_main(monkeypatch, tiny_args(world, out, *COSINE, "--resume", "--lam", "0.2")) == 2
    assert "lam: was 0.1, now 0.2" in capsys.readouterr().err

    log = tmp_path / "log-resume"
    assert run_main(monkeypatch, tiny_args(world, out, *COSINE, "--resume"), RID_TEST_LOG=str(log)) == 0
    assert len(Path(f"{log}.0").read_text().splitlines()) == 2  # only step 2's two micro-batches ran
    assert json.loads((out / "run.json").read_text())["stages"] == ["stage1-aesthetic", "stage2-compress"]
    for stage in ("stage1-aesthetic", "stage2-compress"):
        ref, got = adapters(full_run / stage), adapters(out / stage)
        assert ref.keys() == got.keys()
        for key in ref:
            assert torch.equal(ref[key], got[key]), (stage, key)
    rows = [json.loads(l) for l in (out / "stage2-compress" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_nan_loss_exits_3_and_keeps_the_checkpoint(world, tmp_path, monkeypatch, capsys):
    _calls[0] = 0
    out = tmp_path / "nan"
    argv = tiny_args(world, out, tasks="aesthetic")
    assert run_main(monkeypatch, argv, "test_train:nan_from_second_step") == 3
    err = capsys.readouterr().err.strip()
    assert "nan" in err and "step 2" in err and str(out / "stage1-aesthetic" / "ckpt") in err
    state = torch.load(out / "stage1-aesthetic" / "ckpt" / "trainer.pt", weights_only=True)
    assert state["step"] == 1
    assert json.loads((out / "run.json").read_text())["stages"] == []


class Crash(Exception):
    """Stands for a kill: raised from the reward, it leaves the run directory as the crash would."""


def crash_at(call):
    """tiny.toy_reward that raises Crash at its `call`-th call (2 calls per step in tiny_args)."""
    calls = [0]

    def reward(images, prompts):
        calls[0] += 1
        if calls[0] == call:
            raise Crash
        return tiny.toy_reward(images, prompts)
    return reward


def crashed_in_stage_2(world, out, monkeypatch):
    """A tiny_args run stopped in step 4 (stage 2, step 2): stage 2's step-1 checkpoint is on disk."""
    monkeypatch.setattr(train, "reward_fn", lambda task, cfg: reward)
    reward = crash_at(7)
    with pytest.raises(Crash):
        train.main(tiny_args(world, out, *COSINE))
    assert (out / "stage2-compress" / "ckpt" / "trainer.pt").exists()
    assert json.loads((out / "run.json").read_text())["stages"] == ["stage1-aesthetic"]


def assert_same_adapters(ref_run, run, stages=("stage1-aesthetic", "stage2-compress")):
    for stage in stages:
        ref, got = adapters(ref_run / stage), adapters(run / stage)
        assert ref.keys() == got.keys()
        for key in ref:
            assert torch.equal(ref[key], got[key]), (stage, key)


def test_torn_metrics_line_is_dropped_on_resume(world, full_run, tmp_path, monkeypatch, capsys):
    """A kill while a metrics row was appended leaves half a line; it blocked every later resume."""
    out = tmp_path / "torn"
    crashed_in_stage_2(world, out, monkeypatch)
    with open(out / "stage2-compress" / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "epoch": 0, "rew')
    capsys.readouterr()
    assert run_main(monkeypatch, tiny_args(world, out, *COSINE, "--resume")) == 0
    assert "dropping its torn last line" in capsys.readouterr().out
    assert_same_adapters(full_run, out)
    rows = [json.loads(l) for l in (out / "stage2-compress" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]


def test_unreadable_checkpoint_starts_the_stage_over_bit_exactly(world, full_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "garbled"
    crashed_in_stage_2(world, out, monkeypatch)
    (out / "stage2-compress" / "ckpt" / "trainer.pt").write_bytes(b"\x00" * 100)  # was: a torch.load traceback
    leftovers = [out / "stage2-compress" / ".ckpt.x1.tmp", out / ".run.json.x2.tmp"]  # a kill mid-write
    leftovers[0].mkdir(), leftovers[1].write_text("{")
    capsys.readouterr()
    assert run_main(monkeypatch, tiny_args(world, out, *COSINE, "--resume")) == 0
    said = capsys.readouterr().out
    assert "skipping checkpoint" in said and "trainer.pt" in said and "starting the stage over" in said
    assert_same_adapters(full_run, out)  # stage 2 retrained from stage 1's saved adapters: the same numbers
    assert sorted(p.name for p in (out / "stage2-compress").iterdir() if p.name.startswith("ckpt")) == []
    assert not any(p.exists() for p in leftovers)  # removed under the lock


def test_unreadable_checkpoint_falls_back_to_the_previous_one(world, tmp_path, monkeypatch, capsys):
    """Three steps, a checkpoint after steps 1 and 2, a crash in step 3, then ckpt/ (step 2) damaged:
    the resume takes ckpt.old/ (step 1) and ends bit-identical to an uninterrupted run."""
    argv = lambda out, *x: tiny_args(world, out, "--max-steps", "3", *x, tasks="compress")  # noqa: E731
    assert run_main(monkeypatch, argv(tmp_path / "ref")) == 0
    out = tmp_path / "fallback"
    monkeypatch.setattr(train, "reward_fn", lambda task, cfg: reward)
    reward = crash_at(5)
    with pytest.raises(Crash):
        train.main(argv(out))
    stage = out / "stage1-compress"
    assert [checkpoint.load_trainer(stage / d)["step"] for d in ("ckpt", "ckpt.old")] == [2, 1]
    data = bytearray((stage / "ckpt" / "adapters.safetensors").read_bytes())
    data[-5] ^= 1  # one flipped bit in a tensor: only the checksum notices
    (stage / "ckpt" / "adapters.safetensors").write_bytes(bytes(data))
    capsys.readouterr()
    assert run_main(monkeypatch, argv(out, "--resume")) == 0
    said = capsys.readouterr().out
    assert "checksum mismatch" in said and f"trying {stage / 'ckpt.old'}" in said
    assert f"resuming at step 1/3 from {stage / 'ckpt.old'}" in said
    assert_same_adapters(tmp_path / "ref", out, stages=("stage1-compress",))


def test_resume_verifies_finished_stages(world, full_run, tmp_path, monkeypatch, capsys):
    out = tmp_path / "copy"
    shutil.copytree(full_run, out)
    st = out / "stage1-aesthetic" / "adapters.safetensors"
    data = bytearray(st.read_bytes())
    data[-5] ^= 1
    st.write_bytes(bytes(data))
    assert run_main(monkeypatch, tiny_args(world, out, *COSINE, "--resume")) == 2  # was: "done", exit 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(st) in err[0] and "checksum mismatch" in err[0]


def test_resume_refuses_settings_that_change_the_numbers(world, full_run, tmp_path, monkeypatch, capsys):
    """--micro-batch/--grad-accum (and the world size) set the order the gradient sums in: adapters differ
    by ~1e-6, so a resume must keep them (they were documented as free to change)."""
    out = tmp_path / "copy"
    shutil.copytree(full_run, out)
    base = tiny_args(world, out, *COSINE, "--resume")  # batch 2 as 2 micro-batches of 1
    mb = base.index("--micro-batch")
    for argv, words in ((base[:mb + 1] + ["2"] + base[mb + 2:], "micro_batch: was 1, now 2"),  # 1 of 2
                        (base[:mb] + base[mb + 2:] + ["--grad-accum", "1"], "grad_accum: was None, now 1")):
        assert run_main(monkeypatch, argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and words in err[0], err
    run = json.loads((out / "run.json").read_text())
    (out / "run.json").write_text(json.dumps({**run, "world_size": 2}))
    assert run_main(monkeypatch, tiny_args(world, out, *COSINE, "--resume")) == 2
    assert "world size: was 2 process(es), now 1" in capsys.readouterr().err
    (out / "run.json").write_text(json.dumps(run))
    assert run_main(monkeypatch, tiny_args(world, out, *COSINE, "--resume", "--ckpt-every", "5")) == 0  # runtime only


def test_gradient_checkpointing_does_not_change_the_numbers(world, tmp_path, monkeypatch):
    """Why --resume may switch --gradient-checkpointing: recomputing the activations in the backward
    pass gives bit-identical adapters (draft-k with 2 gradient steps, where it recomputes)."""
    got = []
    for flag in ([], ["--gradient-checkpointing"]):
        out = tmp_path / f"gc{len(flag)}"
        argv = tiny_args(world, out, "--method", "draft-k", "--steps", "3", "--truncate", "2", *flag, tasks="aesthetic")
        assert run_main(monkeypatch, argv) == 0
        got.append(adapters(out / "stage1-aesthetic"))
    assert got[0].keys() == got[1].keys() and all(torch.equal(got[0][k], got[1][k]) for k in got[0])
    assert "gradient_checkpointing" in config.RUNTIME


def test_atomic_directory_swap(tmp_path):
    ckpt = tmp_path / "ckpt"
    for step in (1, 2):
        checkpoint.save_dir_atomic(ckpt, lambda d: (d / "trainer.pt").write_text(str(step)))
    assert (ckpt / "trainer.pt").read_text() == "2" and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    os.replace(ckpt, tmp_path / "ckpt.old")  # a crash between the two renames of the swap
    assert checkpoint.find_ckpt(tmp_path) == tmp_path / "ckpt.old"


#### MULTI-PROCESS ####

def test_ddp_two_processes_match_one(world, full_run, tmp_path):
    out = tmp_path / "ddp"
    log = tmp_path / "log-ddp"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        LAUNCHER, "--reward", HOOK, "--", *tiny_args(world, out, *COSINE)],
                       capture_output=True, text=True, env=subprocess_env(RID_TEST_LOG=str(log)), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    for stage in ("stage1-aesthetic", "stage2-compress"):
        ref, got = adapters(full_run / stage), adapters(out / stage)
        for key in ref:
            torch.testing.assert_close(got[key], ref[key], rtol=1e-5, atol=1e-7)
    # each process scored its own half of every global batch; together, exactly the 1-process batches
    one = [json.loads(l) for l in Path(f"{world.dir / 'log-full'}.0").read_text().splitlines()]
    r0, r1 = ([json.loads(l) for l in Path(f"{log}.{r}").read_text().splitlines()] for r in (0, 1))
    assert len(r0) == len(r1) == 4 and len(one) == 8  # 4 steps: 1 micro-batch per rank, 2 in 1 process
    for s in range(4):
        assert r0[s] + r1[s] == one[2 * s] + one[2 * s + 1]


def test_resolution_trains_and_evaluates_at_that_size(world, tmp_path, monkeypatch, capsys):
    """--resolution reaches the training samples and eval's images (the run's own by default), is kept
    by --resume, and a size the model cannot take exits 2 with one line."""
    import eval as evaluation
    import rid

    m = rid.load_models(world.sd).resolution_multiple
    out = tmp_path / "res"
    args = tiny_args(world, out, "--resolution", str(2 * m), tasks="aesthetic")
    assert run_main(monkeypatch, args) == 0
    assert Image.open(out / "stage1-aesthetic" / "samples.png").height == 2 * m  # a grid row of 2m × 2m images
    assert json.loads((out / "run.json").read_text())["config"]["resolution"] == 2 * m
    assert run_main(monkeypatch, tiny_args(world, out, tasks="aesthetic") + ["--resume"]) == 2
    assert "resolution: was" in capsys.readouterr().err
    bad = tiny_args(world, tmp_path / "bad", "--resolution", str(m + m // 2), tasks="aesthetic")
    assert run_main(monkeypatch, bad) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert f"--resolution {m + m // 2} is not allowed; allowed: a multiple of {m}" in err[-1]
    from test_rewards import tiny_spec

    (tmp_path / "spec").mkdir()
    tiny_spec(tmp_path / "spec")
    rep = tmp_path / "rep"
    assert evaluation.main(["--ckpt", str(out), "--out", str(rep), "--images-per-prompt", "2", "--max-prompts", "2",
                            "--reward-spec", str(tmp_path / "spec" / "rewards.json"), "--device", "cpu"]) == 0
    report = json.loads((rep / "report.json").read_text())
    strips = [rep / r["strip"] for r in report["rows"] if r.get("strip")]
    assert len(strips) == 2 and all(Image.open(f).height == 2 * m for f in strips)
    assert evaluation.main(["--ckpt", str(out), "--out", str(tmp_path / "rep2"), "--resolution", str(m + m // 2),
                            "--device", "cpu"]) == 2
    assert f"--resolution {m + m // 2} is not allowed" in capsys.readouterr().err


def test_branch_from_copies_the_shared_stages_and_ends_as_a_run_from_scratch(world, full_run, tmp_path,
                                                                            monkeypatch, capsys):
    src = tmp_path / "src"  # the reference's first task alone: its stage 1 is the full run's stage 1
    assert run_main(monkeypatch, tiny_args(world, src, tasks="aesthetic")) == 0
    out, log = tmp_path / "branch", tmp_path / "log-branch"
    assert run_main(monkeypatch, tiny_args(world, out, *COSINE, "--branch-from", str(src)),
                    RID_TEST_LOG=str(log)) == 0
    assert len(Path(f"{log}.0").read_text().splitlines()) == 4  # stage 2 only: 2 steps × 2 micro-batches
    info = json.loads((out / "run.json").read_text())
    assert info["stages"] == ["stage1-aesthetic", "stage2-compress"]
    assert info["branched_from"] == {"run": str(src.resolve()), "stages": ["stage1-aesthetic"]}
    for stage in ("stage1-aesthetic", "stage2-compress"):
        ref, got = adapters(full_run / stage), adapters(out / stage)
        assert ref.keys() == got.keys()
        for key in ref:
            assert torch.equal(ref[key], got[key]), (stage, key)
    assert (out / "train_prompts.txt").read_text() == (full_run / "train_prompts.txt").read_text()
    assert not list(out.glob(".*.tmp")) and not (out / "stage1-aesthetic" / "ckpt").exists()

    # refused, one line each, and nothing left in --out
    st = src / "stage1-aesthetic" / "adapters.safetensors"
    cases = [(tiny_args(world, tmp_path / "b1", *COSINE, "--lam", "0.2", "--branch-from", str(src)),
              "lam: was 0.1, now 0.2"),
             (tiny_args(world, tmp_path / "b2", "--branch-from", str(src), tasks="compress,aesthetic"),
              "nothing to share"),
             (tiny_args(world, tmp_path / "b3", "--branch-from", str(tmp_path / "nowhere")), "nowhere"),
             (tiny_args(world, tmp_path / "b4", *COSINE, "--branch-from", str(src)), "checksum mismatch")]
    for argv, words in cases:
        if words == "checksum mismatch":
            st.write_bytes(st.read_bytes()[:-1] + b"\0")
        assert run_main(monkeypatch, argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert words in err[-1] and "Traceback" not in "\n".join(err), (words, err)
        o = Path(argv[argv.index("--out") + 1])
        assert not (o / "run.json").exists() and not list(o.glob("*stage*")), (words, list(o.glob("*")))


DDP_AUTO = """
import os, sys
sys.path[:0] = [{root!r}, {tests!r}]
import memplan, tiny, train
train.reward_fn = lambda task, cfg: tiny.toy_reward
free = {free!r}[int(os.environ["RANK"])]
memplan.free_bytes = lambda device: free
sys.exit(train.main(sys.argv[1:]))
"""


def test_micro_batch_auto_under_torchrun_takes_the_smallest_gpus_pick(world, tmp_path):
    """Two processes whose devices have different free memory: rank 0 could take 2 samples per pass, rank 1
    only 1; both must run the same micro-batch (the smaller), recorded once in run.json."""
    import memplan as memory

    need = {b: _real_need(world, b) for b in (1, 2)}
    roomy, tight = need[2] * 4, (need[1] + need[2]) / 2 / (1 - memory.MARGIN)
    script = tmp_path / "auto.py"
    script.write_text(DDP_AUTO.format(root=str(ROOT), tests=str(ROOT / "tests"), free=[int(roomy), int(tight)]))
    argv = tiny_args(world, tmp_path / "ddp", "--batch", "4", "--max-steps", "1", tasks="aesthetic")
    argv[argv.index("--micro-batch") + 1] = "auto"
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(script), *argv], capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "run.json").read_text())["config"]["micro_batch"] == 1
    stage = json.loads((tmp_path / "ddp" / "stage1-aesthetic" / "config.json").read_text())
    assert (stage["micro_batch_resolved"], stage["grad_accum_resolved"], stage["world_size"]) == (1, 2, 2)
