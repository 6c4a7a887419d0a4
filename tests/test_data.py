"""Tests of resgen_jax.data: sources, validation, and the sharded resumable iterators."""

import json
import logging
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from resgen_jax.data import pipeline
from resgen_jax.data import sources

# Examples of the synthetic source; 12 has divisors (4, 6) and non-divisors (5, 7).
NUM_FAKE = 12


def data_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict({
      "name": "digits", "path": "", "eval_path": "", "data_dir": None, "image_size": 16,
      "num_classes": 10, "train_split": "train", "eval_split": "test", "download": False})
  config.update(overrides)
  return config


def fake_source(num_examples: int = NUM_FAKE) -> sources.ArraySource:
  """Example ``i`` has label ``i`` and the 1x2 image ``[i, 100 + i]`` (mirrored: swapped)."""
  ids = np.arange(num_examples)
  images = np.stack([ids, 100 + ids], axis=-1).astype(np.uint8)[:, None, :, None]
  return sources.ArraySource(name="fake", images=images, labels=ids.astype(np.int32),
                             num_classes=num_examples)


def take(iterator, count: int) -> list:
  return [next(iterator) for _ in range(count)]


def concat(batches: list, key: str) -> np.ndarray:
  return np.concatenate([b[key] for b in batches])


# --- digits -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
  config = data_config()
  return sources.load_source(config, "train"), sources.load_source(config, "test")


def test_digits_shapes_and_labels(digits):
  train, held_out = digits
  assert train.images.shape == (1500, 16, 16, 1) and held_out.images.shape == (297, 16, 16, 1)
  assert train.images.dtype == np.uint8 and train.labels.dtype == np.int32
  assert set(np.unique(train.labels)) == set(range(10))
  assert held_out.labels.min() >= 0 and held_out.labels.max() <= 9
  assert train.images.max() == 255 and train.images.min() == 0


def test_digits_split_disjoint_and_deterministic(digits):
  train_idx, eval_idx = sources.digits_split_indices()
  assert len(train_idx) == 1500 and len(eval_idx) == 297
  assert not set(train_idx) & set(eval_idx)
  assert sorted(np.concatenate([train_idx, eval_idx])) == list(range(1797))
  again = sources.load_source(data_config(), "test")
  np.testing.assert_array_equal(again.images, digits[1].images)
  np.testing.assert_array_equal(again.labels, digits[1].labels)


def test_digits_scaling_matches_raw_values():
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  raw = datasets.load_digits().images
  train_idx, _ = sources.digits_split_indices()
  source = sources.load_source(data_config(image_size=8), "train")
  np.testing.assert_array_equal(source.images[..., 0],
                                np.round(raw[train_idx] * 255 / 16).astype(np.uint8))


# --- resizing and validation helpers -----------------------------------------------------


def test_resize_center_crop_crops_the_middle():
  image = np.arange(32, dtype=np.uint8).reshape(4, 8, 1)
  np.testing.assert_array_equal(sources.resize_center_crop(image, 4), image[:, 2:6])


@pytest.mark.parametrize("shape", [(20, 30, 3), (30, 20, 1), (5, 5, 3)])
def test_resize_center_crop_shape(shape):
  image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  out = sources.resize_center_crop(image, 8)
  assert out.shape == (8, 8, shape[-1]) and out.dtype == np.uint8


@pytest.mark.parametrize("image_size,factor,ok", [(16, 4, True), (20, 8, False), (0, 4, False)])
def test_check_image_size(image_size, factor, ok):
  if ok:
    sources.check_image_size(image_size, factor)
  else:
    with pytest.raises(ValueError, match=f"image_size {image_size} is not divisible"):
      sources.check_image_size(image_size, factor)


def test_unknown_source_name_lists_valid_names():
  with pytest.raises(ValueError, match="valid names.*digits.*npz.*folder"):
    sources.load_source(data_config(name="svhn"), "train")


def test_importing_data_does_not_import_tensorflow():
  code = "import sys, resgen_jax.data; assert 'tensorflow' not in sys.modules, 'tf imported'"
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


# --- TrainIterator -----------------------------------------------------------------------


def test_every_example_once_per_epoch_when_batch_divides():
  it = pipeline.TrainIterator(fake_source(), global_batch_size=4, seed=3)
  first, second = concat(take(it, 3), "label"), concat(take(it, 3), "label")
  assert sorted(first) == list(range(NUM_FAKE)) and sorted(second) == list(range(NUM_FAKE))
  assert not np.array_equal(first, second)  # each epoch has its own permutation


@pytest.mark.parametrize("batch_size", [5, 7])
def test_order_is_epoch_permutations_when_batch_straddles(batch_size):
  num_batches = NUM_FAKE  # B * 12 positions = B whole epochs
  it = pipeline.TrainIterator(fake_source(), global_batch_size=batch_size, seed=11)
  labels = concat(take(it, num_batches), "label")
  epochs = labels.reshape(batch_size, NUM_FAKE)
  for epoch, order in enumerate(epochs):
    assert sorted(order) == list(range(NUM_FAKE))
    np.testing.assert_array_equal(order, np.random.default_rng([11, epoch]).permutation(12))


@pytest.mark.parametrize("random_flip", [False, True])
def test_resume_matches_uninterrupted(random_flip):
  source = fake_source()
  it = pipeline.TrainIterator(source, global_batch_size=5, seed=7, random_flip=random_flip)
  take(it, 7)
  state = json.loads(json.dumps(it.get_state()))
  expected = take(it, 6)
  resumed = pipeline.TrainIterator(source, global_batch_size=5, seed=7,
                                   random_flip=random_flip)
  resumed.set_state(state)
  for want, got in zip(expected, take(resumed, 6)):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])
  assert resumed.get_state() == {"batches": 13}


def test_processes_concatenate_to_the_global_batch():
  source = fake_source()
  single = pipeline.TrainIterator(source, 6, seed=5, random_flip=True)
  shards = [pipeline.TrainIterator(source, 6, seed=5, process_index=p, process_count=2,
                                   random_flip=True) for p in range(2)]
  for _ in range(5):
    whole, parts = next(single), [next(s) for s in shards]
    assert parts[0]["image"].shape == (3, 1, 2, 1) and parts[0]["label"].dtype == np.int32
    for key in ("image", "label"):
      np.testing.assert_array_equal(whole[key], concat(parts, key))


def flipped_mask(batches: list) -> np.ndarray:
  """Checks each image is example ``label`` as is or mirrored -> bool, True where mirrored."""
  images, labels = concat(batches, "image")[:, 0, :, 0], concat(batches, "label")
  plain = np.stack([labels, 100 + labels], -1)
  mirrored = plain[:, ::-1]
  assert np.all(np.all(images == plain, -1) | np.all(images == mirrored, -1))
  return np.all(images == mirrored, -1)


def test_flips_are_deterministic_and_seeded():
  def flips(seed, random_flip=True):
    it = pipeline.TrainIterator(fake_source(), 6, seed=seed, random_flip=random_flip)
    return flipped_mask(take(it, 20))

  first = flips(1)
  assert 0.3 < first.mean() < 0.7
  np.testing.assert_array_equal(first, flips(1))
  assert not np.array_equal(first, flips(2))
  assert not flips(1, random_flip=False).any()


@pytest.mark.parametrize("kwargs,match", [
    ({"global_batch_size": 5, "process_count": 2}, "multiple of the process count"),
    ({"global_batch_size": 4, "process_index": 2, "process_count": 2}, "process_index"),
    ({"global_batch_size": 4, "seed": -1}, "seed"),
])
def test_train_iterator_rejects_bad_arguments(kwargs, match):
  kwargs = {"seed": 0, **kwargs}
  with pytest.raises(ValueError, match=match):
    pipeline.TrainIterator(fake_source(), **kwargs)


@pytest.mark.parametrize("state", [{}, {"batches": -1}, {"batches": "3"}, [3]])
def test_set_state_rejects_bad_states(state):
  it = pipeline.TrainIterator(fake_source(), 4, seed=0)
  with pytest.raises(ValueError, match="data iterator state"):
    it.set_state(state)


def test_make_train_iterator_digits():
  it = pipeline.make_train_iterator(data_config(), global_batch_size=8, seed=0,
                                    process_index=1, process_count=2)
  batch = next(it)
  assert batch["image"].shape == (4, 16, 16, 1) and batch["image"].dtype == np.uint8
  assert batch["label"].shape == (4,) and batch["label"].dtype == np.int32


# --- evaluation passes -------------------------------------------------------------------


def global_eval_batches(batch_fn, process_count: int) -> list:
  """Joins the per-process local batches of each step into global batches."""
  per_process = [list(batch_fn(p)) for p in range(process_count)]
  assert len({len(b) for b in per_process}) == 1  # every process steps equally often
  return [{k: concat(list(step), k) for k in step[0]} for step in zip(*per_process)]


@pytest.mark.parametrize("process_count,max_examples", [(1, None), (2, None), (2, 7)])
def test_sequential_batches_cover_once_with_padding(process_count, max_examples):
  source = fake_source()
  total = NUM_FAKE if max_examples is None else max_examples
  batches = global_eval_batches(
      lambda p: pipeline.sequential_batches(source, 8, p, process_count, max_examples),
      process_count)
  assert len(batches) == -(-total // 8)
  valid = concat(batches, "valid")
  np.testing.assert_array_equal(valid, np.arange(len(valid)) < total)
  np.testing.assert_array_equal(concat(batches, "label")[valid], np.arange(total))
  np.testing.assert_array_equal(concat(batches, "label")[~valid], total - 1)
  assert not flipped_mask(batches).any()


def test_eval_batches_digits_matches_load_all():
  config = data_config()
  images, labels = pipeline.load_all(config, "test")
  batches = global_eval_batches(lambda p: pipeline.eval_batches(config, "test", 64, p, 2), 2)
  valid = concat(batches, "valid")
  assert valid.sum() == 297 and len(valid) == 320
  np.testing.assert_array_equal(concat(batches, "image")[valid], images)
  np.testing.assert_array_equal(concat(batches, "label")[valid], labels)
  assert batches[-1]["image"].shape == (64, 16, 16, 1)


# --- npz ---------------------------------------------------------------------------------


def write_npz(path, **arrays) -> str:
  np.savez(path, **arrays)
  return str(path)


def test_npz_round_trip(tmp_path, caplog):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 20, 30, 3), dtype=np.uint8)
  labels = np.array([0, 3, 1, 2, 3], np.int64)
  train = write_npz(tmp_path / "train.npz", images=images, labels=labels)
  held_out = write_npz(tmp_path / "eval.npz", images=images[:2, :, :, :1], labels=labels[:2])
  config = data_config(name="npz", path=train, image_size=8, num_classes=4)
  source = sources.load_source(config, "train")
  assert source.image_shape == (8, 8, 3) and source.num_examples == 5
  got_images, got_labels = source.get(np.array([4, 0]))
  np.testing.assert_array_equal(got_images[0], sources.resize_center_crop(images[4], 8))
  np.testing.assert_array_equal(got_labels, [3, 0])
  assert got_labels.dtype == np.int32
  with caplog.at_level(logging.WARNING):
    assert sources.load_source(config, "test").num_examples == 5  # no eval_path: same file
  assert "data.eval_path is not set" in caplog.text and "TRAINING data" in caplog.text
  config.eval_path = held_out
  assert sources.load_source(config, "test").image_shape == (8, 8, 1)


GOOD_IMAGES = np.zeros((4, 6, 6, 1), np.uint8)
GOOD_LABELS = np.array([0, 1, 2, 3])


def write_garbage(path) -> str:
  path.write_bytes(b"this is not a zip archive \x00\x01\x02" * 10)
  return str(path)


def write_text(path) -> str:
  path.write_text("images,labels\n1,2\n")
  return str(path)


@pytest.mark.parametrize("write,error,match", [
    (lambda p: str(p), FileNotFoundError, "does not exist"),
    (write_garbage, ValueError, "not a readable"),
    (write_text, ValueError, r"not a readable .npz archive \(a zip of .npy arrays; it starts "
                             r"with b'imag'\)"),
    (lambda p: write_npz(p, images=GOOD_IMAGES), ValueError, r"lacks the key\(s\) \['labels'\]"),
    (lambda p: write_npz(p, images=GOOD_IMAGES.astype(np.float32), labels=GOOD_LABELS),
     ValueError, "must be uint8"),
    (lambda p: write_npz(p, images=GOOD_IMAGES.reshape(4, 36), labels=GOOD_LABELS),
     ValueError, r"\[N, H, W, C\].*\(4, 36\)"),
    (lambda p: write_npz(p, images=np.zeros((4, 6, 6, 2), np.uint8), labels=GOOD_LABELS),
     ValueError, "C in"),
    (lambda p: write_npz(p, images=GOOD_IMAGES, labels=np.array([0, 1, 2, 7])),
     ValueError, "range from 0 to 7"),
    (lambda p: write_npz(p, images=GOOD_IMAGES, labels=np.array([0, 1, 2, 3.0])),
     ValueError, "integer"),
    (lambda p: write_npz(p, images=GOOD_IMAGES, labels=GOOD_LABELS[:3]),
     ValueError, "4 images but 3 labels"),
])
def test_npz_bad_inputs_name_the_file(tmp_path, write, error, match):
  path = write(tmp_path / "data.npz")
  with pytest.raises(error, match=match) as info:
    sources.load_source(data_config(name="npz", path=path, num_classes=4), "train")
  assert path in str(info.value)


# --- folder ------------------------------------------------------------------------------


def save_image(path, array: np.ndarray) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


@pytest.fixture
def image_folder(tmp_path):
  """``cat`` (3rd class): a red 20x30 RGB; ``ant`` (1st): gray 30x20; ``bee``: blue GIF."""
  root = tmp_path / "images"
  save_image(root / "cat" / "c.png", np.full((20, 30, 3), (255, 0, 0), np.uint8))
  save_image(root / "ant" / "a.PNG", np.full((30, 20), 100, np.uint8))
  save_image(root / "bee" / "sub" / "b.gif", np.full((9, 9, 3), (0, 0, 255), np.uint8))
  (root / "bee" / "notes.txt").write_text("not an image")
  return root


def test_an_empty_class_folder_is_warned_about(image_folder, caplog):
  os.makedirs(image_folder / "dog")
  config = data_config(name="folder", path=str(image_folder), image_size=8)
  with caplog.at_level(logging.WARNING):
    source = sources.load_source(config, "train")
  assert source.num_examples == 3
  assert "dog holds no image files: class 3 ('dog')" in caplog.text


def test_folder_loads_rgb_with_sorted_class_ids(image_folder):
  config = data_config(name="folder", path=str(image_folder), image_size=8)
  source = sources.load_source(config, "train")
  assert source.num_examples == 3 and source.image_shape == (8, 8, 3)
  images, labels = source.get(np.arange(3))
  assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [0, 1, 2])  # ant, bee, cat
  np.testing.assert_array_equal(images[0], np.full((8, 8, 3), 100))
  np.testing.assert_array_equal(images[1], np.full((8, 8, 3), (0, 0, 255)))
  np.testing.assert_array_equal(images[2], np.full((8, 8, 3), (255, 0, 0)))


def test_folder_corrupt_image_names_the_file(image_folder):
  bad = image_folder / "cat" / "bad.png"
  bad.write_bytes(b"\x89PNG garbage" * 5)
  source = sources.load_source(data_config(name="folder", path=str(image_folder)), "train")
  index = source.paths.index(str(bad))
  source.get(np.array([index - 1]))  # the good neighbour still reads
  with pytest.raises(ValueError, match="cannot read the image file") as info:
    source.get(np.array([index]))
  assert str(bad) in str(info.value)


def test_decode_processes_give_the_same_batches_and_name_a_bad_file(image_folder):
  """data.workers = 2: the training iterator's batches equal in-process decoding's (order,
  flips, pixels), and an unreadable file's error still names it."""
  config = data_config(name="folder", path=str(image_folder), image_size=8, random_flip=True)
  batches = {}
  for workers in (0, 2):
    config.workers = workers
    iterator = pipeline.make_train_iterator(config, 4, seed=3)
    batches[workers] = [next(iterator) for _ in range(3)]
  for a, b in zip(batches[0], batches[2]):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  bad = image_folder / "cat" / "bad.png"
  bad.write_bytes(b"\x89PNG garbage" * 5)
  source = sources.load_source(config, "train")
  with pytest.raises(ValueError, match="cannot read the image file") as info:
    source.get(np.arange(source.num_examples))
  assert str(bad) in str(info.value)
  config.workers = -2
  with pytest.raises(ValueError, match="data.workers must be >= -1"):
    sources.load_source(config, "train")


def test_folder_errors(tmp_path, image_folder):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match=missing):
    sources.load_source(data_config(name="folder", path=missing), "train")
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no class sub-folders"):
    sources.load_source(data_config(name="folder", path=str(tmp_path / "empty")), "train")
  (tmp_path / "no_images" / "a").mkdir(parents=True)
  with pytest.raises(ValueError, match="no image files"):
    sources.load_source(data_config(name="folder", path=str(tmp_path / "no_images")), "train")
  with pytest.raises(ValueError, match="3 class sub-folders.*num_classes is 2"):
    sources.load_source(data_config(name="folder", path=str(image_folder), num_classes=2),
                        "train")


# --- TFDS (mocked; no network) -----------------------------------------------------------

MOCK_EXAMPLES = 10  # what tfds.testing.mock_data yields per split
MOCK_SPLIT_SIZE = 7  # what the written metadata claims each split holds


@pytest.fixture(scope="module")
def mnist_metadata_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding mnist's metadata (no records) that says each split has 7."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  builder = tfds.builder("mnist", data_dir=data_dir)
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_dir, dataset_name="mnist",
                                           split="train", filetype_suffix="tfrecord")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[MOCK_SPLIT_SIZE], num_bytes=0,
                          filename_template=template.replace(split=s))
      for s in ("train", "test")]))
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  return data_dir


@pytest.fixture
def mock_mnist(mnist_metadata_dir):
  """The mnist data config, with tfds mocked to yield random examples."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=mnist_metadata_dir,
                              policy=tfds.testing.MockPolicy.USE_FILES):
    yield data_config(name="mnist", data_dir=mnist_metadata_dir, image_size=8)


def test_tfds_in_memory_source(mock_mnist):
  source = sources.load_source(mock_mnist, "train")
  assert source.images.shape == (MOCK_EXAMPLES, 8, 8, 1) and source.images.dtype == np.uint8
  assert source.labels.dtype == np.int32
  assert source.labels.min() >= 0 and source.labels.max() < 10


def test_tfds_not_prepared_explains_how(tmp_path):
  config = data_config(name="mnist", data_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError, match="tfds build mnist") as info:
    sources.load_source(config, "train")
  assert str(tmp_path) in str(info.value) and "download=True" in str(info.value)


def test_tfds_stream_resumes_exactly(mock_mnist):
  def stream():
    return pipeline.TFDSStreamIterator(mock_mnist, "train", global_batch_size=4, seed=2,
                                       random_flip=True, shuffle_buffer=16)

  it = stream()
  take(it, 3)
  state = it.get_state()
  expected = take(it, 4)
  assert expected[0]["image"].shape == (4, 8, 8, 1) and expected[0]["label"].dtype == np.int32
  resumed = stream()
  resumed.set_state(state)
  for want, got in zip(expected, take(resumed, 4)):
    np.testing.assert_array_equal(want["image"], got["image"])
    np.testing.assert_array_equal(want["label"], got["label"])


@pytest.mark.parametrize("process_count", [1, 2])
def test_tfds_stream_eval_pads_to_equal_steps(mock_mnist, process_count):
  batches = global_eval_batches(
      lambda p: pipeline.stream_eval_batches(mock_mnist, "test", 4, p, process_count),
      process_count)
  valid = concat(batches, "valid")
  assert valid.sum() == MOCK_SPLIT_SIZE and len(batches) == 2
  assert concat(batches, "image").shape == (8, 8, 8, 1)


@pytest.mark.parametrize("process_count", [1, 2])
def test_a_pass_from_a_start_batch_is_the_tail_of_the_whole_pass(mock_mnist, process_count):
  """What a resumed encoding reads: from batch ``s`` on, the batches of the whole pass from
  ``s`` (the padding past a smaller share included), for the in-memory and the streamed
  TFDS passes."""
  source = fake_source()
  passes = {
      "sequential": lambda p, start: pipeline.sequential_batches(source, 8, p, process_count,
                                                                 None, start),
      "stream": lambda p, start: pipeline.stream_eval_batches(mock_mnist, "test", 2, p,
                                                              process_count, None, start)}
  for name, batches in passes.items():
    whole = [list(batches(p, 0)) for p in range(process_count)]
    assert len(whole[0]) >= 2, name
    for start in range(len(whole[0]) + 1):
      for p in range(process_count):
        tail = list(batches(p, start))
        assert len(tail) == len(whole[p]) - start, (name, start, p)
        for got, want in zip(tail, whole[p][start:]):
          assert sorted(got) == sorted(want)
          for key in got:
            np.testing.assert_array_equal(got[key], want[key], err_msg=f"{name} {key}")


def test_fingerprints_follow_the_data_not_its_location(tmp_path, image_folder):
  images = np.random.default_rng(0).integers(0, 256, (6, 8, 8, 1)).astype(np.uint8)
  a = write_npz(tmp_path / "a.npz", images=images, labels=np.arange(6) % 4)
  moved = write_npz(tmp_path / "moved.npz", images=images, labels=np.arange(6) % 4)
  other = write_npz(tmp_path / "b.npz", images=images[::-1], labels=np.arange(6) % 4)
  npz = lambda path: sources.fingerprint(
      data_config(name="npz", path=path, image_size=8, num_classes=4), "train")
  assert npz(a) == npz(moved) and npz(a) != npz(other) and npz(a)["examples"] == 6
  folder = lambda root: sources.fingerprint(
      data_config(name="folder", path=str(root), image_size=8), "train")
  before = folder(image_folder)
  shutil.copytree(image_folder, tmp_path / "elsewhere")
  assert folder(tmp_path / "elsewhere") == before
  save_image(image_folder / "ant" / "a2.png", np.zeros((4, 4), np.uint8))
  assert folder(image_folder) != before
