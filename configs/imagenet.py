"""ImageNet 256x256, the paper's setting (method.md sections 1 and 6).

    python -m resgen_jax.main --config=configs/imagenet.py --workdir=gs://BUCKET/imagenet \
        --config.data.data_dir=gs://BUCKET/tfds

Data: TFDS ``imagenet2012`` prepared from the manual download (see README, Data).
Tokenizer: the RQ-VAE reference (8x8 grid, d_z 256, 16384 codes shared across depths, EMA
decay 0.99, dead-code restart, commitment 0.25, channel multipliers (1,1,2,2,4,4), LPIPS +
hinge GAN); ResGen uses depth 16 (``--config.tokenizer.quantizer.depth=8`` for the depth-8
model). The LPIPS weights are a file you convert once (format: resgen_jax/codec/losses.py).
Generator: ~576M parameters (30 adaLN blocks of width 1024, 16 heads) over the 8x8 x 16
token grid, batch 256, bf16 compute with fp32 parameters.
Hardware: a TPU v4-64 / 8x H100 class machine. Data parallel by default; FSDP (and tensor
parallelism, with the rules below) by mesh only, e.g. ``--config.mesh.axes="('data','fsdp')"
--config.mesh.shape="(-1,8)"`` or ``axes=('data','fsdp','tensor'), shape=(-1,4,2)``. Paper targets (ResGen, 574M): FID 1.95 with
CFG and 6.04 without at depth 16; 2.71 / 6.56 at depth 8.
Evaluation: the ``evaluate`` stage scores the 50,000 samples with the FID Inception
(``--config.evaluation.inception_weights=PATH``, converted once: evaluation/inception.py):
FID, Inception Score, precision/recall, against ``--config.evaluation.reference_stats`` (the
community's ImageNet 256 reference batch ``.npz``, ``mu``/``sigma``) or the validation
split; the sample ``.npz`` is also the layout the standard ImageNet evaluator reads.

``configs/imagenet.py:runlocal``: the same config shrunk only in sizes (the tokenizer's
levels, attention, depth-16 shared book, LPIPS and GAN schedule; the adaLN generator; CFG
sampling; Inception FID) over the small ImageNet-shaped set that
``python -m resgen_jax.data.fake_imagenet`` writes (JPEG class folders of mixed sizes
through the ``folder`` source, random-valued LPIPS and Inception files in the real
layouts), so every stage of this config runs on a laptop in minutes before a slice is
booked. Its numbers mean nothing; its code path is the pod's.
"""

import os

from resgen_jax import config_base
from resgen_jax.data import fake_imagenet
from resgen_jax import layers


def get_config(variant: str = ""):
  """The paper's config, or (``variant="runlocal"``) its shrink: see the module docstring."""
  shrink = config_base.config_variant("imagenet", variant)
  config = config_base.base_config()
  config.data.name = "imagenet2012"
  config.data.image_size = 256
  config.data.num_classes = 1000
  config.data.random_flip = True
  config.data.train_split = "train"
  config.data.eval_split = "validation"
  config.mesh.rules = layers.TENSOR_PARALLEL_RULES  # unmatched leaves: FSDP (largest dim)

  tok = config.tokenizer
  tok.model.channels = 128
  tok.model.channel_multipliers = (1, 1, 2, 2, 4, 4)  # 256 -> 8x8 grid
  tok.model.num_res_blocks = 2
  tok.model.latent_dim = 256
  tok.model.norm_groups = 32
  tok.model.mid_attention = True
  tok.model.dtype = "bfloat16"
  tok.quantizer.depth = 16
  tok.quantizer.codebook_size = 16384
  tok.quantizer.shared_codebook = True
  tok.quantizer.ema_decay = 0.99
  tok.quantizer.dead_code_threshold = 0.1
  tok.quantizer.commitment_weight = 0.25
  tok.quantizer.kmeans_init = False  # RQ-VAE starts from random codes and restarts dead ones
  tok.loss.recon = "l1"
  tok.loss.perceptual_weight = 1.0
  tok.loss.perceptual_weights = ""  # set --config.tokenizer.loss.perceptual_weights=PATH
  tok.loss.gan_weight = 0.75
  tok.loss.gan_start_step = 50_000
  tok.loss.disc_channels = 64
  tok.loss.disc_layers = 3
  tok.train.batch_size = 128
  tok.train.eval_batch_size = 64
  tok.train.num_steps = 500_000
  tok.train.learning_rate = 4e-5 * 128 / 32  # RQ-VAE: 4e-5 per 32 images, scaled linearly
  tok.train.warmup_steps = 5_000
  tok.train.b1 = 0.5
  tok.train.b2 = 0.9
  tok.train.ema_decay = 0.0
  tok.train.log_every = 100
  tok.train.eval_every = 10_000
  tok.train.eval_examples = 10_000
  tok.train.checkpoint_every = 5_000

  config.stages = ("tokenizer", "encode", "generator", "sample", "evaluate")
  gen = config.generator
  gen.model.width = 1024
  gen.model.num_layers = 30
  gen.model.num_heads = 16
  gen.model.mlp_ratio = 4
  gen.model.num_components = 16  # our default; the paper does not state K
  gen.model.low_rank = 64  # our default
  gen.model.dropout = 0.1
  gen.model.dtype = "bfloat16"
  gen.model.remat = True
  gen.loss.cond_dropout = 0.1
  gen.train.batch_size = 256
  gen.train.eval_batch_size = 256
  gen.train.num_steps = 1_000_000
  gen.train.learning_rate = 1e-4
  gen.train.warmup_steps = 10_000
  gen.train.weight_decay = 0.03
  gen.train.b2 = 0.95
  gen.train.ema_decay = 0.9999
  gen.train.log_every = 100
  gen.train.eval_every = 20_000
  gen.train.eval_examples = 10_000
  gen.train.checkpoint_every = 5_000

  config.sampler.steps = 16  # the paper sweeps T; T does not grow with the depth
  # Reveal positions whole: at depth 16 revealing each token on its own confidence puts
  # every position's coarse depths first and halves the quality on digits (bench/study.py:
  # Frechet 14.8 against 30.2 at 1000 steps, 12.6 against 23.7 at 3000).
  config.sampler.confidence_depths = "first"
  config.sampler.cfg_scale = 3.0  # our default; the paper sweeps the scale
  config.sampler.cfg_ramp = "linear"
  config.sampler.top_p = 0.9
  config.sampler.samples_per_class = 50  # 50,000 samples, the FID protocol
  config.sampler.batch_size = 250
  config.evaluation.extractor = "inception"
  config.evaluation.batch_size = 250
  config.evaluation.tokenizer_rfid_examples = 10_000  # x 17 Inception passes at depth 16
  # FID during training: 5,000 samples against 10,000 held-out images (or reference_stats)
  config.evaluation.update(proxy_every=50_000, proxy_samples=5_000,
                           proxy_reference_examples=10_000)
  if shrink:
    runlocal(config)
  return config


def runlocal(config) -> None:
  """Shrinks ``config`` in sizes only, onto the fake ImageNet (2 CPU cores: minutes)."""
  root = fake_imagenet.DEFAULT_ROOT
  config.data.update(name="folder", path=os.path.join(root, "train"),
                     eval_path=os.path.join(root, "validation"), num_classes=10)
  tok = config.tokenizer
  tok.model.update(channels=8, num_res_blocks=1, latent_dim=16, norm_groups=4)
  tok.quantizer.codebook_size = 256
  tok.loss.perceptual_weights = os.path.join(root, fake_imagenet.LPIPS_FILE)
  tok.loss.gan_start_step = 4  # the GAN schedule's switch happens inside the run
  # Batches are multiples of 8, so the shrink also runs on an 8-chip host.
  tok.train.update(batch_size=8, eval_batch_size=8, num_steps=8, warmup_steps=2, log_every=2,
                   eval_every=4, eval_examples=16, checkpoint_every=4)
  config.tokenizer.encode_chunk_batches = 4
  gen = config.generator
  gen.model.update(width=64, num_layers=2, num_heads=4, low_rank=16, dropout=0.0)
  gen.train.update(batch_size=16, eval_batch_size=16, num_steps=20, warmup_steps=2,
                   log_every=5, eval_every=10, eval_examples=32, checkpoint_every=10)
  config.sampler.update(steps=4, samples_per_class=4, batch_size=40)
  config.evaluation.update(inception_weights=os.path.join(root, fake_imagenet.INCEPTION_FILE),
                           batch_size=20, tokenizer_rfid_examples=16, proxy_every=10,
                           proxy_samples=40, proxy_reference_examples=8)
