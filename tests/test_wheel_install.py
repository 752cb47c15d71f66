"""The built wheel, installed on its own, ships the task YAMLs and the replay model, and its tasks are listed.

Cheap and honest "fresh install": the wheel is built from a copy of the sources and installed with
``pip install --no-deps --no-index --target DIR``; the checks then run in a folder outside the checkout with
``PYTHONPATH=DIR`` ahead of the environment (which provides lmms-eval, torch, ...), and assert that the
``lmms_emi`` imported and the task folder used are the wheel's copies, not the checkout's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    for name in ("lmms_emi", "tasks", "estimator_ckpt"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=ignore)
    pip = [sys.executable, "-m", "pip"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index",
         "-w", str(root / "dist"), str(src)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = (root / "dist").glob("lmms_emi-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "lmms_emi/tasks/llavabench_shift/_lbshift_base.yaml" in names
    assert "lmms_emi/estimator_ckpt/registry.json" in names  # the registered estimators (--estimator NAME)
    assert sum(n.startswith("lmms_emi/tasks/") and n.endswith(".yaml") for n in names) == 74
    target = root / "site"
    inst = subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert inst.returncode == 0, inst.stdout[-2000:] + inst.stderr[-2000:]
    return target


def _run(target: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(target), PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, *args], cwd=target.parent, env=env, capture_output=True, text=True, timeout=600
    )


def test_wheel_copy_is_imported_with_its_tasks_and_model(installed: Path) -> None:
    code = (
        "import sys, lmms_emi\n"
        "from lmms_emi.paths import tasks_dir\n"
        "from lmms_eval.models import get_model\n"
        "cls = get_model('emi_replay')\n"
        "print(lmms_emi.__file__); print(tasks_dir()); print(sys.modules[cls.__module__].__file__)\n"
    )
    proc = _run(installed, "-c", code)
    assert proc.returncode == 0, proc.stderr[-2000:]
    module, tasks, model = proc.stdout.strip().splitlines()[-3:]
    for path in (module, tasks, model):
        assert path.startswith(str(installed)), path
    assert Path(tasks) == installed / "lmms_emi" / "tasks"


def test_installed_wheel_lists_the_tasks(installed: Path) -> None:
    proc = _run(installed, "-m", "lmms_emi.cli", "eval", "--tasks", "list", "--no_builtin_tasks")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    listing = proc.stdout + proc.stderr
    where = _run(installed, "-m", "lmms_emi.cli", "tasks-path")  # the folder appended to lmms-eval's index
    assert where.returncode == 0 and where.stdout.strip() == str(installed / "lmms_emi" / "tasks"), where
    names = (
        "lbshift_syn_llava_bench_coco_frost_5_KeyboardAug_3",
        "lbshift_nat_llava_bench_in_the_wild_hard_Hindi",
        "llavabench_shift_synthetic",
        "llavabench_shift_natural_joint",
    )
    for name in names:
        assert name in listing, name
    cli = installed / "bin" / "lmms-emi"
    if (installed / "lmms_emi" / "cli" / "__init__.py").is_file() and cli.is_file():
        proc = _run(installed, str(cli), "eval", "--tasks", "list", "--no_builtin_tasks")
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert "lbshift_syn_llava_bench_coco_frost_5" in proc.stdout + proc.stderr
