"""Shared test set-up: the repository root on sys.path (so `import dice` works from any directory), and the
synthetic datasets written once per test session into a temporary folder."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def sample_root(tmp_path_factory):
    """All five synthetic datasets, written once for the whole test session (as `python sample_data.py` does)."""
    import sample_data

    root = tmp_path_factory.mktemp("sample")
    sample_data.write_all(root)
    return root


@pytest.fixture
def repo_copy(tmp_path):
    """make(script, datasets={}) -> a fresh copy of the repository in tmp_path/"repo": the script and the shared
    modules, and for each `{folder under data/: source folder}` a copy of the source there, as a user's clone has
    them. Running a script in it writes nothing into the real repository."""
    import shutil

    def make(script: str, datasets: dict | None = None) -> Path:
        repo = tmp_path / "repo"
        repo.mkdir(exist_ok=True)
        assert (REPO_ROOT / script).is_file(), script
        for path in REPO_ROOT.glob("*.py"):  # the scripts and every shared module, whatever a script imports
            shutil.copy(path, repo / path.name)
        for folder, source in (datasets or {}).items():
            shutil.copytree(source, repo / "data" / folder)
        return repo

    return make
