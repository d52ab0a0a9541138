"""Data pipelines: TFDS datasets read without TensorFlow, training batches read through Grain.

Sources. A source is a random-access dataset: `len(source)` examples and `source[i]` a dict of
numpy arrays. `load_windows` gives a language-model split as a `WindowDataset` (byte-level
windows; the default corpus, `python_stdlib`, is the running Python's standard library, prepared
locally with no download) whose example is {"inputs": int32 [T], "targets": int32 [T],
"weights": float32 [T]} (weight 0 where the target is PAD_ID). `digits` is scikit-learn's
bundled 8x8 digits and `images` any prepared TFDS image classification dataset (mnist,
cifar10, ...); both give a `digits.ArrayDataset` whose example is {"inputs": float32 [D],
"targets": int32 [], "weights": float32 []}. Each dataset has `name`, `split` and a one-line
`summary()` for a start-up banner.

Training batches. `loader.make_train_iterator(source, global_batch_size=B, seed=, rows=)` reads
global batch after global batch of a seeded order (a Grain index shuffle per epoch), returning
only rows `rows` and reading only their examples; `loader.process_rows(sharding, B)` gives a
process the rows its devices hold. The iterator's `get_state()` / `set_state()` is a small JSON
dict, the same on every process, restoring on any process count, mesh or batch size.

Evaluation batches. `eval_batches` (windows) and `digits.eval_batches` (classification) are
deterministic lists of global batches; `loader.take_rows(batch, rows)` is a process's part.

`IndexSampler` (a NumPy permutation per epoch) is the order of the memory-finetuning claim's
own loop; the trainer reads through the loader.
"""
from experiments.data import digits
from experiments.data import images
from experiments.data import loader
from experiments.data.loader import make_train_iterator
from experiments.data.loader import process_rows
from experiments.data.loader import take_rows
from experiments.data.loader import TrainIterator
from experiments.data.pipeline import EOS_ID
from experiments.data.pipeline import eval_batches
from experiments.data.pipeline import IndexSampler
from experiments.data.pipeline import load_windows
from experiments.data.pipeline import PAD_ID
from experiments.data.pipeline import VOCAB_SIZE
from experiments.data.pipeline import WindowDataset
from experiments.data.stdlib_corpus import PythonStdlib
