"""TFDS image classification datasets: a tiny real array_record dataset (built here, decoded
without TensorFlow) checked pixel by pixel, mnist by name (mocked by TFDS), the trainer's
classify task on mnist, and clear errors for unprepared or unsuitable datasets."""
import jax
import ml_collections
import numpy as np
import PIL.Image
import pytest
import tensorflow_datasets as tfds

from experiments import metrics as metrics_lib
from experiments import trainer as trainer_lib
from experiments.configs import sparse_mlp
from experiments.data import images

TINY = "sparsejax_tiny_images"
TINY_SHAPE = (4, 3, 3)
TINY_SIZES = {"train": 12, "test": 5}


def tiny_examples(split: str) -> list[tuple[np.ndarray, int]]:
  """(uint8 [4, 3, 3] image, label in 0..2) of every example of the tiny dataset's `split`."""
  rng = np.random.default_rng(sorted(TINY_SIZES).index(split))
  return [(rng.integers(0, 256, TINY_SHAPE, dtype=np.uint8), int(rng.integers(3)))
          for _ in range(TINY_SIZES[split])]


class SparsejaxTinyImages(tfds.core.GeneratorBasedBuilder):
  """RGB 4x3 images in 3 classes, 12 train and 5 test, pixels from a seeded generator."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=TINY_SHAPE),
        "label": tfds.features.ClassLabel(num_classes=3),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {split: self._generate_examples(split) for split in TINY_SIZES}

  def _generate_examples(self, split):
    for k, (image, label) in enumerate(tiny_examples(split)):  # PIL images encode without TF
      yield k, {"image": PIL.Image.fromarray(image), "label": label}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> str:
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  SparsejaxTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


@pytest.fixture
def mock_mnist(tmp_path):
  """mnist mocked by TFDS with `num_examples` random records per split, from its real metadata
  (28x28x1 uint8 images, 10 classes) written in `tmp_path`; nothing is downloaded."""

  def mock(num_examples: int):
    builder = tfds.builder("mnist", data_dir=tmp_path, file_format="array_record")
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=split, shard_lengths=[num_examples], num_bytes=0)
        for split in ("train", "test")
    ]))
    builder.data_path.mkdir(parents=True)
    builder.info.write_to_directory(builder.data_path)
    return tfds.testing.mock_data(num_examples=num_examples, data_dir=str(tmp_path),
                                  policy=tfds.testing.MockPolicy.USE_FILES)

  return mock


def test_real_array_record_dataset_is_decoded_flattened_and_scaled(tiny_dir):
  for split, size in TINY_SIZES.items():
    ds = images.load_images(TINY, split, data_dir=tiny_dir)
    assert ds.inputs.dtype == np.float32 and ds.labels.dtype == np.int32
    assert ds.inputs.shape == (size, 36) and ds.labels.shape == (size,)
    # Stored order is TFDS's (shuffled by key): compare (pixels, label) rows as multisets.
    got = sorted(np.round(x * 255).astype(np.uint8).tobytes() + bytes([y])
                 for x, y in zip(ds.inputs, ds.labels))
    want = sorted(image.reshape(-1).tobytes() + bytes([label])  # (h, w, c) order
                  for image, label in tiny_examples(split))
    assert got == want
    np.testing.assert_array_equal(ds.inputs * 255, np.round(ds.inputs * 255))  # exactly x / 255
    assert (len(ds), ds.name, ds.split) == (size, TINY, split)
    assert ds.summary() == f"{TINY}[{split}]: {size} examples of 36 features"
  head = images.load_images(TINY, "train[:50%]", data_dir=tiny_dir)
  full = images.load_images(TINY, "train", data_dir=tiny_dir)
  np.testing.assert_array_equal(head.inputs, full.inputs[:6])
  assert images.num_classes(TINY, data_dir=tiny_dir) == 3


def test_mnist_by_name(mock_mnist, tmp_path):
  with mock_mnist(7):
    ds = images.load_images("mnist", "test", data_dir=str(tmp_path))
    source = tfds.data_source("mnist", split="test", data_dir=str(tmp_path))
    records = [source[k] for k in range(len(source))]
    assert images.num_classes("mnist", data_dir=str(tmp_path)) == 10
  assert ds.inputs.shape == (7, 784) and ds.inputs.dtype == np.float32
  assert ds.labels.dtype == np.int32 and 0 <= ds.labels.min() <= ds.labels.max() < 10
  assert 0.0 <= ds.inputs.min() <= ds.inputs.max() <= 1.0
  np.testing.assert_array_equal(ds.inputs, [r["image"].reshape(-1) / np.float32(255)
                                            for r in records])
  np.testing.assert_array_equal(ds.labels, [r["label"] for r in records])


def test_trainer_classifies_mnist(mock_mnist, tmp_path):
  c = sparse_mlp.get_config("rigl")
  c.data.update(name="mnist", data_dir=str(tmp_path))
  c.classifier = ml_collections.ConfigDict({"name": "mlp", "hidden": (16,)})
  c.train.update(num_steps=4, batch_size=8, log_every=2, eval_every=4, warmup_steps=1)
  c.sparsity.schedule.update(end=4, update_every=2)
  c.checkpoint.every = 4
  c.mesh.data = 1
  workdir = tmp_path / "run"
  with mock_mnist(20):  # the splits are read into memory here
    t = trainer_lib.Trainer(c, str(workdir), jax.devices()[:1])
  try:
    assert t.task.train_source.inputs.shape == (20, 784)
    assert sum(batch["weights"].sum() for batch in t.task.eval_batches) == 20
    summary = t.run()
  finally:
    t.close()
  params = jax.device_get(t.state["params"])
  assert params["layer_0"]["kernel"].shape == (784, 16) and params["head"]["kernel"].shape[1] == 10
  assert 0.0 <= summary["eval/accuracy"] <= 1.0
  evals = [r for r in metrics_lib.read_metrics(str(workdir)) if "eval/accuracy" in r]
  assert [r["step"] for r in evals] == [4]


def test_unprepared_dataset_is_a_one_line_error(tmp_path):
  with pytest.raises(ValueError) as error:
    images.load_images("mnist", "train", data_dir=str(tmp_path))
  message = str(error.value)
  assert "\n" not in message
  assert "dataset 'mnist' is not prepared in" in message
  assert f"`tfds build mnist --file_format=array_record --data_dir={tmp_path}`" in message
  assert not list(tmp_path.rglob("*.array_record*"))  # and nothing was downloaded
  c = sparse_mlp.get_config("dense")
  c.data.update(name="mnist", data_dir=str(tmp_path))
  with pytest.raises(trainer_lib.ConfigError, match="'mnist' is not prepared.*tfds build mnist"):
    trainer_lib.Trainer(c, str(tmp_path / "run"), jax.devices()[:1])


def test_errors(tiny_dir, monkeypatch):
  with pytest.raises(ValueError, match="unknown dataset name='no_such_images'"):
    images.load_images("no_such_images", "train", data_dir=tiny_dir)
  with pytest.raises(ValueError, match=r"'python_stdlib' is not a classification dataset.*"
                                       r"has features \['path', 'text'\]"):
    images.load_images("python_stdlib", "train", data_dir=tiny_dir)
  with pytest.raises(ValueError, match=r"split='validation' does not exist.*\['test', 'train'\]"):
    images.load_images(TINY, "validation", data_dir=tiny_dir)
  monkeypatch.setattr(images, "MAX_IN_MEMORY_BYTES", 12 * 36 * 4 - 1)
  with pytest.raises(ValueError, match=r"12 x 36 float32.*in-memory limit.*'train\[:10%\]'"):
    images.load_images(TINY, "train", data_dir=tiny_dir)
