"""The kernels benchmark (CPU) and the GPU kernels script, smoke-tested with tiny shapes."""
import json

import jax
import pytest

from experiments import bench
from experiments.bench import __main__ as bench_main
from experiments.bench import gpu_kernels

CPU_CASES = ["dense_matmul", "block_sparse_d10", "block_sparse_d25", "block_sparse_d50",
             "block_sparse_d100", "gmm", "ragged_dot"]


def test_both_are_registered_benchmarks():
  assert {"kernels", "gpu_kernels"} <= set(bench.benchmark_names())


def test_cpu_benchmark_quick_writes_every_case(tmp_path, capsys):
  path = tmp_path / "kernels.json"
  assert bench_main.main(["kernels", "--quick", "--repeats", "1", "--json", str(path)]) == 0
  rows = json.loads(path.read_text())
  assert [r["case"] for r in rows] == CPU_CASES
  assert all(r["median_s"] > 0 for r in rows)
  by_case = {r["case"]: r for r in rows}
  assert by_case["gmm"]["vs"] == "ragged_dot"
  for name in CPU_CASES[1:5]:
    assert by_case[name]["vs"] == "dense_matmul"
    assert by_case[name]["speedup"] == pytest.approx(
        by_case["dense_matmul"]["median_s"] / by_case[name]["median_s"])
  assert "speedup_vs_dense_matmul" in capsys.readouterr().out


def test_gpu_script_tiny_runs_the_gpu_kernels_interpreted(tmp_path, capsys):
  path = tmp_path / "gpu.json"
  assert gpu_kernels.main(["--tiny", "--repeats", "1", "--json", str(path)]) == 0
  rows = json.loads(path.read_text())
  names = ["dense_matmul"] + [f"block_sparse_d{d}" for d in (10, 25, 50, 100)] + [
      "gmm", "ragged_dot", "dense_attn", "block_sparse_attn_d10", "block_sparse_attn_d100"]
  assert [r["case"] for r in rows] == [f"{n}_{p}" for n in names for p in ("fwd", "fwdbwd")]
  checked = [r for r in rows if "ok" in r]
  assert len(checked) == 14 and all(r["ok"] for r in checked)
  assert all(r["tflops"] > 0 for r in rows)
  assert "tflops" in capsys.readouterr().out


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="needs a machine without a GPU")
def test_gpu_script_without_gpu_or_tiny_is_a_clear_error(capsys):
  with pytest.raises(SystemExit):
    gpu_kernels.main([])
  assert "gpu_kernels needs a GPU (this platform is 'cpu'); pass --tiny" in capsys.readouterr().err
