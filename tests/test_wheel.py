"""The package as a user installs it: a wheel built from this tree, installed outside it, imports
every module and finds its resources (the shipped configs, repro's golden file) from another
directory."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

from conftest import ROOT, subprocess_env

PACKAGE = pathlib.Path(ROOT) / "mmar_jax"
CONFIGS = sorted(p.name for p in (pathlib.Path(ROOT) / "configs").glob("*.py"))

CHECK = """
import importlib, os, pkgutil, sys
import mmar_jax
target = sys.argv[1]
assert mmar_jax.__file__.startswith(target), mmar_jax.__file__  # the wheel, not the checkout
names = [m.name for m in pkgutil.walk_packages(mmar_jax.__path__, "mmar_jax.")
         if not m.name.endswith("__main__")]
for name in names:
  importlib.import_module(name)
from mmar_jax import config
for name in sys.argv[2].split(","):  # by the README's path and by bare name
  path = config.config_path("configs/" + name)
  assert path.startswith(target), path
  config.load_file(name[:-3])
from mmar_jax.repro import checks
assert checks.GOLDEN.startswith(target) and os.path.isfile(checks.GOLDEN)
print(" ".join(["mmar_jax"] + names))
"""


def _source_modules() -> set[str]:
  out = set()
  for p in PACKAGE.rglob("*.py"):
    parts = list(p.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts.pop()
    if parts[-1] != "__main__":
      out.add(".".join(parts))
  return out


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
  root = tmp_path_factory.mktemp("wheel")
  # setuptools builds inside the source folder: build from a copy, so the checkout stays clean.
  src = root / "src"
  shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
      ".git", ".venv*", ".jax_cache", "build", "*.egg-info", "__pycache__", "tmp", "workdirs"))
  pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
  build = subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-w", str(root),
                                str(src)], capture_output=True, text=True, cwd=root)
  assert build.returncode == 0, build.stderr[-3000:]
  wheel = next(root.glob("mmar_jax-*.whl"))
  target = root / "site"
  inst = subprocess.run(pip + ["install", "--no-deps", "--target", str(target), str(wheel)],
                        capture_output=True, text=True, cwd=root)
  assert inst.returncode == 0, inst.stderr[-3000:]
  return wheel, target


def test_wheel_holds_every_module_and_resource(installed):
  wheel, _ = installed
  names = set(zipfile.ZipFile(wheel).namelist())
  modules = {n[:-3].replace("/", ".").removesuffix(".__init__") for n in names
             if n.startswith("mmar_jax/") and n.endswith(".py")}
  missing = _source_modules() - modules
  assert not missing, f"modules not in the wheel (pyproject.toml's package list): {sorted(missing)}"
  assert {f"mmar_jax/configs/{c}" for c in CONFIGS} <= names
  assert "mmar_jax/repro/golden.json" in names


def test_installed_wheel_imports_everything_from_another_directory(installed, tmp_path):
  _, target = installed
  env = subprocess_env(PYTHONPATH=str(target))
  got = subprocess.run([sys.executable, "-c", CHECK, str(target), ",".join(CONFIGS)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
  assert got.returncode == 0, got.stderr[-4000:]
  assert set(got.stdout.split()) == _source_modules()
