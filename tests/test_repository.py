"""The repository as a user and CI meet it: the README's commands, CI reading them, lint, ignored data."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import sample_data

REPO_ROOT = Path(__file__).resolve().parents[1]
README = (REPO_ROOT / "README.md").read_text()


def quick_start_commands():
    section = README.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_quick_start_is_two_commands_install_then_test():
    run, test = quick_start_commands()
    assert re.fullmatch(r"python -m pip install -r requirements\.txt && (QUICK=1 )?python \w+\.py", run)
    assert (REPO_ROOT / run.split()[-1]).is_file()
    assert test == "python -m pip install -r requirements-dev.txt && python -m pytest"


def test_ci_runs_the_readme_test_command_in_a_fresh_environment():
    ci = (REPO_ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in ci and "set -euo pipefail" in ci
    pattern = re.search(r"grep -m1 -E '([^']+)' README.md", ci).group(1)
    assert re.match(pattern, quick_start_commands()[1])


def test_requirements_pin_a_torch_that_matches_torchvision():
    requirements = (REPO_ROOT / "requirements.txt").read_text()
    assert re.search(r"^torch>=2\.14", requirements, re.M) and re.search(r"^torchvision>=0\.29", requirements, re.M)
    dev = (REPO_ROOT / "requirements-dev.txt").read_text()
    assert "-r requirements.txt" in dev
    for package in ("pytest", "jupytext", "nbclient", "ipykernel", "ruff"):
        assert re.search(rf"^{package}\b", dev, re.M), package


def test_readme_documents_every_dataset_folder_and_the_quick_switch():
    for name in sample_data.WRITERS:
        assert f"`{name}/`" in README, name
    assert "QUICK=1" in README


def test_data_and_outputs_stay_out_of_git(tmp_path):
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    probes = ["data/MontgomerySet/CXR_png/a.png", "output/lung_xray_unet/best.pt", "data/sample/x.nii.gz", "a.ipynb"]
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", *probes], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.split()
    assert ignored == probes
    kept = subprocess.run(["git", "check-ignore", "--no-index", "data/README.md", "output/README.md"], cwd=REPO_ROOT)
    assert kept.returncode == 1  # neither README is ignored


@pytest.mark.parametrize("command", [["check", "."], ["format", "--check", "."]])
def test_ruff_is_clean(command):
    result = subprocess.run([sys.executable, "-m", "ruff", *command], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
