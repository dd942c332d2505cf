"""Random-kill soak: SIGKILL the tiny training run at random moments (mid-step, mid-save, mid-export), re-run
the same command until it finishes, and check that nothing was lost: the logged losses equal an uninterrupted
run's, and model/ is the final export.

  python scripts/kill_soak.py --kills 8 --seed 0        (CPU, a few minutes)

Exits 1 on any difference. The unit tests inject faults at fixed points; this script tries random ones.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARGS = ["--config.total_steps=24", "--config.seq_len=64", "--config.batch_size=4", "--config.checkpoint_every=3",
        "--config.log_every=1", "--config.eval_every=0", "--config.progress_bar=False",
        "--config.data.synthetic.num_docs=200", "--config.data.synthetic.max_chars=600",
        "--config.data.eval_docs=0"]


def command(workdir: str) -> list[str]:
  return [sys.executable, "-m", "longgen_jax.train", f"--config={ROOT}/configs/tiny.py", f"--workdir={workdir}",
          *ARGS]


def losses(workdir: str) -> dict[int, float]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


def main():
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--kills", type=int, default=8)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args()
  rng = random.Random(args.seed)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=os.path.join(tempfile.gettempdir(), "longgen_soak_cache"))
  with tempfile.TemporaryDirectory() as tmp:
    ref = os.path.join(tmp, "reference")
    t0 = time.perf_counter()
    subprocess.run(command(ref), env=env, check=True, capture_output=True)
    duration = time.perf_counter() - t0
    failures = 0
    for k in range(args.kills):  # each trial: one run killed at a random moment, then the same command again
      wd = os.path.join(tmp, f"trial{k}")
      proc = subprocess.Popen(command(wd), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
      delay = rng.uniform(0.2 * duration, 1.0 * duration)  # late kills land in the last saves and the export
      try:
        proc.wait(timeout=delay)
        when = f"finished before {delay:.1f} s"
      except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        when = f"SIGKILL at {delay:.1f} s"
      done = subprocess.run(command(wd), env=env, capture_output=True, text=True)
      ok = done.returncode == 0 and losses(wd) == losses(ref)
      try:
        with open(os.path.join(wd, "model", "export.json")) as f:
          ok = ok and json.load(f)["step"] == 24
      except OSError:
        ok = False
      failures += not ok
      print(f"trial {k}: {when}; resumed run {'OK' if ok else 'FAILED: ' + done.stderr[-1500:]}", flush=True)
    print(f"{args.kills - failures}/{args.kills} trials: losses equal the uninterrupted run's and model/ is the "
          "final export")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
  main()
