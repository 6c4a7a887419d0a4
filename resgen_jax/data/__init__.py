"""Image datasets: random-access sources and deterministic, resumable batch iterators.

Importing this package does not import TensorFlow; only the TFDS sources do.
"""

from resgen_jax.data.pipeline import eval_batches
from resgen_jax.data.pipeline import load_all
from resgen_jax.data.pipeline import make_train_iterator
from resgen_jax.data.pipeline import sequential_batches
from resgen_jax.data.pipeline import TFDSStreamIterator
from resgen_jax.data.pipeline import TrainIterator
from resgen_jax.data.sources import ArraySource
from resgen_jax.data.sources import check_image_size
from resgen_jax.data.sources import fingerprint
from resgen_jax.data.sources import FolderSource
from resgen_jax.data.sources import load_source
from resgen_jax.data.sources import resize_center_crop
from resgen_jax.data.sources import Source
from resgen_jax.data.sources import SOURCE_NAMES
