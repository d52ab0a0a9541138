"""Data pipelines: TFDS text datasets as byte-level language-model windows, without TensorFlow.

The default corpus, `python_stdlib`, is the running Python's standard library, prepared locally
with no download. `load_windows` gives a split's windows, `IndexSampler` a resumable training
order whose state is one integer, and `train_batch` / `eval_batches` the model's batches.
`digits` is scikit-learn's bundled 8x8 digits, a classification dataset for small MLPs;
`images` reads any prepared TFDS image classification dataset (mnist, cifar10, ...) the same way.
"""
from experiments.data import digits
from experiments.data import images
from experiments.data.pipeline import EOS_ID
from experiments.data.pipeline import eval_batches
from experiments.data.pipeline import IndexSampler
from experiments.data.pipeline import load_windows
from experiments.data.pipeline import PAD_ID
from experiments.data.pipeline import train_batch
from experiments.data.pipeline import VOCAB_SIZE
from experiments.data.pipeline import WindowDataset
from experiments.data.stdlib_corpus import PythonStdlib
