"""The run's config, ``DIR/config.json``: written once, checked on every resume, so a
workdir never mixes checkpoints of different model configs."""

from __future__ import annotations

import json
import os

import jax
import ml_collections

from resgen_jax import config_base
from resgen_jax.train import trainer
from resgen_jax.utils import files

CONFIG_FILE = "config.json"


def _flatten(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = list(value) if isinstance(value, tuple) else value
  return out


def config_differences(saved: dict, current: dict) -> list:
  """Dotted field names whose values differ (present in either) and are not resumable.

  A field the saved config lacks (added to the schema after that run started) matches when
  the current value is the schema's default: the old run behaved as the default does. A
  config saved before the schema was split by modality gets its modality from its data
  source, and the other modality's fields it holds are not compared.
  """
  modality = config_base.modality_of(saved)
  saved = config_base.without_fields(dict(saved, modality=modality),
                                     config_base.foreign_fields(current.get("modality", "")))
  a, b = _flatten(saved), _flatten(json.loads(json.dumps(current)))
  defaults = _flatten(json.loads(config_base.base_config(modality).to_json()))
  resumable = lambda key: any(key == f or key.startswith(f + ".")
                              for f in config_base.RESUMABLE_FIELDS)
  added_at_default = lambda key: key not in a and key in defaults and b.get(key) == defaults[key]
  return sorted(k for k in set(a) | set(b)
                if a.get(k) != b.get(k) and not resumable(k) and not added_at_default(k))


# Config sections that only shape one stage's checkpoints: compared with the saved config
# only once that stage has a checkpoint (a run refused on a bad generator value after the
# tokenizer trained can be rerun with the value corrected).
STAGE_SECTIONS = ("tokenizer", "generator")


def checkpoint_steps(workdir: str) -> tuple:
  """The latest checkpoint step of every trained stage (None where there is none)."""
  return tuple(trainer.latest_checkpoint_step(os.path.join(workdir, s)) for s in STAGE_SECTIONS)


def write_run_config(config: ml_collections.ConfigDict, workdir: str) -> str:
  """Writes ``DIR/config.json``; refuses a workdir whose run used a different model config
  (the fields of a stage without checkpoints yet may change). Returns the file's previous
  text ("" when there was none), for :func:`resgen_jax.stages.run` to put back if the run
  then fails having trained nothing."""
  path = os.path.join(workdir, CONFIG_FILE)
  current = config.to_dict()
  resolved = json.loads(config.to_json())
  previous = ""
  if os.path.exists(path):
    with open(path) as f:
      previous = f.read()
    saved = json.loads(previous)
    untrained = [s for s, step in zip(STAGE_SECTIONS, checkpoint_steps(workdir))
                 if step is None]
    diff = [k for k in config_differences(saved, current)
            if k.split(".")[0] not in untrained]
    if diff:
      raise ValueError(
          f"{workdir} holds a run with a different config (fields: {', '.join(diff)}); "
          f"resuming would mix incompatible checkpoints. Use a new --workdir, or the "
          f"config in {path}.")
    if saved == resolved:  # unchanged: not rewritten (a read-only workdir can be sampled)
      return previous
  if jax.process_index() == 0:
    files.save_json(path, resolved)
  return previous


def restore_run_config(workdir: str, previous: str) -> None:
  """Puts ``config.json`` back as it was before a failed run (removes it if it was new)."""
  if jax.process_index() != 0:
    return
  path = os.path.join(workdir, CONFIG_FILE)
  if not previous:
    if os.path.exists(path):
      os.remove(path)
    return
  with files.atomic_write(path) as tmp, open(tmp, "w") as f:
    f.write(previous)
