"""TFDS image classification datasets (mnist, fashion_mnist, cifar10, ...) as in-memory arrays.

Any TFDS dataset with the features "image" (uint8 [H, W, C], fixed size) and "label"
(`ClassLabel`) works. It is read without TensorFlow, through the array_record data source
(`builder.as_data_source`, images decoded with Pillow), from a copy prepared beforehand in
`data_dir`; nothing is downloaded at run time. Prepare one once (this step needs TensorFlow and
the network) with

  tfds build mnist --file_format=array_record [--data_dir=DIR]

A split becomes a `digits.ArrayDataset`: inputs the flattened pixels scaled to [0, 1]
(x / 255), float32 [N, H*W*C] in (h, w, c) order; labels int32 [N] in [0, num_classes); records
in stored order. It is the same random-access source as the digits (`ds[i]` = {"inputs":
float32 [H*W*C], "targets": int32 [], "weights": float32 []}, read by `experiments.data.loader`)
and is evaluated with `digits.eval_batches`.

The whole split is held in memory as float32, at most `MAX_IN_MEMORY_BYTES` (1 GiB) per split:
mnist's train split is 60,000 x 784 x 4 B = 188 MB, cifar10's 50,000 x 3072 x 4 B = 614 MB.
Larger splits are refused with a clear error; take a slice instead, e.g. "train[:10%]".
Reading is one Pillow decode per image, about 180 us: some 12 s for mnist's 70,000 images.
"""
import time

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from experiments.data import digits

IMAGE_KEY = "image"
LABEL_KEY = "label"
MAX_PIXEL = 255.0
# Largest split (float32 inputs, N * H * W * C * 4 bytes) that `load_images` holds in memory.
MAX_IN_MEMORY_BYTES = 2**30


def _build_command(name: str, data_dir: str | None) -> str:
  where = f" --data_dir={data_dir}" if data_dir else ""
  return f"`tfds build {name} --file_format=array_record{where}`"


def _check_features(name: str, builder: tfds.core.DatasetBuilder) -> tuple[tuple[int, ...], int]:
  """(image shape (H, W, C), number of classes) of `builder`, or a ValueError naming `name`."""
  features = builder.info.features or {}
  keys = sorted(features.keys())
  image = features[IMAGE_KEY] if IMAGE_KEY in keys else None
  label = features[LABEL_KEY] if LABEL_KEY in keys else None
  if not (isinstance(image, tfds.features.Image) and image.np_dtype == np.uint8
          and isinstance(label, tfds.features.ClassLabel)):
    raise ValueError(
        f"name={name!r} is not a classification dataset: task='classify' takes "
        f"{digits.NAME!r} or a TFDS dataset with features {IMAGE_KEY!r} (uint8 image) and "
        f"{LABEL_KEY!r} (ClassLabel); {name!r} has features {keys}")
  if any(d is None for d in image.shape):
    raise ValueError(f"name={name!r} has images of varying size {image.shape}; the classifier "
                     "needs one fixed [H, W, C]")
  return tuple(image.shape), label.num_classes


def prepared_builder(name: str, data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of the image classification dataset `name`, prepared as array_record in
  `data_dir` (None: TFDS's default); a one-line ValueError otherwise (never downloads)."""
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    first_line = str(e).split("\n", 1)[0]
    raise ValueError(f"unknown dataset name={name!r}: it is neither {digits.NAME!r} nor a TFDS "
                     f"dataset ({first_line})") from None
  _check_features(name, builder)
  if not builder.is_prepared():
    raise ValueError(
        f"dataset {name!r} is not prepared in {builder.data_dir}; prepare it once (needs "
        f"TensorFlow and the network) with {_build_command(name, data_dir)}")
  if tfds.core.FileFormat.ARRAY_RECORD not in builder.info.available_file_formats():
    raise ValueError(
        f"dataset {name!r} in {builder.data_dir} is prepared as {builder.info.file_format}, which "
        f"has no random access without TensorFlow; rebuild it with "
        f"{_build_command(name, data_dir)}")
  return builder


def num_classes(name: str, *, data_dir: str | None = None) -> int:
  """The number of classes of the prepared TFDS image dataset `name`."""
  return _check_features(name, prepared_builder(name, data_dir))[1]


def load_images(name: str, split: str, *, data_dir: str | None = None) -> digits.ArrayDataset:
  """`split` (e.g. "train", "test", "train[:10%]") of the prepared TFDS image dataset `name`:
  inputs x / 255, float32 [N, H*W*C]; labels int32 [N].

  Raises:
    ValueError: for an unknown, unprepared or non-image dataset, an unknown split, or a split
      over `MAX_IN_MEMORY_BYTES`.
  """
  builder = prepared_builder(name, data_dir)
  shape, _ = _check_features(name, builder)
  try:
    builder.info.splits[split]
  except (ValueError, KeyError):
    raise ValueError(f"split={split!r} does not exist in {name!r}; available splits: "
                     f"{sorted(builder.info.splits)}") from None
  source = builder.as_data_source(split=split)
  num_features = int(np.prod(shape))
  size = len(source) * num_features * 4
  if size > MAX_IN_MEMORY_BYTES:
    raise ValueError(
        f"split={split!r} of {name!r} is {len(source)} x {num_features} float32 = "
        f"{size / 2**30:.1f} GiB, over the in-memory limit MAX_IN_MEMORY_BYTES="
        f"{MAX_IN_MEMORY_BYTES / 2**30:g} GiB; take a slice, e.g. '{split}[:10%]'")
  clock = time.perf_counter()
  inputs = np.empty((len(source), num_features), np.float32)
  labels = np.empty(len(source), np.int32)
  for k in range(len(source)):
    record = source[k]
    inputs[k] = np.asarray(record[IMAGE_KEY], np.float32).reshape(-1)
    labels[k] = record[LABEL_KEY]
  inputs /= MAX_PIXEL
  logging.info("Read %d images of %s[%s] in %.1f s", len(labels), name, split,
               time.perf_counter() - clock)
  return digits.ArrayDataset(inputs, labels, name=name, split=split)
