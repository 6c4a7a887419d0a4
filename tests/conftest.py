"""Shared set-up: 8 CPU devices, a compilation cache, and the digits config's ``runlocal``
shrink, which trains in seconds on a CPU."""

import os
import tempfile

# Every test runs on 8 host CPU devices, so the default mesh is 8-way data parallel and
# test_sharding.py can build FSDP and tensor-parallel meshes. XLA reads the flag when jax
# starts, so it is set before jax is imported; a run that sets its own device count keeps it.
DEVICE_FLAG = "--xla_force_host_platform_device_count"
if DEVICE_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {DEVICE_FLAG}=8".strip()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest

from resgen_jax import config_base

# Tests build the same jitted steps in several runs (fresh, preempted, resumed); a
# persistent compilation cache for the session compiles each of them once.
jax.config.update("jax_compilation_cache_dir",
                  os.environ.get("RESGEN_TEST_JAX_CACHE",
                                 os.path.join(tempfile.gettempdir(), "resgen_jax_test_cache")))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


# Child processes (the command line, several hosts, notebook kernels) run tiny configs that
# spend most of their time compiling, without this session's compilation cache: XLA's quick
# compile mode cuts test_multiprocess.py from 131 s to 80 s. Their checks compare child
# processes with each other or test files and text, never bits with in-process results.
CHILD_JAX_ENV = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}


def set_fields(config, overrides: dict):
  """Sets every dotted field of ``overrides`` (``{"tokenizer.train.num_steps": 4}``) on
  ``config``, as ``--config.<field>=<value>`` would. -> ``config``."""
  for dotted, value in overrides.items():
    *parents, name = dotted.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[name] = value
  return config


def flatten(tree, prefix=""):
  """Nested dicts -> ``{"dotted.name": leaf}`` (a config's ``to_dict()`` field by field)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


@pytest.fixture(scope="module")
def quick_compile():
  """XLA's quick compile mode for one module (``pytestmark = pytest.mark.usefixtures(
  "quick_compile")``) whose tests compile many tiny models and run them briefly; the
  modules that use it compare within tolerances or the same compiled code with itself
  (cold cache, 2 cores: test_sharding 102 -> 58 s of its slowest three, test_generator's
  slowest four 67 -> 44 s). Modules that run heavy compute (Inception, the shared trained
  run) stay optimized."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_RUNLOCAL = os.path.join(REPO, "configs", "digits.py") + ":" + config_base.RUNLOCAL


def trained_config():
  """``configs/digits.py:runlocal``: the default's every stage with ~10k-parameter models,
  trained long enough (150 tokenizer steps) for its depth prefixes to separate."""
  return config_base.load_config_file(DIGITS_RUNLOCAL)


TRAINED_STEPS = trained_config().tokenizer.train.num_steps


def tiny_config(num_steps: int = 4):
  """:func:`trained_config`'s models for ``num_steps`` steps of each stage (checkpoints
  every 2, no quantizer dropout, no proxy), the tokenizer and encode stages on."""
  config = trained_config()
  config.stages = ("tokenizer", "encode")
  tok = config.tokenizer
  tok.quantizer.dropout_prob = 0.0
  tok.train.update(num_steps=num_steps, learning_rate=1e-3, log_every=2, checkpoint_every=2)
  config.generator.train.update(num_steps=num_steps, log_every=2)
  config.evaluation.update(proxy_every=0, proxy_samples=500)
  return config


@pytest.fixture
def config():
  return tiny_config()


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
  """A workdir where :func:`trained_config` ran every stage, trained once per session.
  Tests that change files in it work on a copy."""
  from resgen_jax import stages  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path_factory.mktemp("run"))
  stages.run(trained_config(), workdir)
  return workdir


NOTEBOOKS = os.path.join(REPO, "notebooks")
NOTEBOOK_TIMEOUT_S = 600  # per cell


def execute_notebook(name: str, parameters: dict):
  """Runs ``notebooks/<name>`` top to bottom in a fresh kernel, as papermill does: a cell
  setting ``parameters`` goes right after the cell tagged ``parameters``. The kernel sees
  the tests' devices, compilation cache and this checkout. Any cell error raises
  (``nbclient.exceptions.CellExecutionError``). -> the executed notebook."""
  import nbclient  # pylint: disable=g-import-not-at-top
  import nbformat  # pylint: disable=g-import-not-at-top
  notebook = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
  tagged = [i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", [])]
  assert len(tagged) == 1, f"{name} must have exactly one cell tagged 'parameters'"
  injected = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
  injected.metadata["tags"] = ["injected-parameters"]
  notebook.cells.insert(tagged[0] + 1, injected)
  root = os.path.dirname(NOTEBOOKS)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      p for p in (root, os.environ.get("PYTHONPATH")) if p),
             JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", **CHILD_JAX_ENV)
  client = nbclient.NotebookClient(notebook, timeout=NOTEBOOK_TIMEOUT_S, kernel_name="python3",
                                   resources={"metadata": {"path": NOTEBOOKS}})
  old = dict(os.environ)
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    client.execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  return notebook


def images_shown(notebook) -> int:
  """How many images (PNG or GIF outputs) an executed notebook displayed."""
  return sum("image/png" in out.get("data", {}) or "image/gif" in out.get("data", {})
             for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
