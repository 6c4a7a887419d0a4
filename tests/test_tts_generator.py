"""The text-conditioned generator: prompts stay as given, padding never reaches real
frames, the text reaches them, and training prompts are masked as synthesis uses them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resgen_jax import config_base
from resgen_jax.generator.task import GeneratorTask, null_text, prompt_positions

POSITIONS, DEPTH, VOCAB, DIM, TEXT_VOCAB, TEXT_LEN = 12, 3, 16, 4, 20, 7


def make_task(mode="cross", prompt_prob=0.0):
  cfg = config_base.generator_config()
  cfg.model.width, cfg.model.num_layers, cfg.model.num_heads = 32, 2, 2
  cfg.model.num_components, cfg.model.low_rank = 4, 4
  cfg.model.text_layers, cfg.model.text_mode = 1, mode
  cfg.loss.prompt_prob = prompt_prob
  books = np.random.default_rng(0).normal(size=(DEPTH, VOCAB, DIM)).astype(np.float32)
  return GeneratorTask(cfg, books, POSITIONS, DEPTH, 1, text_vocab_size=TEXT_VOCAB,
                       max_text_length=TEXT_LEN + 3)


def batch(rng, size=2, lengths=(12, 7)):
  codes = rng.integers(0, VOCAB, (size, POSITIONS, DEPTH))
  valid = np.arange(POSITIONS) < np.asarray(lengths)[:, None]
  text = np.zeros((size, TEXT_LEN), np.int32)
  for row, n in enumerate((5, 3)[:size]):
    text[row, :n] = rng.integers(2, TEXT_VOCAB, n)
  return {"codes": codes.astype(np.int32), "label": np.zeros(size, np.int32),
          "valid_positions": valid, "text": text}


@pytest.mark.parametrize("mode", ["cross", "prefix"])
def test_padding_never_changes_real_frames_and_text_reaches_them(mode):
  task = make_task(mode)
  rng = np.random.default_rng(1)
  b = batch(rng)
  params, _ = task.init(jax.random.key(0), b)
  # Away from the initialisation (adaLN-Zero gates closed), as after training.
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(9), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.2 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  apply = lambda visible, hidden, text: task.model.apply(
      {"params": params["model"]}, visible, hidden, b["label"], b["valid_positions"],
      text=text)
  visible = rng.normal(size=(2, POSITIONS, DIM)).astype(np.float32)
  hidden = rng.integers(0, DEPTH + 1, (2, POSITIONS)).astype(np.int32)
  logits, means = apply(visible, hidden, b["text"])
  pad = ~b["valid_positions"]
  noisy_visible = np.where(pad[..., None], rng.normal(size=visible.shape) * 10, visible)
  noisy_hidden = np.where(pad, rng.integers(0, DEPTH + 1, hidden.shape), hidden)
  longer_text = np.pad(b["text"], ((0, 0), (0, 3)))  # more padding tokens
  logits2, means2 = apply(noisy_visible.astype(np.float32), noisy_hidden.astype(np.int32),
                          longer_text)
  real = b["valid_positions"]
  np.testing.assert_allclose(np.asarray(logits2)[real], np.asarray(logits)[real], atol=1e-5)
  np.testing.assert_allclose(np.asarray(means2)[real], np.asarray(means)[real], atol=1e-5)
  other_text = b["text"].copy()
  other_text[:, 0] = (other_text[:, 0] + 1 - 2) % (TEXT_VOCAB - 2) + 2
  logits3, _ = apply(visible, hidden, other_text)
  assert np.max(np.abs(np.asarray(logits3)[real] - np.asarray(logits)[real])) > 1e-4


def test_prompted_sampling_never_changes_the_prompt():
  task = make_task()
  rng = np.random.default_rng(2)
  b = batch(rng)
  params, state = task.init(jax.random.key(0), b)
  prompt = np.array([4, 2])
  known = (np.arange(POSITIONS) < prompt[:, None])[..., None] & np.ones(DEPTH, bool)
  known[1, 2, :1] = True  # a partial depth prefix is known too
  cfg = config_base.sampler_config()
  cfg.steps, cfg.cfg_scale = 5, 2.0
  out = jax.jit(lambda c, k, key: task.infill(params, state, task.codebooks, c, k,
                                               jnp.asarray(b["valid_positions"]),
                                               jnp.asarray(b["label"]), key, cfg,
                                               text=jnp.asarray(b["text"])))(
                                                   b["codes"], known, jax.random.key(3))
  codes, steps = np.asarray(out.codes), np.asarray(out.reveal_step)
  np.testing.assert_array_equal(codes[known], b["codes"][known])
  assert np.all(steps[known] == 0)
  pad = ~b["valid_positions"]
  np.testing.assert_array_equal(codes[pad], b["codes"][pad])  # padding is left as given
  generated = ~known & b["valid_positions"][..., None]
  assert np.all(steps[generated] >= 1) and np.all((codes >= 0) & (codes < VOCAB))


def test_prompt_positions_and_training_masks():
  rng = jax.random.key(4)
  valid = jnp.asarray(np.arange(10) < np.array([10, 6, 8, 10])[:, None])
  prompts = np.asarray(prompt_positions(rng, valid, 1.0, 0.5))
  lengths = prompts.sum(-1)
  for row in range(4):  # a prefix of at most half the real frames
    assert np.all(prompts[row, :lengths[row]]) and not np.any(prompts[row, lengths[row]:])
    assert lengths[row] <= 0.5 * np.asarray(valid)[row].sum()
  assert not np.any(np.asarray(prompt_positions(rng, valid, 0.0, 0.5)))
  task = make_task(prompt_prob=1.0)
  b = batch(np.random.default_rng(5), size=2, lengths=(12, 12))
  key = jax.random.key(6)
  m = task.masked_batch(task.constants(), b, key, train=True)
  prompt = np.asarray(prompt_positions(jax.random.fold_in(key, 3), jnp.asarray(
      b["valid_positions"]), 1.0, task.cfg.loss.prompt_max_fraction))
  assert prompt.any()
  assert np.all(np.asarray(m["hidden"])[prompt] == 0)  # prompt frames are never hidden
  assert np.asarray(m["hidden"]).sum() >= 1
  dropped = np.asarray(m["labels"]) == task.null_class
  np.testing.assert_array_equal(np.asarray(m["text"])[dropped],
                                np.asarray(null_text(jnp.asarray(b["text"])))[dropped])


def test_text_model_needs_text():
  task = make_task()
  b = batch(np.random.default_rng(7))
  with pytest.raises(ValueError, match="needs 'text'"):
    task.init(jax.random.key(0), {k: v for k, v in b.items() if k != "text"})
  cfg = config_base.generator_config()
  cfg.model.text_mode = "sideways"
  with pytest.raises(ValueError, match="text_mode"):
    GeneratorTask(cfg, np.zeros((DEPTH, VOCAB, DIM), np.float32), POSITIONS, DEPTH, 1,
                  text_vocab_size=TEXT_VOCAB, max_text_length=TEXT_LEN)
