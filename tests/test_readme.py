"""The README's "Use a layer in your own Flax model" snippet runs as pasted and does what it says."""
import pathlib
import re

import jax
import numpy as np
import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## Use a layer in your own Flax model"


def section_code(readme: str, heading: str) -> str:
  """The first ```python block after the line `heading` (and before the next "## " heading)."""
  start = readme.index(f"\n{heading}\n")
  section = readme[start + 1:]
  next_heading = section.find("\n## ")
  if next_heading != -1:
    section = section[:next_heading]
  match = re.search(r"^```python\n(.*?)^```$", section, re.DOTALL | re.MULTILINE)
  assert match, f"no ```python block in README section {heading!r}"
  return match.group(1)


@pytest.fixture(scope="module")
def run() -> dict:
  """The global namespace of the snippet, executed once as a script."""
  namespace = {"__name__": "readme_snippet"}
  exec(compile(section_code(README.read_text(), SECTION), "README.md", "exec"), namespace)
  return namespace


def test_snippet_trains_a_sparse_model_with_a_dense_router(run):
  losses = run["losses"]
  assert all(np.isfinite(losses)) and losses[-1] < losses[0]

  mask = run["masks"].get_mask(run["opt_state"])
  structures = dict(mask.structures)
  params = dict(zip(mask.paths(), jax.tree.leaves(run["params"])))
  kept = mask.flat()
  sparse = mask.sparse_paths()
  assert sparse and all(re.match(r"(moe/w|head/kernel)", path) for path in sparse)
  assert mask.global_density() == 0.25
  for path in sparse:
    assert not np.any(np.asarray(params[path])[~np.asarray(kept[path])]), path

  router = [path for path in structures if "router" in path]
  memory = [path for path in structures if path.startswith("memory/")]
  assert router and memory
  for path in router + memory:
    assert structures[path] == "dense" and np.all(kept[path]), path
  assert np.all(np.asarray(params[router[0]]) != 0)


def test_snippet_sums_the_aux_losses_of_both_layers(run):
  _, aux = run["model"].apply({"params": run["params"]}, run["inputs_BT"])
  assert set(aux) == {"moe", "memory"}
  moe_losses = sum(float(loss) for loss in aux["moe"]["losses"].values())
  assert moe_losses > 0
  np.testing.assert_allclose(run["sparsejax"].total_aux_loss(aux), moe_losses, rtol=1e-6)
