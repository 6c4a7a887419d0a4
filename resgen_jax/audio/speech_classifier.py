"""Small speech classifiers the project trains on real data, to score generated speech
without an external speaker-verification or ASR model.

:class:`SpeechClassifier` on log-mels (those of :func:`resgen_jax.audio.frontend.log_mel`,
``[F, n_mels]`` per utterance), trained by :func:`train_speech_classifier`:

* ``kind="speaker"``: which of ``num_classes`` speakers is talking (score: accuracy);
* ``kind="words"``: which words of a closed vocabulary the utterance contains (targets from
  :func:`word_targets`; score: mean F1 of the predicted word set).

Training, the file format and get-or-train are those of the image classifier
(:mod:`resgen_jax.evaluation.fitting`). File (:func:`save`): the map's ``meta`` JSON holds
the format name and version, ``kind``, ``num_classes``, ``n_mels``, ``conv_widths`` and
``class_names``; beside it ``mean`` and ``std`` (the standardisation, float32 ``[n_mels]``)
and ``params``, the parameter tree.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, List, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from resgen_jax.evaluation import fitting

KINDS = ("speaker", "words")
CONV_WIDTHS = (64, 64, 64)  # output channels of the 1-D convolutions over time
CONV_STRIDES = (1, 2, 2)  # 62.5 frames/s -> 15.6 feature frames/s before pooling
# Kernel over frames (odd, so that output frame t is centred on input frame stride * t):
# 5 frames at stride 1, 2, 2 give a receptive field of 29 frames, about 0.46 s at 16 ms.
KERNEL_FRAMES = 5
# Floor of a mel bin's standard deviation: a bin constant over the training data (at the
# log floor, say) would otherwise be divided by ~0 and blow up on any other input.
STD_FLOOR = 1e-3
# A words prediction is the set of words with probability above this.
WORD_THRESHOLD = 0.5

# Training defaults, not yet calibrated on real speech: check the held-out score with
# :func:`score` and raise num_steps if it is still climbing.
NUM_STEPS = 1000
BATCH_SIZE = 32
LEARNING_RATE = 3e-3
WEIGHT_DECAY = 1e-4
PREDICT_BATCH_SIZE = 64
# Prediction pads a call's clips to its longest, rounded up to a multiple of this many
# frames (about 1 s), so that calls on similar clips share one compilation.
PREDICT_FRAME_QUANTUM = 64

# The format name in the meta of every file save writes: the module's name before it was
# split out of audio/metrics.py, kept so that saved classifiers still load.
FILE_FORMAT = "resgen_jax.audio.metrics.speech_classifier"
FILE_VERSION = 1


def word_targets(texts: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
  """Which vocabulary words each text contains -> bool ``[N, V]``.

  Texts are split on whitespace and tokens matched exactly (case and punctuation count:
  normalise the texts and the vocabulary alike first). Raises a ValueError for an empty
  vocabulary, repeated or blank words, or a text that is not a string.
  """
  vocabulary = list(vocabulary)
  if not vocabulary:
    raise ValueError("word_targets: the vocabulary is empty")
  for word in vocabulary:
    if not isinstance(word, str) or len(word.split()) != 1 or word.split()[0] != word:
      raise ValueError(f"vocabulary entries must be single words without whitespace, got "
                       f"{word!r}")
  if len(set(vocabulary)) != len(vocabulary):
    repeated = sorted({w for w in vocabulary if vocabulary.count(w) > 1})
    raise ValueError(f"vocabulary repeats words {repeated}")
  index = {word: k for k, word in enumerate(vocabulary)}
  texts = list(texts)
  targets = np.zeros((len(texts), len(vocabulary)), bool)
  for n, text in enumerate(texts):
    if not isinstance(text, str):
      raise ValueError(f"texts[{n}] is a {type(text).__name__}, not a string")
    for token in text.split():
      if token in index:
        targets[n, index[token]] = True
  return targets


class SpeechClassifier(nn.Module):
  """Log-mels ``[B, F, n_mels]`` with a mask ``valid [B, F]`` -> (logits ``[B, K]``, features
  ``[B, CONV_WIDTHS[-1]]``).

  Frames are standardised per mel bin, ``(x - mean) / std``, and zeroed where not valid;
  ``len(CONV_WIDTHS)`` ReLU convolutions over time (kernel ``KERNEL_FRAMES``, fixed
  zero padding ``KERNEL_FRAMES // 2`` on each side, strides ``CONV_STRIDES``) follow, each
  output frame valid when the input frame it is centred on is, and invalid frames zeroed
  again; the features are the mean over valid frames, and a linear head gives the logits.
  A clip's outputs thus do not depend on how many padding frames follow it, nor on their
  values.

  Attributes:
    num_classes: K, speakers or vocabulary words.
    mean: per-bin mean ``[n_mels]`` of the training log-mels.
    std: per-bin standard deviation ``[n_mels]`` (> 0).
  """
  num_classes: int
  mean: Any
  std: Any

  @nn.compact
  def __call__(self, log_mels, valid):
    x = (jnp.asarray(log_mels, jnp.float32) - self.mean) / self.std
    valid = jnp.asarray(valid, bool)
    x = jnp.where(valid[..., None], x, 0.0)
    pad = KERNEL_FRAMES // 2
    for i, (width, stride) in enumerate(zip(CONV_WIDTHS, CONV_STRIDES)):
      x = nn.Conv(width, (KERNEL_FRAMES,), strides=(stride,), padding=((pad, pad),),
                  name=f"conv{i}")(x)
      valid = valid[:, ::stride]
      x = jnp.where(valid[..., None], nn.relu(x), 0.0)
    count = jnp.sum(valid, axis=1, keepdims=True).astype(jnp.float32)
    features = jnp.sum(x, axis=1) / jnp.maximum(count, 1.0)
    return nn.Dense(self.num_classes, name="logits")(features), features


@dataclasses.dataclass(frozen=True, eq=False)
class SpeechClassifierParams:
  """A trained :class:`SpeechClassifier`: what :func:`predict`, :func:`score` and :func:`save`
  take.

  Attributes:
    kind: ``"speaker"`` or ``"words"``.
    num_classes: K.
    mean: float32 ``[n_mels]``, the training log-mels' per-bin mean.
    std: float32 ``[n_mels]``, their per-bin standard deviation, floored at ``STD_FLOOR``.
    params: the Flax parameter tree (the ``params`` collection).
    class_names: optional names of the K classes (speaker ids, or the vocabulary).
  """
  kind: str
  num_classes: int
  mean: np.ndarray
  std: np.ndarray
  params: Any
  class_names: Optional[Tuple[str, ...]] = None

  @property
  def n_mels(self) -> int:
    return int(self.mean.shape[0])


def _check_kind(kind: str, num_classes: int) -> None:
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  if (not isinstance(num_classes, (int, np.integer)) or isinstance(num_classes, bool)
      or num_classes < 1):
    raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")


def check_clips(log_mels, name: str = "log_mels",
                n_mels: Optional[int] = None) -> List[np.ndarray]:
  """-> utterances' log-mels as a list of float32 ``[F_i >= 1, n_mels]``, or a ValueError.

  Args:
    log_mels: a non-empty sequence of ``[F_i, n_mels]`` arrays (a ``[N, F, n_mels]`` array
      is N clips of F frames).
    name: what the errors call them.
    n_mels: the mel bins they must have; those of the first clip when None.
  """
  clips = [np.asarray(clip, np.float32) for clip in log_mels]
  if not clips:
    raise ValueError(f"{name} holds no clips")
  if n_mels is None:
    if clips[0].ndim != 2 or clips[0].shape[1] < 1:
      raise ValueError(f"{name}[0] must be log-mels [F >= 1, n_mels >= 1], got shape "
                       f"{clips[0].shape}")
    n_mels = clips[0].shape[1]
  for n, clip in enumerate(clips):
    if clip.ndim != 2 or clip.shape[0] < 1 or clip.shape[1] != n_mels:
      raise ValueError(f"{name}[{n}] must be log-mels [F >= 1, n_mels = {n_mels}], got "
                       f"shape {clip.shape}")
    if not np.all(np.isfinite(clip)):
      raise ValueError(f"{name}[{n}] holds non-finite values")
  return clips


def check_targets(targets, kind: str, num_classes: int, count: int,
                  name: str = "targets") -> np.ndarray:
  """-> ``"speaker"`` labels as int32 ``[count]`` in [0, K), or ``"words"`` multi-hot
  targets as float32 ``[count, K]`` of 0s and 1s; a ValueError naming them otherwise."""
  _check_kind(kind, num_classes)
  targets = np.asarray(targets)
  if kind == "speaker":
    if targets.shape != (count,) or not np.issubdtype(targets.dtype, np.integer):
      raise ValueError(f"{name} of a speaker classifier must be integer labels [{count}], "
                       f"got {targets.dtype} {targets.shape}")
    if count and (targets.min() < 0 or targets.max() >= num_classes):
      raise ValueError(f"{name} must lie in [0, {num_classes}), got range "
                       f"[{targets.min()}, {targets.max()}]")
    return targets.astype(np.int32)
  if targets.shape != (count, num_classes) or not (
      targets.dtype == bool or np.issubdtype(targets.dtype, np.number)):
    raise ValueError(f"{name} of a words classifier must be multi-hot [{count}, "
                     f"{num_classes}], got {targets.dtype} {targets.shape}")
  if not np.all((targets == 0) | (targets == 1)):
    raise ValueError(f"{name} of a words classifier must hold only 0 and 1 (or booleans)")
  return targets.astype(np.float32)


def standardisation(clips: Sequence[np.ndarray]) -> Tuple[np.ndarray, np.ndarray]:
  """Per-bin mean and standard deviation (floored at ``STD_FLOOR``) over every frame of
  ``clips`` ``[F_i, n_mels]`` -> float32 (``[n_mels]``, ``[n_mels]``)."""
  frames = np.concatenate([np.asarray(clip, np.float64) for clip in clips])
  return (frames.mean(axis=0).astype(np.float32),
          np.maximum(frames.std(axis=0), STD_FLOOR).astype(np.float32))


def pad_clips(clips: Sequence[np.ndarray], frames: int) -> Tuple[np.ndarray, np.ndarray]:
  """Clips ``[F_i <= frames, n_mels]`` -> (zero-padded float32 ``[B, frames, n_mels]``,
  ``valid`` bool ``[B, frames]``)."""
  n_mels = clips[0].shape[1]
  batch = np.zeros((len(clips), frames, n_mels), np.float32)
  valid = np.zeros((len(clips), frames), bool)
  for n, clip in enumerate(clips):
    if clip.shape[0] > frames:
      raise ValueError(f"clip {n} has {clip.shape[0]} frames, more than the {frames} padded to")
    batch[n, :clip.shape[0]] = clip
    valid[n, :clip.shape[0]] = True
  return batch, valid


def _crop(rng: np.random.Generator, clip: np.ndarray, frames: int) -> np.ndarray:
  """A random window of ``frames`` frames of a longer clip; shorter clips are returned whole."""
  extra = clip.shape[0] - frames
  if extra <= 0:
    return clip
  start = int(rng.integers(0, extra + 1))
  return clip[start:start + frames]


def _loss(kind: str, logits, targets):
  if kind == "speaker":
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return optax.sigmoid_binary_cross_entropy(logits, targets).mean()


def train_speech_classifier(log_mels: Sequence[np.ndarray], targets, kind: str,
                            num_classes: int, num_steps: int = NUM_STEPS,
                            batch_size: int = BATCH_SIZE,
                            learning_rate: float = LEARNING_RATE,
                            weight_decay: float = WEIGHT_DECAY,
                            max_frames: Optional[int] = None, seed: int = 0,
                            class_names: Optional[Sequence[str]] = None
                            ) -> SpeechClassifierParams:
  """Trains a :class:`SpeechClassifier` with AdamW (cosine-decayed rate): cross entropy over
  speakers, or per-word sigmoid cross entropy.

  Every batch is padded to ``min(max_frames, longest clip)`` frames (one compilation of the
  step). A longer speaker clip is cut to a random window of that length each time it is
  drawn; a words clip is never cut (that could drop its words): a ``max_frames`` below the
  longest words clip is an error.

  Args:
    log_mels: the training utterances' log-mels, ``[F_i, n_mels]`` each.
    targets: ``"speaker"``: int labels ``[N]`` in [0, num_classes); ``"words"``: multi-hot
      ``[N, num_classes]`` (bool or 0/1), e.g. from :func:`word_targets`.
    kind: ``"speaker"`` or ``"words"``.
    num_classes: K.
    num_steps, batch_size, learning_rate, weight_decay: the optimisation.
    max_frames: the padded length of training batches; the longest clip's when None.
    seed: seeds the initialisation, the batch order and the crops; equal seeds give equal
      parameters.
    class_names: optional names of the K classes, saved with the classifier.
  Returns:
    The trained classifier, with the standardisation of ``log_mels``.
  """
  _check_kind(kind, num_classes)
  clips = check_clips(log_mels, "log_mels")
  targets = check_targets(targets, kind, num_classes, len(clips), "targets")
  if class_names is not None:
    class_names = tuple(str(c) for c in class_names)
    if len(class_names) != num_classes:
      raise ValueError(f"class_names has {len(class_names)} names for {num_classes} classes")
  longest = max(clip.shape[0] for clip in clips)
  frames = longest if max_frames is None else min(int(max_frames), longest)
  if frames < 1:
    raise ValueError(f"max_frames must be >= 1, got {max_frames}")
  if kind == "words" and frames < longest:
    raise ValueError(f"max_frames = {max_frames} is below the longest words clip "
                     f"({longest} frames); cutting it could drop its words")
  mean, std = standardisation(clips)
  model = SpeechClassifier(num_classes, mean, std)
  dummy, dummy_valid = pad_clips(clips[:1], frames)
  params = model.init(jax.random.PRNGKey(seed), dummy, dummy_valid)["params"]

  def loss_fn(params, mean, std, log_mels, valid, targets):
    logits, _ = SpeechClassifier(num_classes, mean, std).apply(
        {"params": params}, log_mels, valid)
    return _loss(kind, logits, targets)

  rng = np.random.default_rng(seed)  # the batch order and the crops, drawn in turn
  batches = ((mean, std,
              *pad_clips([_crop(rng, clips[n], frames) for n in indices], frames),
              targets[indices])
             for indices in fitting.batch_indices(rng, len(clips), batch_size, num_steps))
  params = fitting.fit(loss_fn, params, batches, num_steps, learning_rate, weight_decay)
  return SpeechClassifierParams(kind, int(num_classes), mean, std, params, class_names)


@functools.partial(jax.jit, static_argnames="num_classes")
def _forward(params, mean, std, log_mels, valid, num_classes: int):
  return SpeechClassifier(num_classes, mean, std).apply({"params": params}, log_mels, valid)


def predict(classifier: SpeechClassifierParams, log_mels: Sequence[np.ndarray],
            batch_size: int = PREDICT_BATCH_SIZE) -> Tuple[np.ndarray, np.ndarray]:
  """Utterances' log-mels ``[F_i, n_mels]`` -> numpy (probabilities ``[N, K]``, features
  ``[N, CONV_WIDTHS[-1]]``).

  Probabilities are a softmax over speakers, or each word's sigmoid. Whole clips are used
  (no cropping), in batches of ``min(batch_size, N)`` padded to the longest clip rounded up
  to ``PREDICT_FRAME_QUANTUM`` frames, the last batch with empty rows: one compilation
  serves the call.
  """
  clips = check_clips(log_mels, "log_mels", classifier.n_mels)
  quantum = PREDICT_FRAME_QUANTUM
  frames = -(-max(clip.shape[0] for clip in clips) // quantum) * quantum
  size = max(1, min(batch_size, len(clips)))
  probabilities = np.zeros((len(clips), classifier.num_classes), np.float32)
  features = np.zeros((len(clips), CONV_WIDTHS[-1]), np.float32)
  for start in range(0, len(clips), size):
    chunk = clips[start:start + size]
    batch, valid = pad_clips(chunk, frames)
    batch = np.pad(batch, ((0, size - len(chunk)), (0, 0), (0, 0)))
    valid = np.pad(valid, ((0, size - len(chunk)), (0, 0)))
    logits, batch_features = _forward(classifier.params, classifier.mean, classifier.std,
                                      batch, valid, classifier.num_classes)
    if classifier.kind == "speaker":
      batch_probabilities = jax.nn.softmax(logits, axis=-1)
    else:
      batch_probabilities = jax.nn.sigmoid(logits)
    probabilities[start:start + len(chunk)] = np.asarray(batch_probabilities)[:len(chunk)]
    features[start:start + len(chunk)] = np.asarray(batch_features)[:len(chunk)]
  return probabilities, features


def mean_f1(predicted, targets) -> float:
  """Mean over utterances of the F1 of a predicted word set against the true one, both
  bool ``[N, V]``: ``2 |P & T| / (|P| + |T|)``, 1 when both sets are empty."""
  predicted, targets = np.asarray(predicted, bool), np.asarray(targets, bool)
  if predicted.shape != targets.shape or predicted.ndim != 2:
    raise ValueError(f"mean_f1 needs two [N, V] arrays of the same shape, got "
                     f"{predicted.shape} and {targets.shape}")
  both = np.sum(predicted & targets, axis=1)
  sizes = np.sum(predicted, axis=1) + np.sum(targets, axis=1)
  return float(np.mean(np.where(sizes == 0, 1.0, 2.0 * both / np.maximum(sizes, 1))))


def score(classifier: SpeechClassifierParams, log_mels: Sequence[np.ndarray], targets,
          batch_size: int = PREDICT_BATCH_SIZE) -> float:
  """The classifier's score on utterances with known targets (as for training):
  ``"speaker"``: accuracy of the most probable speaker; ``"words"``: :func:`mean_f1` of the
  words with probability above ``WORD_THRESHOLD``."""
  clips = check_clips(log_mels, "log_mels", classifier.n_mels)
  targets = check_targets(targets, classifier.kind, classifier.num_classes, len(clips),
                          "targets")
  probabilities, _ = predict(classifier, clips, batch_size)
  if classifier.kind == "speaker":
    return float(np.mean(np.argmax(probabilities, axis=-1) == targets))
  return mean_f1(probabilities > WORD_THRESHOLD, targets > 0.5)


# --------------------------------------------------------------------------------------
# Files


def save(path: str, classifier: SpeechClassifierParams) -> None:
  """Writes the classifier and its metadata atomically to ``path`` (msgpack, no pickle)."""
  _check_kind(classifier.kind, classifier.num_classes)
  meta = dict(format=FILE_FORMAT, version=FILE_VERSION, kind=classifier.kind,
              num_classes=int(classifier.num_classes), n_mels=classifier.n_mels,
              conv_widths=list(CONV_WIDTHS),
              class_names=None if classifier.class_names is None
              else list(classifier.class_names))
  fitting.save_versioned(path, meta, mean=np.asarray(classifier.mean, np.float32),
                         std=np.asarray(classifier.std, np.float32), params=classifier.params)


def _check_contents(meta: dict, mean, std, params) -> None:
  """Raises a ValueError unless the file's arrays fit the classifier its ``meta`` describes."""
  _check_kind(meta["kind"], meta["num_classes"])
  if meta["conv_widths"] != list(CONV_WIDTHS):
    raise ValueError(f"convolution widths {meta['conv_widths']}, this code builds "
                     f"{list(CONV_WIDTHS)}")
  n_mels = meta["n_mels"]
  for name, array in (("mean", mean), ("std", std)):
    if not isinstance(array, np.ndarray) or array.shape != (n_mels,):
      raise ValueError(f"{name} must be [{n_mels}], got {np.shape(array)}")
  if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
    raise ValueError("mean and std must be finite and std > 0")
  names = meta["class_names"]
  if names is not None and len(names) != meta["num_classes"]:
    raise ValueError(f"{len(names)} class names for {meta['num_classes']} classes")
  model = SpeechClassifier(meta["num_classes"], jnp.zeros(n_mels), jnp.ones(n_mels))
  dummy = jnp.zeros((1, 8, n_mels), jnp.float32)
  fitting.check_param_shapes(
      params, lambda: model.init(jax.random.PRNGKey(0), dummy, jnp.ones((1, 8), bool))["params"],
      f"a SpeechClassifier with num_classes={meta['num_classes']} on {n_mels} mel bins")


def load(path: str) -> SpeechClassifierParams:
  """Reads a file of :func:`save`.

  Raises FileNotFoundError for a missing file and ValueError for one that is not a speech
  classifier file or whose arrays do not fit its metadata; both name ``path``.
  """
  try:
    contents, meta = fitting.read_versioned(path, FILE_FORMAT, FILE_VERSION,
                                            "speech classifier")
    mean, std, params = contents["mean"], contents["std"], contents["params"]
    _check_contents(meta, mean, std, params)
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ValueError(f"{path} is not a readable speech classifier file written by save "
                     f"({type(e).__name__}: {e}); remove it to train a new one") from e
  names = meta["class_names"]
  return SpeechClassifierParams(meta["kind"], meta["num_classes"], mean.astype(np.float32),
                                std.astype(np.float32), params,
                                None if names is None else tuple(names))


def get_or_train(path: str, load_data: Callable[[], Tuple[Sequence[np.ndarray], Any]],
                 kind: str, num_classes: int, n_mels: Optional[int] = None,
                 class_names: Optional[Sequence[str]] = None,
                 **train_kwargs) -> SpeechClassifierParams:
  """Loads the classifier at ``path``, or trains one and saves it there (atomically).

  Args:
    path: the classifier file.
    load_data: ``() -> (log_mels, targets)``, the training data of
      :func:`train_speech_classifier`; called only when no file exists yet.
    kind, num_classes: a saved classifier must have the same.
    n_mels: when given, a saved classifier must take as many mel bins.
    class_names: when given, saved with a new classifier, and a saved one must have the
      same names in the same order (e.g. the vocabulary of a words classifier).
    **train_kwargs: passed to :func:`train_speech_classifier` (only when no file exists
      yet; a saved classifier is reused whatever it was trained with).
  Raises:
    ValueError: naming ``path``, when the saved classifier does not match.
  """
  _check_kind(kind, num_classes)
  names = None if class_names is None else tuple(str(c) for c in class_names)
  wanted = dict(kind=kind, num_classes=int(num_classes))
  if n_mels is not None:
    wanted["n_mels"] = int(n_mels)
  if names is not None:
    wanted["class_names"] = names

  def train() -> SpeechClassifierParams:
    log_mels, targets = load_data()
    if n_mels is not None:
      check_clips(log_mels, "training log_mels", int(n_mels))
    return train_speech_classifier(log_mels, targets, kind, num_classes, class_names=names,
                                   **train_kwargs)

  return fitting.get_or_train(
      path, "speech classifier", wanted, load=load,
      describe=lambda c: dict(kind=c.kind, num_classes=c.num_classes, n_mels=c.n_mels,
                              class_names=c.class_names),
      train=train, save=save)
