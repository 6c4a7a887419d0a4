"""The package's modules import one way: no cycles, and each layer imports only the layers
below it (and its own), so a reader can learn the method bottom-up and a fork can take the
codec or the generator without the stages. Imports inside functions count too."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "resgen_jax"

# Layer of each module, by name or by package prefix ending in "." (bottom first).
LAYERS = (
    # 0: shared helpers and the pieces every model and stage is built from
    ("utils.", "layers", "train.task", "train.preemption", "train.mesh"),
    # 1: data sources and batching
    ("data", "data.sources", "data.pipeline"),
    # 2: the method and its baselines, image and speech codecs, text
    ("codec.", "generator.", "baselines.", "audio.espeak", "audio.text", "audio.frontend",
     "audio.corpus", "audio.codec"),
    # 3: training
    ("train.trainer", "train.optim", "train.writers", "train.distributed", "train.profiling"),
    # 4: evaluation (and the fake ImageNet, which writes the inception's reference files)
    ("evaluation.", "audio.distortion", "audio.speech_classifier", "data.fake_imagenet"),
    # 5: configs and their checks
    ("config_base", "config_checks"),
    # 6: the stages of a run
    ("stages.", "stages", "audio.speech_tokens", "audio.tts", "audio.synthesis",
     "audio.evaluation", "audio.stages"),
    # 7: entry points: CLI, Python API, sweeps
    ("main", "api", "audio.api", "runs", "sweep"),
)


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
  path = PACKAGE.joinpath(*name.split("."))
  return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imports_of(path: pathlib.Path) -> set:
  """The package modules ``path`` imports, anywhere in it (``from resgen_jax.x import y``
  counts ``x.y`` when y is a module, else ``x``)."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and (
        node.module == "resgen_jax" or node.module.startswith("resgen_jax.")):
      base = node.module[len("resgen_jax."):] if "." in node.module else ""
      for alias in node.names:
        full = f"{base}.{alias.name}" if base else alias.name
        found.add(full if is_module(full) else base)
    elif isinstance(node, ast.Import):
      found.update(a.name[len("resgen_jax."):] for a in node.names
                   if a.name.startswith("resgen_jax."))
  found.discard("")
  return found


def layer_of(module: str) -> int:
  for index, names in enumerate(LAYERS):
    for name in names:
      if module == name or (name.endswith(".") and module.startswith(name)):
        return index
  raise KeyError(module)


@pytest.fixture(scope="module")
def graph():
  """Module -> the package modules it imports; a package's ``__init__`` is a node only
  when it imports something (``data`` does; the others are empty)."""
  imports = {p: imports_of(p) for p in PACKAGE.rglob("*.py")}
  return {module_name(p): targets for p, targets in imports.items()
          if targets or p.name != "__init__.py"}


def test_the_graph_is_read(graph):
  # A check of the reader itself: known edges, function-level ones included.
  assert "layers" in graph["generator.model"]
  assert "audio.api" in graph["api"] and "runs" in graph["audio.api"]
  assert "audio.stages" in graph["stages"]  # imported inside stages.run
  assert "stages.sampling" in graph["stages.generator"]


def test_every_module_has_a_layer(graph):
  unplaced = []
  for module in graph:
    try:
      layer_of(module)
    except KeyError:
      unplaced.append(module)
  assert not unplaced, f"give these modules a layer in LAYERS: {unplaced}"


def test_modules_import_only_lower_or_equal_layers(graph):
  upward = sorted(f"{m} (layer {layer_of(m)}) imports {t} (layer {layer_of(t)})"
                  for m, targets in graph.items() for t in targets if layer_of(t) > layer_of(m))
  assert not upward, "\n".join(upward)


def test_there_are_no_import_cycles(graph):
  done, on_path, cycles = set(), [], []

  def visit(module):
    on_path.append(module)
    for target in sorted(graph.get(module, ())):
      if target in on_path:
        cycles.append(" -> ".join(on_path[on_path.index(target):] + [target]))
      elif target not in done:
        visit(target)
    on_path.pop()
    done.add(module)

  for module in sorted(graph):
    if module not in done:
      visit(module)
  assert not cycles, "\n".join(cycles)
