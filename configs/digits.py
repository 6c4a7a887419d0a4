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
  return config
