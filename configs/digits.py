"""The embedded default: scikit-learn's 8x8 digits upsampled to 16x16. No download.

    python -m resgen_jax.main --config=configs/digits.py --workdir=/tmp/digits

Hardware: 2 CPU cores. Expected: the tokenizer trains in a few minutes; its report
(``DIR/tokenizer/results.json``) gives reconstruction PSNR per depth prefix on the 297
held-out digits, rising with depth; ``DIR/tokens/`` then holds the cached 4x4x4 codes.
"""

from resgen_jax import config_base


def get_config():
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
  return config
