import contextlib
import io
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def rel_err(x, ref) -> float:
  """Relative-norm error ||x - ref|| / ||ref|| in float64."""
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.linalg.norm((x - ref).ravel()) / max(np.linalg.norm(ref.ravel()), 1e-30))


def saved_residuals(fn, *args) -> str:
  """JAX's listing of the residuals the backward of fn(*args) keeps (`print_saved_residuals`), one per line:
  what a remat policy saves, under which name, and in which memory space."""
  from jax.ad_checkpoint import print_saved_residuals
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    print_saved_residuals(fn, *args)
  return text.getvalue()


def run_model(model, tokens_BT, **kw):
  """Logits of whole sequences at positions 0..T-1."""
  from longgen_jax.model.llama import sequence_positions
  tokens_BT = jax.numpy.asarray(tokens_BT)
  return model(tokens_BT, sequence_positions(tokens_BT), **kw)


def attention_grad_inputs(B, T, S, Hq, Hkv, D, dtype, seed=0):
  """Fresh normal q [B,T,Hq,D], k, v [B,S,Hkv,D], output cotangent dout [B,T,Hq,D] in `dtype`, and a
  float32 lse cotangent [B,Hq,T]: the inputs of a kernel's gradient check."""
  ks = jax.random.split(jax.random.key(seed), 5)
  normal = lambda key, shape: jax.random.normal(key, shape, jax.numpy.float32).astype(dtype)
  return (normal(ks[0], (B, T, Hq, D)), normal(ks[1], (B, S, Hkv, D)), normal(ks[2], (B, S, Hkv, D)),
          normal(ks[3], (B, T, Hq, D)), jax.random.normal(ks[4], (B, Hq, T), jax.numpy.float32))


def on_gpu() -> bool:
  return jax.default_backend() == "gpu"


gpu_only = pytest.mark.skipif(not on_gpu(), reason="needs an NVIDIA GPU (run on the device machine)")


# float32 comparisons mean float32: GPUs would otherwise run float32 matmuls in TF32.
jax.config.update("jax_default_matmul_precision", "highest")


def run_result_script(script: str, devices: int = 8, timeout: int = 900) -> dict:
  """Runs a Python `script` in a subprocess with `devices` forced CPU devices (the rest of the suite keeps
  one) and returns the JSON it printed on its line starting with "RESULT "."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT)
  p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)
  line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
  assert line, p.stderr[-3000:]
  return json.loads(line[len("RESULT "):])


def train_cli(workdir, *overrides, devices: int = 1, processes: int = 1, steps: int = 4, seq_len: int = 64) -> dict:
  """`python -m longgen_jax.train` on configs/tiny.py (batch 4, eval and checkpoint every 2 steps) with
  `devices` CPU devices in all, over `processes` processes (launch/local_multiprocess.sh) when > 1.
  Returns {step: (loss, grad_norm, eval_loss or None)} from metrics.jsonl."""
  args = [sys.executable, "-m", "longgen_jax.train", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
          f"--config.total_steps={steps}", "--config.eval_every=2", "--config.batch_size=4",
          f"--config.seq_len={seq_len}", "--config.checkpoint_every=2", "--config.data.synthetic.num_docs=100",
          "--config.export_model=False", "--config.progress_bar=False", *overrides]
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  if processes > 1:
    args = [os.path.join(ROOT, "launch", "local_multiprocess.sh"), str(processes), str(devices // processes), "--",
            *args]
  else:
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: (r["loss"], r["grad_norm"], r.get("eval_loss")) for r in map(json.loads, f)}


def close(a, b, tol: float = 1e-5) -> bool:
  """Elementwise |a - b| <= tol |b| over two tuples of numbers (None only where both are None)."""
  return all((x is None) == (y is None) and (x is None or abs(x - y) <= tol * abs(y)) for x, y in zip(a, b))


def process_gone(pid: int, timeout: float = 5.0) -> bool:
  """Whether process `pid` has ended within `timeout` seconds; a zombie (ended, not yet reaped: the
  container's init may never reap it) counts as ended."""
  import time
  end = time.time() + timeout
  while True:
    try:
      with open(f"/proc/{pid}/stat") as f:
        state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
      return True
    if state in ("Z", "X"):
      return True
    if time.time() > end:
      return False
    time.sleep(0.05)
