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
