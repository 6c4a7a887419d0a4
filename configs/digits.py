"""The embedded default: scikit-learn's 8x8 digits upsampled to 16x16. No download.

    python -m resgen_jax.main --config=configs/digits.py --workdir=/tmp/digits

Every stage: the RVQ tokenizer (4x4 grid, depth 4, 64 codes per depth, quantizer dropout so
every depth prefix decodes), the token cache, the ResGen generator (1.27M parameters, 2500
steps), 320 class-conditional samples and their evaluation against the 297 held-out digits
in the features of a classifier trained here.
Hardware: 2 CPU cores, about 6 minutes. Measured (``DIR/tokenizer/results.json`` and
``DIR/samples/<tag>_eval.json``): PSNR rising with the depth prefix; class agreement of the
samples 0.925, Frechet distance 13.97, precision 0.878, recall 0.825.

``configs/digits.py:runlocal``: the same stages with ~10k-parameter models and a few steps
(the suite's shared trained run; about a minute), for checking a change end to end. Its
numbers mean nothing.
"""

from resgen_jax import config_base


def get_config(variant: str = ""):
  """The default run, or (``variant="runlocal"``) its shrink: see the module docstring."""
  shrink = config_base.config_variant("digits", variant)
  config = config_base.base_config()
  config.data.name = "digits"
  config.data.image_size = 16
  config.data.num_classes = 10

  tok = config.tokenizer
  tok.model.channels = 16
  tok.model.channel_multipliers = (1, 2, 2)  # 16x16 -> 4x4 grid
  tok.model.num_res_blocks = 1
  tok.model.latent_dim = 16
  tok.model.norm_groups = 8
  tok.quantizer.depth = 4
  tok.quantizer.codebook_size = 64
  tok.quantizer.dropout_prob = 0.5  # every depth prefix must decode well (PSNR per prefix)
  tok.train.batch_size = 64
  tok.train.num_steps = 1200
  tok.train.learning_rate = 2e-3
  tok.train.warmup_steps = 50
  tok.train.log_every = 50
  tok.train.eval_every = 400
  tok.train.checkpoint_every = 400

  config.stages = ("tokenizer", "encode", "generator", "sample", "evaluate")
  gen = config.generator
  gen.model.width = 128
  gen.model.num_layers = 4
  gen.model.num_heads = 4
  gen.model.num_components = 16
  gen.model.low_rank = 16
  gen.train.batch_size = 64
  gen.train.num_steps = 2500
  gen.train.learning_rate = 1e-3
  gen.train.warmup_steps = 100
  gen.train.log_every = 100
  gen.train.eval_every = 1000
  gen.train.checkpoint_every = 1000
  gen.train.ema_decay = 0.998

  config.sampler.steps = 8
  config.sampler.samples_per_class = 32
  config.sampler.batch_size = 320
  # fid_proxy every 500 generator steps on the sample stage's 320 images (the last value
  # equals the evaluate stage's Frechet distance).
  config.evaluation.proxy_every = 500
  config.evaluation.proxy_samples = 320
  if shrink:
    runlocal(config)
  return config


def runlocal(config) -> None:
  """Shrinks ``config`` to a tokenizer of ~10k parameters at depth 3 and a generator of 2
  layers of width 32, trained 150 and 20 steps (enough for the depth prefixes to separate),
  sampled and scored on 2 images per class."""
  tok = config.tokenizer
  tok.model.update(channels=8, latent_dim=4, norm_groups=4)
  tok.quantizer.update(depth=3, codebook_size=16, kmeans_iters=3)
  tok.train.update(batch_size=16, eval_batch_size=128, num_steps=150, learning_rate=3e-3,
                   warmup_steps=1, log_every=50, eval_every=0, checkpoint_every=100)
  gen = config.generator
  gen.model.update(width=32, num_layers=2, num_heads=2, num_components=4, low_rank=4)
  gen.train.update(batch_size=32, eval_batch_size=128, num_steps=20, learning_rate=5e-4,
                   warmup_steps=1, log_every=10, eval_every=0, checkpoint_every=2,
                   ema_decay=0.9)
  config.sampler.update(steps=4, samples_per_class=2, batch_size=16)
  # The proxy draws the sample stage's 10 x 2 images: at the last step it equals that
  # stage's Frechet distance.
  config.evaluation.update(classifier_steps=50, proxy_every=10, proxy_samples=20)
