"""Only the decode cases of the attention benchmark: full vs Quest-page decode attention.

`python -m experiments.bench attention_decode [--json FILE] [--repeats N] [--quick]`

The cases `decode_full_ctx32768` and `decode_topk_ctx32768` of `experiments.bench.attention`
(see its docstring), timed interleaved with each other, without the long block-sparse cases.
"""
from typing import Any

from experiments.bench import attention

DESCRIPTION = ("fp32 one-token decode attention on CPU over a filled 32768-token KV cache (H=8, "
               "K=64): Quest page selection (budget 2048, pages of 32) vs full attention")
BASELINE = "decode_full_ctx32768"


def run(repeats: int, quick: bool) -> list[dict[str, Any]]:
  """The decode_full and decode_topk rows."""
  return attention.run_decode(repeats, quick)
