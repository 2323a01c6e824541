"""The package's layer order, read off every `mmar_jax` import (lazy ones inside functions too).

A module may import its own layer or a lower one, never a higher one. The order is written once,
here, and in the README's layout section:

  errors, config, dtypes, files, trees     what every package shares
  parallel                                  mesh, logical-axis rules, distributed start
  defaults                                  the base config
  diffusion                                 the pure library: schedule, parameterisations, samplers
  models                                    backbone, ViT, head, VAE, the MMAR model
  convert                                   HF / MAR weight mappings and safetensors files
  data                                      sources, tokenizers, the batch pipeline
  pytorch                                   the same MMAR in PyTorch (torch only here)
  train                                     state, step, optimizer, checkpoints, loop
  run                                       a training run opened from its workdir
  sample                                    text-to-image and image-to-text decoding
  commands, repro, launch                   what a user runs (CLI bodies, benchmarks, diagnostics)
  cli, __main__                             the entry point
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "mmar_jax"

LAYERS = (
    ("errors", "config", "dtypes", "files", "trees"),
    ("parallel",),
    ("defaults",),
    ("diffusion",),
    ("models",),
    ("convert",),
    ("data",),
    ("pytorch",),
    ("train",),
    ("run",),
    ("sample",),
    ("commands", "repro", "launch"),
    ("cli", "__main__"),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}
# Within the application layer the benchmarks stay apart from the checks they are measured by.
FORBIDDEN = {("commands", "repro")}


def _unit(module: str) -> str | None:
  """'mmar_jax.models.qwen2' -> 'models'; None for the bare package."""
  parts = module.split(".")
  return parts[1] if len(parts) > 1 and parts[0] == "mmar_jax" else None


def _module_name(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> str:
  rel = path.relative_to(package.parent).with_suffix("")
  parts = list(rel.parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def imports(path: pathlib.Path, package: pathlib.Path = PACKAGE) -> list[tuple[int, str]]:
  """(line, imported mmar_jax module) for every import statement in the file, at any depth."""
  tree = ast.parse(path.read_text(), str(path))
  here = _module_name(path, package).split(".")
  is_pkg = path.name == "__init__.py"
  out = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      out += [(node.lineno, a.name) for a in node.names if a.name.startswith("mmar_jax")]
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: resolve against this module's package
        base = here if is_pkg else here[:-1]
        base = base[:len(base) - (node.level - 1)]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      if module.startswith("mmar_jax"):
        if module == "mmar_jax":  # `from mmar_jax import config`: each name is a module
          out += [(node.lineno, f"mmar_jax.{a.name}") for a in node.names]
        else:
          out.append((node.lineno, module))
  return out


def violations(package: pathlib.Path = PACKAGE) -> list[str]:
  found = []
  for path in sorted(package.rglob("*.py")):
    src = _unit(_module_name(path, package))
    if src is None:
      continue
    if src not in RANK:
      found.append(f"{path.relative_to(package.parent)}: '{src}' has no place in LAYERS")
      continue
    for line, module in imports(path, package):
      dst = _unit(module)
      if dst is None or dst == src:
        continue
      if dst not in RANK:
        found.append(f"{path.relative_to(package.parent)}:{line} imports {module}, which has no "
                     "place in LAYERS")
      elif RANK[dst] > RANK[src] or (src, dst) in FORBIDDEN:
        found.append(f"{path.relative_to(package.parent)}:{line} ({src}) imports {module} "
                     f"({dst}, a higher layer)" if RANK[dst] > RANK[src] else
                     f"{path.relative_to(package.parent)}:{line} ({src}) imports {module} "
                     f"({dst}: kept apart)")
  return found


def test_every_import_keeps_the_layer_order():
  found = violations()
  assert not found, "imports against the layer order:\n" + "\n".join(found)


def test_nothing_outside_train_imports_the_loop():
  users = [f"{p.relative_to(PACKAGE.parent)}:{line}" for p in PACKAGE.rglob("*.py")
           if _unit(_module_name(p)) not in ("train", "commands")
           for line, m in imports(p) if m == "mmar_jax.train.loop"]
  assert not users, f"train/loop.py imported from outside train/: {users}"


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
  """The reader finds an upward import hidden in a function, and a relative one."""
  pkg = tmp_path / "mmar_jax"
  (pkg / "models").mkdir(parents=True)
  (pkg / "train").mkdir()
  for d in (pkg, pkg / "models", pkg / "train"):
    (d / "__init__.py").write_text("")
  (pkg / "models" / "a.py").write_text("def f():\n  from mmar_jax.train import step\n")
  (pkg / "models" / "b.py").write_text("from ..train import loop\n")
  (pkg / "train" / "c.py").write_text("from mmar_jax.models import a\nimport mmar_jax.models.b\n")
  found = violations(pkg)
  assert len(found) == 2, found
  assert any("models/a.py:2" in f and "mmar_jax.train" in f for f in found)
  assert any("models/b.py:1" in f and "mmar_jax.train" in f for f in found)


@pytest.mark.parametrize("module", ["mmar_jax.config", "mmar_jax.models.mmar", "mmar_jax.cli"])
def test_known_modules_have_a_layer(module):
  assert _unit(module) in RANK
