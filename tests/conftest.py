"""Shared test set-up: the repository root on sys.path (so `import dice` works from any directory), the
synthetic datasets written once per test session into a temporary folder, a script loaded as a module, and one
torch thread for the modules that train."""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# Environment variables a script's Config reads its paths from (lung_xray_unet.py): a developer's own setting must
# not leak into the configuration a test starts from.
PATH_OVERRIDES = ("DATA_DIR", "OUTPUT_DIR", "IMAGES_DIR")


@pytest.fixture(scope="module")
def load_script():
    """load_script(name: str, quick: bool = True) -> the repository's `<name>.py` as a module; its `__main__`
    cell does not run. QUICK is set to 1 (or 0) while it loads: the configuration cell reads it once, at import.

    The module is registered in sys.modules under its name (dataclasses look their module up there) until the test
    module that loaded it ends, so that no other test module finds a script configured for someone else.
    """
    loaded = []

    def load(name: str, quick: bool = True):
        with pytest.MonkeyPatch.context() as env:
            env.setenv("QUICK", "1" if quick else "0")
            for variable in PATH_OVERRIDES:
                env.delenv(variable, raising=False)
            spec = importlib.util.spec_from_file_location(name, REPO_ROOT / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            loaded.append(name)
            spec.loader.exec_module(module)
        assert module.QUICK == quick
        return module

    yield load
    for name in loaded:
        sys.modules.pop(name, None)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One CPU thread for torch in a test module that trains (`pytestmark = pytest.mark.usefixtures(...)`).

    On a small machine shared with other processes (2 cores here), two OpenMP threads wait for each other at every
    one of a UNet's many small 2D or 3D operations whenever the other is descheduled: 10-35x slower, with the same
    result (the nerve quick run took 422 s with 2 threads and 12 s with 1, measured).
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
        (repo / "data").mkdir(exist_ok=True)  # tracked (data/README.md): a clone always has it
        shutil.copy(REPO_ROOT / "data" / "README.md", repo / "data" / "README.md")
        for folder, source in (datasets or {}).items():
            shutil.copytree(source, repo / "data" / folder)
        return repo

    return make


def config_edit(**settings) -> str:
    """The line a user types below a script's configuration cell: `cfg = Config(max_epochs=5, ...)` (paths as text,
    which Config accepts for its Path fields)."""
    values = ", ".join(f"{key}={str(value)!r}" if isinstance(value, Path) else f"{key}={value!r}"
                       for key, value in settings.items())  # fmt: skip
    return f"cfg = Config({values})"


@pytest.fixture
def run_cells(tmp_path):
    """run_cells(script, **settings) -> the names the script's cells leave at top level (cfg, data, batch, model,
    history, per_case, ...), after running it in this process as `python script.py` does, all cells in order, with
    `cfg = Config(**settings)` typed below its configuration cell. The script runs from a copy in tmp_path/"cells"
    (its own folder is its ROOT: give data_dir, output_dir and images_dir to keep it off the repository's)."""
    import runpy

    folder = tmp_path / "cells"
    folder.mkdir(exist_ok=True)
    hook = sys.excepthook

    def run(script: str, **settings) -> dict:
        source = (REPO_ROOT / f"{script}.py").read_text()
        assert source.count("\ncfg = Config()\n") == 1, script
        path = folder / f"{script}.py"
        path.write_text(source.replace("\ncfg = Config()\n", f"\ncfg = Config()\n{config_edit(**settings)}\n"))
        try:
            return runpy.run_path(str(path), run_name="__main__")
        finally:
            sys.excepthook = hook  # the configuration cell makes data problems one line: for its run only

    return run


@pytest.fixture(autouse=True)
def readme_pictures_on(monkeypatch):
    """The scripts' tests check that a run on the synthetic sample copies its figures for the README, which a user
    asks for with README_PICTURES=1 (off by default: tests/test_checkpoints.py checks that). Scripts run in a
    subprocess get it from the environment."""
    import checkpoints

    monkeypatch.setattr(checkpoints, "README_PICTURES", True)
    monkeypatch.setenv("README_PICTURES", "1")
