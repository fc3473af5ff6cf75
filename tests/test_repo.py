"""The README, CI and the repository agree (DEVELOPERS.md: README, CLI --help and code in agreement)."""
import importlib.metadata
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in setup.splitlines() if line.startswith("    ") and line.strip()]


def test_readme_has_two_setup_commands():
    cmds = _readme_commands()
    assert len(cmds) == 2, cmds
    assert all(c.startswith("pip install -r requirements.txt -c requirements.lock && ") for c in cmds)
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


def test_lock_pins_every_requirement():
    """The README installs from requirements.lock (every package the suite last passed with): each
    package requirements.txt names is pinned there, and the pins satisfy requirements.txt's ranges."""
    from packaging.requirements import Requirement

    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not name==version"
            pins[_normal(name)] = version
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            assert _normal(req.name) in pins, f"{req.name} (requirements.txt) is not pinned in requirements.lock"
            assert req.specifier.contains(pins[_normal(req.name)], prereleases=True), \
                f"requirements.lock pins {req.name}=={pins[_normal(req.name)]}, outside requirements.txt's {req}"


def _normal(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def our_import_names(root: Path) -> dict:
    """Import name → the file or folder of `root` that claims it: the top-level modules and packages
    (namespace packages included: `examples.black_box` is imported as a task), which sit first on
    sys.path whenever a script or `python -m` runs from the root, and the modules of tests/, which
    pytest puts first on sys.path itself (rootdir conftest, no tests/__init__.py)."""
    names = {}
    for p in sorted(root.iterdir()):
        if p.name.startswith((".", "_")) or p.name == "tests":
            continue
        if p.suffix == ".py":
            names[p.stem] = p.name
        elif p.is_dir() and any(p.glob("*.py")):
            names[p.name] = p.name + "/"
    for p in sorted((root / "tests").glob("*.py")):
        names[p.stem] = f"tests/{p.name}"
    return names


def collisions(root: Path) -> list:
    """Each of root's import names that an installed distribution or the standard library also uses."""
    installed = importlib.metadata.packages_distributions()  # top-level import name → distributions
    found = []
    for name, where in our_import_names(root).items():
        if name in installed:
            found.append(f"{where} and the installed distribution(s) {', '.join(sorted(set(installed[name])))} "
                         f"both claim the import name {name!r}")
        elif name in sys.stdlib_module_names:
            found.append(f"{where} and the standard library both claim the import name {name!r}")
    return found


def test_no_import_name_a_dependency_claims():
    """transformers 5.25 imports Hugging Face's `kernels` package; our Triton folder was `kernels/`,
    so every script run from the root imported ours instead and every fresh install broke. No name of
    the repository may be a top-level import name of any installed distribution or of the stdlib."""
    found = collisions(ROOT)
    assert not found, "\n".join(found) + "\n(rename ours: a name no distribution on the package index uses)"


def test_tests_folder_stays_a_plain_folder():
    """torch-fidelity installs a top-level `tests` package. Ours is never imported under that name
    (pytest puts tests/ itself on sys.path), which holds only while tests/ has no __init__.py."""
    assert not (ROOT / "tests" / "__init__.py").exists()


def test_collision_check_catches_a_planted_name(tmp_path):
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "tiny.py").write_text("")
    assert collisions(tmp_path) == []
    (tmp_path / "torch.py").write_text("")  # a module named like an installed package
    (tmp_path / "numpy").mkdir()
    (tmp_path / "numpy" / "__init__.py").write_text("")
    (tmp_path / "tests" / "pytest.py").write_text("")
    (tmp_path / "json.py").write_text("")  # the standard library's
    found = "\n".join(collisions(tmp_path))
    for ours, theirs in (("torch.py", "torch"), ("numpy/", "numpy"), ("tests/pytest.py", "pytest"), ("json.py", "standard library")):
        assert f"{ours} and " in found and theirs in found, found
