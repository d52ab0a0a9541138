"""Scripts that reproduce the claims in the README: each runs its experiments and writes its
table to `experiments/claims/results/`."""
import json
import os
from typing import Any

RESULTS_DIR = os.path.join(os.path.dirname(__file__), "results")


def write_results(out_dir: str, name: str, payload: Any, markdown: str, **json_kwargs) -> None:
  """Writes `payload` to OUT_DIR/NAME.json (indent 1, `json_kwargs` to `json.dump`) and the
  text `markdown` to OUT_DIR/NAME.md, creating OUT_DIR."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(payload, f, indent=1, **json_kwargs)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(markdown)
