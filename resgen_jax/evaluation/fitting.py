"""What the project's small scorers share: one way to train, save, load and get-or-train.

The image classifier (:mod:`resgen_jax.evaluation.classifier`) and the speaker and word
classifiers of speech (:mod:`resgen_jax.audio.speech_classifier`) differ only in their
networks, inputs and losses; these pieces are the rest:

* :func:`fit`: AdamW with a cosine-decayed rate, one jitted step over batches drawn by
  :func:`batch_indices` (consecutive slices of shuffled epochs);
* the file format: one msgpack file (flax serialization, no pickle) of a map whose ``meta``
  is a JSON string naming the format and its version (:func:`save_versioned`,
  :func:`read_versioned`), beside the arrays and the parameter tree;
* :func:`check_param_shapes`: a file's parameters against those the network builds;
* :func:`get_or_train`: reuse the file at a path when it describes what the run needs,
  else train, save and return.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterable, Mapping, Tuple

import jax
import numpy as np
import optax
from flax import serialization
from flax import traverse_util

from resgen_jax.utils import files


def batch_indices(rng: np.random.Generator, num_examples: int, batch_size: int,
                  num_steps: int):
  """Yields ``num_steps`` index arrays ``[batch_size]``: consecutive slices of shuffled epochs."""
  order = np.zeros(0, np.int64)
  for _ in range(num_steps):
    while order.size < batch_size:
      order = np.concatenate([order, rng.permutation(num_examples)])
    yield order[:batch_size]
    order = order[batch_size:]


def fit(loss_fn: Callable, params, batches: Iterable[Tuple], num_steps: int,
        learning_rate: float, weight_decay: float):
  """Minimises ``loss_fn(params, *batch)`` over ``batches`` (tuples of arrays, one per
  step) with AdamW at a rate cosine-decayed to 0 over ``num_steps``. -> the parameters,
  on the host."""
  optimizer = optax.adamw(optax.cosine_decay_schedule(learning_rate, num_steps),
                          weight_decay=weight_decay)

  @jax.jit
  def step(params, opt_state, *batch):
    grads = jax.grad(loss_fn)(params, *batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  opt_state = optimizer.init(params)
  for batch in batches:
    params, opt_state = step(params, opt_state, *batch)
  return jax.device_get(params)


def save_versioned(path: str, meta: Mapping[str, Any], **arrays) -> None:
  """Writes ``meta`` (JSON, with its ``format`` and ``version``) and the named arrays or
  parameter trees atomically to ``path`` as one msgpack map."""
  files.save_bytes(path, serialization.to_bytes(
      {"meta": json.dumps(dict(meta), sort_keys=True), **jax.device_get(arrays)}))


def read_versioned(path: str, file_format: str, version, what: str) -> Tuple[dict, dict]:
  """``(contents, meta)`` of a file of :func:`save_versioned` whose ``meta`` names
  ``file_format`` and ``version`` (an int, or a tuple of the readable ones).

  FileNotFoundError naming the ``what`` for a missing file; other failures (undecodable,
  missing keys, another format) raise ValueError, TypeError or KeyError for the caller to
  name the file.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no {what} file at {path}")
  with open(path, "rb") as f:
    contents = serialization.msgpack_restore(f.read())
  meta = json.loads(contents["meta"])
  versions = version if isinstance(version, tuple) else (version,)
  if meta["format"] != file_format or meta["version"] not in versions:
    raise ValueError(f"format {meta['format']!r} version {meta['version']}, expected "
                     f"{file_format!r} version {' or '.join(map(str, versions))}")
  return contents, meta


def param_shapes(params) -> Dict[str, Tuple[int, ...]]:
  """``{"conv_0/kernel": shape}`` of every leaf of a parameter tree."""
  return {"/".join(k): tuple(np.shape(v))
          for k, v in traverse_util.flatten_dict(params).items()}


def check_param_shapes(params, init: Callable[[], Any], what: str) -> None:
  """Raises a ValueError unless ``params`` is a tree with the leaf shapes of ``init()``'s
  (a network's ``init`` under :func:`jax.eval_shape`); ``what`` names the network."""
  if not isinstance(params, dict):
    raise ValueError(f"parameters are a {type(params).__name__}, not a tree of arrays")
  expected = param_shapes(jax.eval_shape(init))
  found = param_shapes(params)
  if found != expected:
    raise ValueError(f"parameter shapes {found} do not fit {what}, which has {expected}")


def _settings(settings: Mapping[str, Any]) -> str:
  return ", ".join(f"{k}={v!r}" for k, v in settings.items())


def get_or_train(path: str, what: str, wanted: Mapping[str, Any],
                 load: Callable[[str], Any], describe: Callable[[Any], Mapping[str, Any]],
                 train: Callable[[], Any], save: Callable[[str, Any], None]):
  """The scorer saved at ``path``, or a new one trained and saved there (atomically).

  Args:
    path: the file.
    what: what the errors call the scorer.
    wanted: the settings the run needs (e.g. ``num_classes``); a saved scorer whose
      ``describe`` differs on any of them is refused, naming ``path`` and both settings.
    load: ``path -> scorer``; errors name the path.
    describe: ``scorer -> {setting: value}`` over the keys of ``wanted``.
    train: ``() -> scorer``, called only when no file exists yet.
    save: ``(path, scorer)``, writing the file atomically.
  """
  if os.path.exists(path):
    scorer = load(path)
    found = {k: describe(scorer)[k] for k in wanted}
    if found != dict(wanted):
      raise ValueError(f"{path} holds a {what} with {_settings(found)}, but this run needs "
                       f"{_settings(wanted)}; remove the file to train a new one")
    return scorer
  scorer = train()
  save(path, scorer)
  return scorer
