"""The tokenizer stage: one step with every loss, encode/decode, resume equality."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tiny_config
from resgen_jax import config_base
from resgen_jax import data as data_lib
from resgen_jax.codec import losses, rvq
from resgen_jax.codec.tokenizer import Tokenizer, TokenizerTask, prefix_psnr
from resgen_jax.train import mesh as mesh_lib
from resgen_jax.train import optim, trainer
from resgen_jax.utils import images as image_utils


def synthetic_batch(n=8, size=16, channels=1, seed=0):
  rng = np.random.default_rng(seed)
  return {"image": jnp.asarray(rng.integers(0, 256, (n, size, size, channels)), jnp.uint8),
          "label": jnp.asarray(rng.integers(0, 10, (n,)), jnp.int32)}


def fresh_state(task, batch, optimizer, rng=0):
  """Step-0 state, initialised under jit as the trainer does (eager init compiles every op)."""
  params, model_state = jax.jit(task.init)(jax.random.key(rng), batch)
  model_state = jax.jit(task.data_init)(params, model_state, batch, jax.random.key(rng + 1))
  return trainer.TrainState(step=jnp.zeros((), jnp.int32), params=params,
                            opt_state=optimizer.init(params), model_state=model_state,
                            ema_params={}, nonfinite_step=jnp.array(-1, jnp.int32))


def test_one_step_with_every_loss_and_trick(tmp_path):
  cfg = tiny_config().tokenizer
  cfg.quantizer.shared_codebook = True
  cfg.quantizer.dropout_prob = 0.5
  cfg.loss.recon = "l1"
  cfg.loss.gan_weight = 0.5
  cfg.loss.gan_start_step = 1
  cfg.loss.disc_channels = 8
  cfg.loss.disc_layers = 2
  batch = synthetic_batch()
  lpips_params = jax.jit(losses.LPIPS().init)(jax.random.key(5), jnp.zeros((1, 16, 16, 1)),
                                              jnp.zeros((1, 16, 16, 1)))["params"]
  weights = str(tmp_path / "lpips.npz")
  losses.save_lpips_params(lpips_params, weights)
  cfg.loss.perceptual_weight = 0.1
  cfg.loss.perceptual_weights = weights
  task = TokenizerTask(cfg, image_channels=1)
  optimizer = optim.make_optimizer(cfg.train)
  state = fresh_state(task, batch, optimizer)
  assert state.model_state["codebook"].codebooks.shape == (1, 16, 4)
  step = jax.jit(trainer.make_train_step(task, optimizer, lambda s: 1e-3, 0.0))
  key = jax.random.key(9)
  s1, m1 = step(jax.tree.map(jnp.copy, state), task.constants(), batch, key)
  s2, m2 = step(jax.tree.map(jnp.copy, s1), task.constants(), batch, key)
  for m in (m1, m2):
    assert all(np.isfinite(float(v)) for v in m.values())
    assert {"recon", "commitment", "perceptual", "g_loss", "d_loss",
            "quantizer/usage_d3", "quantizer/perplexity_d1",
            "quantizer/dead_codes_b1"} <= set(m)
  changed = lambda a, b: any(not np.array_equal(x, y) for x, y in
                             zip(jax.tree.leaves(a), jax.tree.leaves(b)))
  # Warmup starts at learning rate 0, so the parameters move from the second step on; the
  # EMA codebooks move on every step.
  assert changed(s1.params["autoencoder"], s2.params["autoencoder"])
  assert changed(state.model_state, s1.model_state)
  # The discriminator is frozen before gan_start_step (step 0) and trains from it (step 1).
  assert float(m1["d_loss"]) == 0.0 and float(m2["d_loss"]) > 0.0
  assert not changed(state.params["discriminator"], s1.params["discriminator"])
  assert changed(s1.params["discriminator"], s2.params["discriminator"])


def test_perceptual_loss_needs_its_weights_file():
  cfg = tiny_config().tokenizer
  cfg.loss.perceptual_weight = 1.0
  with pytest.raises(ValueError, match="perceptual_weights"):
    TokenizerTask(cfg, 1)
  cfg.loss.perceptual_weights = "/nonexistent/lpips.npz"
  task = TokenizerTask(cfg, 1)  # inference (a trained tokenizer) needs no LPIPS file...
  with pytest.raises(FileNotFoundError, match="/nonexistent/lpips.npz"):
    task.constants()  # ...training, the first thing it reads, does


def test_bad_quantizer_config_values():
  cfg = tiny_config().tokenizer
  cfg.quantizer.dropout_prob = 1.5
  with pytest.raises(ValueError, match="dropout_prob"):
    TokenizerTask(cfg, 1)
  cfg = tiny_config().tokenizer
  cfg.quantizer.depth = 0
  with pytest.raises(ValueError, match="depth"):
    TokenizerTask(cfg, 1)
  cfg = tiny_config().tokenizer
  cfg.model.dtype = "float16"
  with pytest.raises(ValueError, match="dtype"):
    TokenizerTask(cfg, 1)


def test_encode_decode_agree_with_the_quantizer_math():
  cfg = tiny_config().tokenizer
  tok = Tokenizer(cfg, 1)
  batch = synthetic_batch()
  x = image_utils.to_float(batch["image"])
  params = jax.jit(tok.autoencoder.init)(jax.random.key(0), x)["params"]
  books = tok.init_codebooks(jax.random.key(1))
  # Jitted as the pipeline runs them (op-by-op they compile every op).
  decode = jax.jit(tok.decode, static_argnums=3)
  decode_latents = jax.jit(tok.decode_latents)
  codes = jax.jit(tok.encode)(params, books, batch["image"])
  assert codes.shape == (8, 4, 4, 3) and codes.dtype == jnp.int32
  z = jax.jit(tok.encode_latents)(params, x)
  np.testing.assert_array_equal(codes, rvq.quantize(z, books).codes)
  decoded = [decode(params, books, codes, prefix) for prefix in range(1, 4)]
  for prefix in range(1, 4):
    np.testing.assert_allclose(
        decoded[prefix - 1],
        decode_latents(params, rvq.dequantize(codes, books, prefix)), atol=1e-6)
  psnr = jax.jit(prefix_psnr, static_argnums=0)(tok, params, books, batch["image"])
  assert psnr.shape == (3, 8)
  for prefix in range(1, 4):
    np.testing.assert_allclose(psnr[prefix - 1], image_utils.psnr(decoded[prefix - 1], x),
                               rtol=1e-5)
  with pytest.raises(ValueError, match="depth 2"):
    tok.decode(params, books, codes[..., :2])


def test_resumed_tokenizer_run_equals_uninterrupted(tmp_path):
  config = tiny_config(num_steps=4)
  mesh = mesh_lib.make_mesh(("data",), (-1,))
  task = TokenizerTask(config.tokenizer, 1)

  def run(workdir, on_batch=None):
    it = data_lib.make_train_iterator(config.data, 16, config.seed)
    if on_batch:
      inner = it.__next__
      class Hooked:
        def __next__(self):
          on_batch(it.get_state()["batches"])
          return inner()
        get_state, set_state = it.get_state, it.set_state
      it = Hooked()
    source = data_lib.load_source(config.data, "test")
    return trainer.train_and_evaluate(
        task, config.tokenizer.train, str(workdir), it,
        lambda: data_lib.sequential_batches(source, 128, max_examples=128), mesh, config.seed)

  full = run(tmp_path / "full")
  cut = run(tmp_path / "cut",
            on_batch=lambda n: n == 1 and os.kill(os.getpid(), signal.SIGTERM))
  assert cut.preempted and int(cut.state.step) == 2
  resumed = run(tmp_path / "cut")
  assert int(resumed.state.step) == 4
  for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(resumed.state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_paper_imagenet_tokenizer_builds_an_8x8_grid():
  """The configs/imagenet.py tokenizer, built abstractly (no memory): 256x256 -> 8x8 x 256."""
  cfg = config_base.load_config_file(
      os.path.join(os.path.dirname(__file__), "..", "configs", "imagenet.py")).tokenizer
  tok = Tokenizer(cfg, image_channels=3)
  images = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  params = jax.eval_shape(lambda x: tok.autoencoder.init(jax.random.key(0), x), images)
  latents = jax.eval_shape(lambda p, x: tok.encode_latents(p["params"], x), params, images)
  assert latents.shape == (2, 8, 8, 256)
  assert tok.downsample == 32 and tok.num_books == 1 and tok.depth == 16
  books = jax.ShapeDtypeStruct((1, 16384, 256), jnp.float32)
  codes = jax.eval_shape(lambda l, b: rvq.quantize(l, b, depth=16).codes, latents, books)
  assert codes.shape == (2, 8, 8, 16)
  n_params = sum(np.prod(x.shape) for x in jax.tree.leaves(params))
  assert 30e6 < n_params < 150e6, n_params  # RQ-VAE's ImageNet autoencoder is ~70M


def slow_ssim(a, b):
  """Wang et al.'s SSIM by explicit windows: Gaussian-weighted statistics at every valid
  11 x 11 position of every channel, images in [0, 1]."""
  g = np.exp(-0.5 * ((np.arange(11) - 5) / 1.5) ** 2)
  w = np.outer(g, g) / np.outer(g, g).sum()
  h, wd, c = a.shape
  values = []
  for ch in range(c):
    for i in range(h - 10):
      for j in range(wd - 10):
        x, y = a[i:i + 11, j:j + 11, ch], b[i:i + 11, j:j + 11, ch]
        mx, my = (w * x).sum(), (w * y).sum()
        vx, vy = (w * (x - mx) ** 2).sum(), (w * (y - my) ** 2).sum()
        cxy = (w * (x - mx) * (y - my)).sum()
        values.append(((2 * mx * my + 1e-4) * (2 * cxy + 9e-4))
                      / ((mx ** 2 + my ** 2 + 1e-4) * (vx + vy + 9e-4)))
  return np.mean(values)


def test_ssim_matches_a_windowed_reference():
  rng = np.random.default_rng(0)
  x = rng.uniform(size=(2, 16, 14, 3))
  noisy = np.clip(x + rng.normal(scale=0.2, size=x.shape), 0, 1)
  got = np.asarray(image_utils.ssim(jnp.asarray(noisy * 2 - 1), jnp.asarray(x * 2 - 1)))
  for k in range(2):
    assert got[k] == pytest.approx(slow_ssim(noisy[k], x[k]), rel=1e-4)
  same = image_utils.ssim(jnp.asarray(x * 2 - 1), jnp.asarray(x * 2 - 1))
  np.testing.assert_allclose(same, 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="at least 11 x 11"):
    image_utils.ssim(jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 8, 8, 1)))
