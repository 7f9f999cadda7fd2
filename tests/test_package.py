"""The package: pyproject.toml installs `mtq_common` and `kernels` with requirements.txt's dependencies, a LICENSE,
and `import mtq_common` (with `load_policy`) works from any folder without importing torch.

The real `pip install -e .` into a fresh virtual environment takes minutes (torch); this checks what it reads and
runs the import from outside the checkout with the repository on PYTHONPATH, a stand-in for the installed path."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_pyproject_installs_both_packages_with_the_requirements():
    project = pyproject()
    assert project["build-system"]["build-backend"] == "setuptools.build_meta"
    meta = project["project"]
    assert meta["name"] == "mtquant" and meta["requires-python"] == ">=3.10" and meta["license"] == "MIT"
    # every package below the two libraries is installed (the rooms of mtq_common too), nothing else
    setuptools = pytest.importorskip("setuptools")
    found = set(setuptools.find_packages(REPO, include=project["tool"]["setuptools"]["packages"]["find"]["include"]))
    on_disk = {".".join(init.relative_to(REPO).parent.parts) for package in ("mtq_common", "kernels")
               for init in (REPO / package).rglob("__init__.py")}  # fmt: skip
    assert found == on_disk and {"mtq_common.training", "mtq_common.evaluation", "kernels"} <= found, found
    # the dependencies are requirements.txt itself: one list, the same bounds and the triton marker
    assert "dependencies" in meta["dynamic"] and "dependencies" not in meta
    assert project["tool"]["setuptools"]["dynamic"]["dependencies"] == {"file": ["requirements.txt"]}
    assert {"ruff", "pytest"} <= set(project["tool"])  # the tool tables stay


def test_license_is_mit():
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "Copyright (c) 2026 MTQuant contributors" in text
    assert "WITHOUT WARRANTY OF ANY KIND" in text


def test_import_from_another_folder_is_light(tmp_path):
    code = "import sys, mtq_common; light = 'torch' not in sys.modules; print(mtq_common.load_policy.__name__, light)"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["load_policy", "True"]  # torch loads only when the API is first used
