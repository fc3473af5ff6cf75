"""The README, CI and the repository agree (DEVELOPERS.md: README, CLI --help and code in agreement)."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in setup.splitlines() if line.startswith("    ") and line.strip()]


def test_readme_has_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert all(c.startswith("pip install -r requirements.txt && ") for c in cmds)
    assert "python train.py" in cmds[0]
    assert "pytest" in cmds[1]


def test_ci_runs_exactly_the_readme_test_command():
    test_cmd = _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_cmd in ci, f"{test_cmd!r} is not a line of .ci/run"


def _repo_files():
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        return [ROOT / f for f in out.splitlines() if (ROOT / f).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        return [p for p in ROOT.rglob("*") if p.is_file() and not any(x.startswith(".") for x in p.parts)]


def test_no_machine_paths_in_sources():
    for path in _repo_files():
        if path.suffix not in {".py", ".md", ".txt", ".json", ".ini"} or path.name == "test_repo.py":
            continue
        text = path.read_text(errors="ignore")
        assert "/work/" not in text and "/root/" not in text, f"machine path in {path}"


def test_binaries_within_budget():
    """DESIGN.md: PNGs ≤ 1 MB each; the mini world's safetensors ≤ 20 MB in total; nothing else binary."""
    total = 0
    for path in _repo_files():
        if path.suffix == ".png":
            assert path.stat().st_size <= 1 << 20, path
        if path.suffix == ".safetensors" and "mini" in path.parts:
            total += path.stat().st_size
    assert total <= 20 << 20, f"mini world artifacts {total / 2**20:.1f} MB > 20 MB"
