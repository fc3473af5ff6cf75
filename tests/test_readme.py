"""Every command the README shows runs, so the README cannot drift from the code.

Each command is read out of README.md (its indented command lines and its python block) and run
in this process at toy size: SD-1.5 replaced by tests/tiny.py's model, the reward models by tiny
ones (test_rewards.tiny_spec for eval.py, tiny.toy_reward for training), the COCO folder by a toy
one in COCO's layout, and flags appended that shrink the run (--max-steps 1, --steps 2, --batch 2,
--max-prompts 1, --coco-n 2; argparse keeps the last value). The mini-world commands run in the
committed mini world with its real rewards. torchrun's command runs as one process here (its train.py
arguments are the same; tests/test_train.py's DDP test runs two). The pytest and pip commands are
tests/test_repo.py's (the lock, .ci/run)."""
import json
import shlex
from pathlib import Path

import pytest

import checkpoint
import config
import eval as ev
import tiny
import train
from test_eval import fake_coco
from test_rewards import tiny_spec

ROOT = Path(__file__).resolve().parents[1]
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
PROGRAMS = ("pip install", "TRITON_INTERPRET=1 python -m pytest", "python train.py", "torchrun --nproc_per_node=2 train.py",
            "python eval.py", "python -m checkpoint export")

pytestmark = pytest.mark.usefixtures("one_thread")


def readme_commands() -> list:
    """Every command of the README's indented command lines (outside fenced blocks), split at &&."""
    cmds, fenced = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif line.startswith("    ") and line.strip() and not fenced:
            cmds += [c.strip() for c in line.split("&&")]
    return cmds


def python_block() -> str:
    text = (ROOT / "README.md").read_text()
    return text.split("```python\n", 1)[1].split("```", 1)[0]


def test_every_readme_command_is_one_this_test_runs():
    cmds = readme_commands()
    unknown = [c for c in cmds if not c.startswith(PROGRAMS)]
    assert not unknown, f"README commands this test does not run yet: {unknown}"
    for prog in PROGRAMS:
        assert any(c.startswith(prog) for c in cmds), f"README no longer shows {prog!r}: update this test"


def test_paper_commands_resolve_to_the_papers_settings():
    """Parsed as written (no toy flags): SD-1.5, the paper's prompts, schedules and sampler, bf16."""
    for cmd in readme_commands():
        argv = shlex.split(cmd)
        if "train.py" not in argv or SD15 not in argv:
            continue
        cfg, is_mini = config.resolve(config.build_parser().parse_args(argv[argv.index("train.py") + 1:]))
        assert not is_mini and cfg.model == SD15 and cfg.tasks == ["aesthetic", "hps", "compress"]
        assert cfg.prompts == str(config.PAPER_TRAIN) and cfg.test_prompts == str(config.PAPER_TEST)
        assert cfg.epochs == {"aesthetic": 10, "hps": 120, "compress": 15}
        assert (cfg.steps, cfg.guidance, cfg.rank) == (50, 7.5, 4)
        assert cfg.batch == dict.fromkeys(cfg.tasks, 128 if cfg.method == "baseline" else 8)
        if "--dtype" in argv:
            assert cfg.dtype == "bf16" and cfg.micro_batch == "auto"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("readme")
    (d / "spec").mkdir()
    tiny_spec(d / "spec")
    return {"dir": d, "sd": tiny.tiny_sd(d / "sd"), "coco": str(fake_coco(d / "coco")),
            "spec": str(d / "spec" / "rewards.json")}


def toy_argv(argv: list, toy: dict) -> list:
    """The README's arguments with the toy world's paths in place of SD-1.5, runs/, ~/coco and out/."""
    d = toy["dir"]
    swap = {SD15: toy["sd"], "~/coco": toy["coco"], "out/": str(d / "out")}
    return [swap.get(a, str(d / a) if a.startswith("runs/") else a) for a in argv]


def test_readme_commands_run_at_toy_size(toy, monkeypatch, capsys):
    monkeypatch.setattr(train, "reward_fn", lambda task, cfg: tiny.toy_reward)
    ran = []
    for cmd in readme_commands():
        argv = shlex.split(cmd)
        if argv[0] == "pip" or "pytest" in argv:
            continue
        if "train.py" in argv:
            args = toy_argv(argv[argv.index("train.py") + 1:], toy)
            if SD15 not in argv:  # the mini world's main job: 1 step per task, its own rewards
                continue  # run below, after this loop (real rewards, no toy reward)
            if argv[0] == "torchrun":  # the alternative to the 1-GPU line, into a directory of its own
                args += ["--out", str(toy["dir"] / "torchrun")]
            code = train.main([*args, "--max-steps", "1", "--steps", "2", "--batch", "2", "--device", "cpu"])
        elif "eval.py" in argv:
            args = toy_argv(argv[argv.index("eval.py") + 1:], toy)
            if "--fid" not in args:
                continue  # the mini world's, below
            code = ev.main([*args, "--reward-spec", toy["spec"], "--fid-features", "clip", "--max-prompts", "1",
                            "--images-per-prompt", "1", "--coco-n", "2", "--steps", "2", "--device", "cpu"])
        else:  # python -m checkpoint export
            code = checkpoint.main(toy_argv(argv[3:], toy))
        assert code == 0, (cmd, capsys.readouterr().err)
        ran.append(argv[0] if argv[0] != "python" else argv[1] if argv[1] != "-m" else argv[2])
    assert ran == ["train.py", "torchrun", "train.py", "eval.py", "checkpoint"]
    report = json.loads((toy["dir"] / "runs" / "report" / "report.json").read_text())
    assert {r["method"] for r in report["rows"]} == {"base", "rid", "baseline"} and len(report["rows"]) == 7
    assert all("fid" in r["metrics"] for r in report["rows"])  # the COCO FID, at every stage

    # the README's diffusers lines load the exported LoRA
    code = python_block().replace(SD15, toy["sd"]).replace('"runs/rid"', repr(str(toy["dir"] / "runs" / "rid")))
    scope = {}
    exec(code, scope)
    assert scope["pipe"].get_active_adapters()


def test_mini_world_main_job_runs(toy, tmp_path, monkeypatch):
    """The first set-up command's train.py and eval.py, in the committed mini world, 1 step per task."""
    for cmd in readme_commands():
        argv = shlex.split(cmd)
        if "train.py" in argv and SD15 not in argv:
            assert train.main([*argv[2:], "--max-steps", "1", "--out", str(tmp_path / "out")]) == 0
        elif "eval.py" in argv and "--fid" not in argv:
            argv = [str(tmp_path / "out") if a == "out/" else a for a in argv[2:]]
            assert ev.main([*argv, "--max-prompts", "1", "--images-per-prompt", "2"]) == 0
    rows = json.loads((tmp_path / "out" / "report.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["stage0-base", "stage1-aesthetic", "stage2-hps", "stage3-compress"]
