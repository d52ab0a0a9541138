"""Runs code in several local JAX processes joined by `jax.distributed`, on fake CPU devices.

`run_processes(code)` starts `num_processes` Python processes on this machine, each with
`devices_per_process` CPU devices (`--xla_force_host_platform_device_count`) and Gloo for
cross-process collectives. Each calls `jax.distributed.initialize` with a coordinator on a free
loopback port, then runs `code` (a Python module body, run from the repository root with `jax`
imported), and returns what `code` printed, one string per process in process order. Native
libraries' own stdout (Gloo's connection lines) goes to stderr, so stdout holds only the prints
of `code`. A process exits at its first uncaught exception; then, or when the timeout passes,
every process is killed and the error shows each process's exit status and stderr.

Example:

  outputs = run_processes("print(jax.process_index(), jax.device_count())")
  assert outputs == ["0 8\\n", "1 8\\n"]
"""
import os
import pathlib
import socket
import subprocess
import sys
import tempfile
import textwrap
import time

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
_POLL_S = 0.05
_STDERR_TAIL_CHARS = 4000

# Each process's program; argv: coordinator address, process count, process id, timeout in
# seconds, `code` (run last, its tracebacks naming the file "<code>").
# An uncaught exception exits at once: a normal exit would wait for the other processes at
# jax.distributed's shutdown barrier.
_PROGRAM = """\
import os
import sys
import traceback
sys.stdout.flush()
sys.stdout = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # native libraries' prints go to stderr; Python's to the original stdout

def _exit_on_exception(kind, value, trace):
  traceback.print_exception(kind, value, trace)
  sys.stderr.flush()
  os._exit(1)

sys.excepthook = _exit_on_exception
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(
    coordinator_address=sys.argv[1], num_processes=int(sys.argv[2]),
    process_id=int(sys.argv[3]), initialization_timeout=int(sys.argv[4]),
    shutdown_timeout_seconds=int(sys.argv[4]))
exec(compile(sys.argv[5], "<code>", "exec"))
"""


def free_port() -> int:
  """A TCP port on 127.0.0.1 that is free now."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _environment(devices_per_process: int) -> dict[str, str]:
  """This process's environment with CPU JAX and `devices_per_process` fake devices."""
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split()
           if not f.startswith("--xla_force_host_platform_device_count")]
  flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
  python_path = [str(REPO_ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
  return {**os.environ, "XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu",
          "PYTHONPATH": os.pathsep.join(python_path)}


def _report(processes, stderr_files, reason: str) -> str:
  """A failure message: `reason`, then each process's exit status and the end of its stderr."""
  parts = [reason]
  for i, (process, stderr) in enumerate(zip(processes, stderr_files)):
    stderr.seek(0)
    tail = stderr.read().decode(errors="replace")[-_STDERR_TAIL_CHARS:]
    parts.append(f"--- process {i}: exit status {process.returncode}, stderr (end):\n{tail}")
  return "\n".join(parts)


def run_processes(code: str, num_processes: int = 2, devices_per_process: int = 4,
                  timeout_s: float = 120) -> list[str]:
  """Runs `code` in `num_processes` JAX processes joined by jax.distributed; returns their stdout.

  Args:
    code: a Python module body, run after `jax.distributed.initialize` with `jax` imported;
      dedented first.
    num_processes: how many processes (process ids 0 .. num_processes - 1).
    devices_per_process: fake CPU devices of each process.
    timeout_s: wall-clock limit for all of them together, start-up included.

  Returns:
    What each process printed to stdout, in process order.

  Raises:
    RuntimeError: when a process exits with a non-zero status or the timeout passes; the
      message holds every process's exit status and stderr.
  """
  address = f"127.0.0.1:{free_port()}"
  env = _environment(devices_per_process)
  with tempfile.TemporaryDirectory(prefix="multihost-") as tmp:
    stdout_files = [open(os.path.join(tmp, f"stdout-{i}"), "w+b") for i in range(num_processes)]
    stderr_files = [open(os.path.join(tmp, f"stderr-{i}"), "w+b") for i in range(num_processes)]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _PROGRAM, address, str(num_processes), str(i),
             str(max(1, int(timeout_s))), textwrap.dedent(code)],
            stdout=stdout_files[i], stderr=stderr_files[i], stdin=subprocess.DEVNULL, env=env,
            cwd=REPO_ROOT)
        for i in range(num_processes)
    ]
    try:
      failure = _wait(processes, timeout_s)
    finally:
      for process in processes:
        if process.poll() is None:
          process.kill()
          process.wait()
    try:
      if failure:
        raise RuntimeError(_report(processes, stderr_files, failure))
      outputs = []
      for stdout in stdout_files:
        stdout.seek(0)
        outputs.append(stdout.read().decode())
      return outputs
    finally:
      for f in stdout_files + stderr_files:
        f.close()


def _wait(processes, timeout_s: float) -> str | None:
  """Waits until every process has exited; a failure reason, or None when all exited with 0."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    statuses = [process.poll() for process in processes]
    failed = [i for i, status in enumerate(statuses) if status not in (None, 0)]
    if failed:
      return f"process {failed[0]} of {len(processes)} failed"
    if all(status == 0 for status in statuses):
      return None
    time.sleep(_POLL_S)
  return f"the {len(processes)} processes did not all finish within timeout_s={timeout_s}"
