"""The training CLI on all of this machine's GPUs: Llama-2-7B LongGen beside all-full, and a ladder of lengths.

Each run is `python -m longgen_jax.train` in its own process, exactly as a user starts it, with random
weights, the synthetic corpus (byte tokenizer), no document masking (cuDNN's full-attention kernel has none),
no checkpoints and no compilation cache. Reported per run: the CLI's compile time, the median step time of the
steps after the first, tokens/s per GPU, MFU and peak device memory (all from its metrics.jsonl).

Runs (G = the visible GPUs):
  longgen_fsdp      configs/llama2_7b_longgen_128k.py, G sequences per step, weights + AdamW over fsdp G
  longgen_context   the same with one sequence split over context G (ring for full, halo for sparse layers)
  full_cudnn_fsdp   configs/llama2_7b_full_128k.py (all 32 layers full) through cuDNN, G sequences, fsdp G
  full_context      all-full, one sequence over context G (ring with our kernel: cuDNN has no offset/LSE)

The ladder compiles a run with `--config.dry_run=True` at each length (XLA's per-device memory, nothing
allocated) and, with --run-longest N, times N steps at the longest length that fits, with the pinned host
cap its dry run names (`remat="offload"`: XLA's pinned pool grows toward its cap before the first step, at
~1.9 GiB/s on 4 H200s, so a loose cap costs time, ~40 s for 113 GiB against 94 at 1M, and the host's
memory). `--set compile_cache_dir=DIR` lets that run load the dry run's compile.

--processes P runs each CLI as P processes of G/P GPUs (launch/local_multiprocess.sh), as a multi-host job
would. --workdirs DIR keeps each run's workdir (cli.log written as it runs, metrics.jsonl per step) under
DIR, so a run cut off from outside leaves them.

  python benchmarks/multi_gpu_train.py --runs longgen_fsdp,full_cudnn_fsdp --seq-len 131072 --steps 3 --json r.json
  python benchmarks/multi_gpu_train.py --ladder 524288,1048576 --ladder-run longgen_context --run-longest 1
  python benchmarks/multi_gpu_train.py --ladder 1048576 --set model.remat=offload --set compile_cache_dir=/tmp/cc \
      --run-longest 2 --workdirs $OUT/runs
  python benchmarks/multi_gpu_train.py --runs full_context --layers 2 --seq-len 524288 --steps 2   # a slice
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONGGEN, FULL = "configs/llama2_7b_longgen_128k.py", "configs/llama2_7b_full_128k.py"
RUNS = {  # name -> (config file, overrides); "G" = the number of visible GPUs
    "longgen_fsdp": (LONGGEN, {"mesh.fsdp": -1, "mesh.context": 1, "batch_size": "G"}),
    "longgen_context": (LONGGEN, {"mesh.fsdp": 1, "mesh.context": -1, "batch_size": 1}),
    "full_cudnn_fsdp": (FULL, {"mesh.fsdp": -1, "mesh.context": 1, "batch_size": "G", "model.attn_impl": "cudnn"}),
    "full_context": (FULL, {"mesh.fsdp": 1, "mesh.context": -1, "batch_size": 1}),
}
COMMON = {"init_from": "", "data.source": "synthetic", "data.tokenizer": "byte", "model.segment_attention": False,
          "eval_every": 0, "data.eval_docs": 0, "checkpoint_every": 0, "export_model": False, "log_every": 1, "compile_cache_dir": "",
          "mesh.data": 1}
EXTRA: dict[str, str] = {}  # --set KEY=VALUE, applied last


def overrides(name: str, seq_len: int, steps: int, layers: int, gpus: int, dry_run: bool) -> list[str]:
  config, own = RUNS[name]
  o = {**COMMON, **own, "seq_len": seq_len, "total_steps": steps, "dry_run": dry_run, **EXTRA}
  if layers:  # a slice of the model with the same full fraction (LongGen: 12 of 32 in the middle)
    o["model.num_layers"] = layers
    o["model.num_full_layers"] = layers if config == FULL else round(layers * 12 / 32)
  o = {k: gpus if v == "G" else v for k, v in o.items()}
  return [f"--config={config}"] + [f"--config.{k}={v}" for k, v in o.items()]


def cli_command(args: list[str], workdir: str, processes: int = 1, gpus: int = 1) -> list[str]:
  """The training CLI on all visible GPUs: one process, or `processes` of gpus // processes GPUs each."""
  cmd = [sys.executable, "-m", "longgen_jax.train", f"--workdir={workdir}", *args]
  if processes <= 1:
    return cmd
  if gpus % processes:
    raise ValueError(f"--processes {processes} must divide the {gpus} GPUs")
  return ["bash", os.path.join(ROOT, "launch", "local_multiprocess.sh"), str(processes), str(gpus // processes),
          "--", *cmd]


KILL_GRACE_S = 30.0   # how long a killed run may take to exit before the sweep goes on without it


def run_cli(cmd: list[str], workdir: str, limit: int, env: dict | None = None) -> tuple[str, str | None]:
  """(log, error line or None) of one CLI run (this process's environment + `env`); its output goes to
  workdir/cli.log as it runs. Past `limit` seconds the run's whole process group is killed (every process of
  a multi-process run)."""
  log_path = os.path.join(workdir, "cli.log")
  gone = True
  with open(log_path, "w") as log_file:
    log_file.write(" ".join(cmd) + "\n")
    log_file.flush()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                         env={**os.environ, **(env or {})})
    try:
      say(f"started (limit {limit} s): {workdir}/cli.log")
      rc = p.wait(timeout=limit)
    except BaseException as e:   # past the limit, or this script stopped (SIGTERM, Ctrl-C, a broken stderr):
      gone = kill_group(p)       # the run, in its own session, goes too; only then a word about it
      why = "past the limit" if isinstance(e, subprocess.TimeoutExpired) else type(e).__name__
      say(f"killed the run's process group ({why})"
          + ("" if gone else f"; pid {p.pid} had not exited {KILL_GRACE_S:.0f} s after SIGKILL"))
      if not isinstance(e, subprocess.TimeoutExpired):
        raise
      rc = None
  with open(log_path) as f:
    log = f.read()
  if rc is None:
    return log, f"> {limit} s" + ("" if gone else f" (killed; still exiting after {KILL_GRACE_S:.0f} s: GPUs and "
                                                 "host memory may be held for the next run)")
  if rc == 0:
    return log, None
  return log, next((line for line in reversed(log.splitlines()) if "error" in line.lower()), log[-300:])


def say(message: str) -> None:
  """A progress line on stderr; a closed stderr (a pipe whose reader died) must not stop the script's cleanup."""
  try:
    print(f"[multi_gpu_train] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)
  except OSError:
    pass


def kill_group(p: subprocess.Popen, grace: float = KILL_GRACE_S) -> bool:
  """SIGKILL to the run's process group, then at most `grace` seconds for it to exit, so this script still
  reports before an outer time limit: a 1M-token run on 4 H200s (remat="offload", ~450 GiB of pinned host
  memory allowed) outlived its --limit by more than 60 s (2026-11-28; why is not known: unkillable while the
  driver pins or frees host memory is the suspect). Returns whether it exited."""
  try:
    os.killpg(p.pid, signal.SIGKILL)
  except ProcessLookupError:   # already gone
    pass
  try:
    p.wait(timeout=grace)
    return True
  except subprocess.TimeoutExpired:
    return False


def new_workdir(root: str | None) -> str:
  if root:
    os.makedirs(root, exist_ok=True)
  return tempfile.mkdtemp(prefix="mgt_", dir=root)


def run_in_new_workdir(name: str, seq_len: int, steps: int, layers: int, gpus: int, limit: int, processes: int,
                       root: str | None, dry_run: bool, env: dict | None = None) -> tuple[str, str, str | None]:
  """(workdir, log, error line or None) of one CLI run of `name` in a fresh workdir under `root`."""
  workdir = new_workdir(root)
  cmd = cli_command(overrides(name, seq_len, steps, layers, gpus, dry_run=dry_run), workdir, processes, gpus)
  return (workdir, *run_cli(cmd, workdir, limit, env))


def compile_seconds(log: str) -> float | None:
  for line in log.splitlines():
    if "compiled train step in" in line:
      return float(line.rsplit(" ", 1)[-1].rstrip("s"))
  return None


def timed_run(name: str, seq_len: int, steps: int, layers: int, gpus: int, limit: int, processes: int = 1,
              root: str | None = None, env: dict | None = None) -> dict:
  row = {"run": name, "seq_len": seq_len, "layers": layers or 32, "steps": steps, "processes": processes,
         **({"env": env} if env else {})}
  t0 = time.perf_counter()
  workdir, log, error = run_in_new_workdir(name, seq_len, steps, layers, gpus, limit, processes, root, dry_run=False,
                                           env=env)
  row.update(wall_s=time.perf_counter() - t0, compile_s=compile_seconds(log), workdir=workdir)
  path = os.path.join(workdir, "metrics.jsonl")
  records = [json.loads(x) for x in open(path)] if os.path.exists(path) else []
  if error:
    row["error"] = error.strip()[:300]
  if records:
    timed = records[1:] or records  # the first step may include one-time work (allocation, autotuning)
    row["step_s"] = statistics.median(r["step_time_s"] for r in timed)
    row["step_s_all"] = [r["step_time_s"] for r in records]
    row["first_step_s"] = records[0]["step_time_s"]   # with one-time work: the only figure of a 1-step run
    row["tokens_per_s_per_gpu"] = statistics.median(r["tokens_per_s"] for r in timed) / gpus
    row["mfu"] = statistics.median(r["mfu"] for r in timed) if timed[0]["mfu"] is not None else None
    row["peak_gb"] = max((r["peak_memory_gb"] or 0) for r in records)
    row["losses"] = [r["loss"] for r in records]
  return row


def dry_run(name: str, seq_len: int, layers: int, gpus: int, limit: int, processes: int = 1,
            root: str | None = None) -> dict:
  row = {"run": name, "seq_len": seq_len, "layers": layers or 32, "processes": processes}
  workdir, log, error = run_in_new_workdir(name, seq_len, 1, layers, gpus, limit, processes, root, dry_run=True)
  path = os.path.join(workdir, "dry_run.json")
  if os.path.exists(path):
    report = json.load(open(path))
    row.update(total_gib=report["per_device_bytes"]["total"] / 2**30, compile_s=report["compile_s"],
               host_gib=report["per_device_bytes"].get("host_temporaries", 0) / 2**30,
               pinned_host_cap_gib=report.get("pinned_host_cap_gib"),
               limit_gib=(report["device_bytes_limit"] or 0) / 2**30, fits=report["fits"], mesh=report["mesh"])
  else:
    row.update(fits=False, error=(error or "no dry_run.json").strip()[:300])
  return row


def longest_fitting(ladder: list[dict], environ) -> tuple[int | None, dict]:
  """The longest length of a ladder whose dry run fits, and the environment to run it in: the pinned host
  cap its dry run named (XLA's pool grows toward the cap before the first step, see the module docstring),
  unless the caller's environment sets one."""
  sys.path.insert(0, ROOT)
  from longgen_jax.parallel.runtime import HOST_MEMORY_ENV   # here: --help and the sweep need no jax import
  fitting = [r for r in ladder if r.get("fits")]
  if not fitting:
    return None, {}
  row = max(fitting, key=lambda r: r["seq_len"])
  cap = row.get("pinned_host_cap_gib")
  return row["seq_len"], ({HOST_MEMORY_ENV: str(cap)} if cap and HOST_MEMORY_ENV not in environ else {})


def visible_devices() -> tuple[int, str, str]:
  """(device count, device kind, JAX version), asked in a child process: a backend opened in this one would
  hold GPU memory the runs (or benchmarks/host_offload.py's probes) need."""
  ask = "import jax, json; print(json.dumps([jax.device_count(), jax.devices()[0].device_kind, jax.__version__]))"
  out = subprocess.run([sys.executable, "-c", ask], capture_output=True, text=True, check=True).stdout
  count, kind, version = json.loads(out.strip().splitlines()[-1])
  return count, kind, version


def main():
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--runs", default="", help=f"comma-separated, from {list(RUNS)}")
  p.add_argument("--seq-len", type=int, default=131072)
  p.add_argument("--steps", type=int, default=3, help="steps per timed run (the first is not timed)")
  p.add_argument("--layers", type=int, default=0, help="0 = all 32; else a slice with the same full fraction")
  p.add_argument("--ladder", default="", help="comma-separated lengths to dry-run with --ladder-run")
  p.add_argument("--ladder-run", default="longgen_context")
  p.add_argument("--run-longest", type=int, default=0, help="steps to time at the longest length that fits")
  p.add_argument("--limit", type=int, default=900, help="seconds per CLI process")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override for every run")
  p.add_argument("--processes", type=int, default=1,
                  help="processes per run (launch/local_multiprocess.sh), each with GPUs / processes GPUs")
  p.add_argument("--workdirs", default="", help="keep each run's workdir under this directory (default: /tmp)")
  p.add_argument("--json", default="")
  args = p.parse_args()
  if args.processes < 1:
    p.error("--processes must be >= 1")
  # SIGTERM (`timeout`, a scheduler) ends this script like Ctrl-C, so run_cli stops the run it waits for
  signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
  EXTRA.update(kv.split("=", 1) for kv in args.set)
  sys.path.insert(0, ROOT)
  from longgen_jax.parallel.runtime import claim_device_memory   # here: --help needs no jax import
  mem_fraction = claim_device_memory()   # the training CLI's own default, set here to record it (the runs inherit it)
  gpus, kind, version = visible_devices()
  meta = {"device": kind, "gpus": gpus, "jax": version, "date": str(datetime.date.today()),
          "mem_fraction": mem_fraction}
  print("# " + json.dumps(meta), flush=True)
  out = {"meta": meta, "runs": [], "ladder": []}
  if gpus % args.processes:
    p.error(f"--processes {args.processes} must divide the {gpus} visible GPUs")
  where = (args.processes, args.workdirs or None)

  def save(row, key):
    out[key].append(row)
    print(json.dumps(row), flush=True)
    if args.json:  # partial results survive a cut-off sweep
      with open(args.json, "w") as f:
        json.dump(out, f, indent=1)

  for name in filter(None, args.runs.split(",")):
    save(timed_run(name, args.seq_len, args.steps, args.layers, gpus, args.limit, *where), "runs")
  if args.ladder:
    for T in sorted(map(int, args.ladder.split(","))):
      save(dry_run(args.ladder_run, T, args.layers, gpus, args.limit, *where), "ladder")
    longest, env = longest_fitting(out["ladder"], os.environ)
    if longest and args.run_longest:
      save(timed_run(args.ladder_run, longest, args.run_longest, args.layers, gpus, args.limit, *where, env=env),
           "runs")
  print("\n| run | seq | layers | compile s | step s | tokens/s per GPU | MFU | peak GB |\n|---|---|---|---|---|---|---|---|")
  for r in out["runs"]:
    if "step_s" not in r:
      print(f"| {r['run']} | {r['seq_len']} | {r['layers']} | | {r.get('error', '')[:80]} | | | |")
      continue
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
    print(f"| {r['run']} | {r['seq_len']} | {r['layers']} | {r['compile_s'] or 0:.0f} | {r['step_s']:.2f} | "
          f"{r['tokens_per_s_per_gpu']:,.0f} | {mfu} | {r['peak_gb']:.1f} |")
  if out["ladder"]:
    print("\n| run | seq | per-device GiB (XLA) | + host GiB | limit GiB | fits | compile s |\n"
          "|---|---|---|---|---|---|---|")
    for r in out["ladder"]:
      print(f"| {r['run']} | {r['seq_len']} | {r.get('total_gib', 0):.1f} | {r.get('host_gib', 0):.1f} | "
            f"{r.get('limit_gib', 0):.1f} | {r['fits']} | {r.get('compile_s', 0) or 0:.0f} |"
            + (f" {r['error'][:80]}" if "error" in r else ""))


if __name__ == "__main__":
  main()
