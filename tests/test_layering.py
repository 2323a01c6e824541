"""The package's layer order, read off the `mmar_jax` imports at the top of each file.

Imports sit at the top, so a file's dependencies are read there: an import inside a function is
allowed only for a heavy optional package (LAZY_OK) and says why on its line (`# lazy: ...`), and
`__main__` imports the CLI after it has given XLA its flags.

A module may import its own layer or a lower one, never a higher one. The order is written once,
here, and in the README's layout section:

  errors, config, dtypes, files, trees,     what every package shares; startup: XLA flags before
  startup                                   JAX starts
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
    ("errors", "config", "dtypes", "files", "trees", "startup"),
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


# Packages that take seconds to import and that only some paths need; mmar_jax.pytorch is torch.
LAZY_OK = ("torch", "transformers", "tensorflow_datasets", "matplotlib", "tensorboardX")
LAZY_OK_OWN = ("mmar_jax.pytorch",)


def _top_level(tree: ast.Module) -> list[ast.stmt]:
  """The module's own statements, including those under a top-level `if` / `try`."""
  out = []
  for node in tree.body:
    out.append(node)
    if isinstance(node, (ast.If, ast.Try)):
      inner = ast.Module(body=node.body + node.orelse + sum((h.body for h in getattr(
          node, "handlers", [])), []) + getattr(node, "finalbody", []), type_ignores=[])
      out += _top_level(inner)
  return out


def lazy_imports(path: pathlib.Path) -> list[tuple[int, str]]:
  """(line, source) of the imports inside functions or classes that break the rule above."""
  text = path.read_text()
  tree = ast.parse(text, str(path))
  lines = text.splitlines()
  top = {id(n) for n in _top_level(tree)}
  bad = []
  for node in ast.walk(tree):
    if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
      continue
    names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
    heavy = all(n.split(".")[0] in LAZY_OK or n.startswith(LAZY_OK_OWN) for n in names) and not (
        getattr(node, "level", 0))
    src = lines[node.lineno - 1]
    if not ((heavy and "# lazy:" in src) or (path.name == "__main__.py" and names == ["mmar_jax"])):
      bad.append((node.lineno, src.strip()))
  return bad


def imports(path: pathlib.Path, package: pathlib.Path = PACKAGE, *,
            top_only: bool = False) -> list[tuple[int, str]]:
  """(line, imported mmar_jax module) for every import statement of the file (at its top only:
  the edges that run when it is imported)."""
  tree = ast.parse(path.read_text(), str(path))
  here = _module_name(path, package).split(".")
  is_pkg = path.name == "__init__.py"
  out = []
  for node in (_top_level(tree) if top_only else ast.walk(tree)):
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


def test_imports_sit_at_the_top():
  found = [f"{p.relative_to(PACKAGE.parent)}:{line}: {src}" for p in sorted(PACKAGE.rglob("*.py"))
           for line, src in lazy_imports(p)]
  assert not found, ("imports inside functions (move them to the top, or for a heavy optional "
                     "package say why with `# lazy: ...`):\n" + "\n".join(found))


def test_no_import_circle():
  """The files' top-level imports form no loop (a loop makes the import order matter)."""
  modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
  edges = {m: {d for _, d in imports(p, top_only=True) if d in modules and d != m}
           for m, p in modules.items()}
  state, path = {}, []

  def visit(m):
    state[m] = "open"
    path.append(m)
    for d in sorted(edges[m]):
      if state.get(d) == "open":
        raise AssertionError("import circle: " + " -> ".join(path[path.index(d):] + [d]))
      if d not in state:
        visit(d)
    path.pop()
    state[m] = "done"

  for m in sorted(modules):
    if m not in state:
      visit(m)


def test_nothing_outside_train_imports_the_loop():
  users = [f"{p.relative_to(PACKAGE.parent)}:{line}" for p in PACKAGE.rglob("*.py")
           if _unit(_module_name(p)) not in ("train", "commands")
           for line, m in imports(p) if m == "mmar_jax.train.loop"]
  assert not users, f"train/loop.py imported from outside train/: {users}"


def test_the_check_sees_lazy_and_relative_imports(tmp_path):
  """The reader finds an upward import hidden in a function, at the top, and a relative one; the
  lazy-import check reports the one in a function as well."""
  pkg = tmp_path / "mmar_jax"
  (pkg / "models").mkdir(parents=True)
  (pkg / "train").mkdir()
  for d in (pkg, pkg / "models", pkg / "train"):
    (d / "__init__.py").write_text("")
  (pkg / "models" / "a.py").write_text("def f():\n  from mmar_jax.train import step\n")
  (pkg / "models" / "b.py").write_text("from ..train import loop\n")
  (pkg / "train" / "c.py").write_text("from mmar_jax.models import a\nimport mmar_jax.models.b\n")
  (pkg / "models" / "d.py").write_text("from mmar_jax.train import step\n")
  (pkg / "models" / "e.py").write_text("def f():\n  import torch  # lazy: heavy\n"
                                       "def g():\n  import torch\n")
  found = violations(pkg)
  assert len(found) == 3, found
  assert any("models/a.py:2" in f and "mmar_jax.train" in f for f in found)
  assert any("models/d.py:1" in f and "mmar_jax.train" in f for f in found)
  assert any("models/b.py:1" in f and "mmar_jax.train" in f for f in found)
  assert lazy_imports(pkg / "models" / "a.py") == [(2, "from mmar_jax.train import step")]
  assert lazy_imports(pkg / "models" / "e.py") == [(4, "import torch")]


@pytest.mark.parametrize("module", ["mmar_jax.config", "mmar_jax.models.mmar", "mmar_jax.cli"])
def test_known_modules_have_a_layer(module):
  assert _unit(module) in RANK
