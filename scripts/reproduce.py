"""The LongGen reproduction (issue 13) in one command: for every variant of configs/repro/ and every seed,
train from the same initial weights on the same tokens, then evaluate (pass-key grid and loss by
position, beyond the training length too), one job per GPU side by side; then a summary table.

  python scripts/reproduce.py --variants all --seeds 0,1,2 --gpus 0,1,2,3 --out results/repro
  python scripts/reproduce.py --cpu-tiny --variants all_full,all_sparse_sink --out results/cpu_tiny
  python scripts/reproduce.py --cpu-tiny --variants all --dry-run     # print the commands only
  python scripts/reproduce.py --cpu-tiny --variants all --seeds 0,1,2 --gpus 0,0,0,0,1,1,1,1 ...
      # the CPU-sized models on GPUs: a GPU id listed k times runs k jobs on that GPU at once

With --pretrain STEPS the all-full model is first trained once per seed (OUT/pretrain/seedS, with its own
pass-key grid) and every variant continues from it, as LongGen turns layers of a pretrained full-attention
model sparse:

  python scripts/reproduce.py --cpu-tiny --variants all_full,hybrid_third_middle --pretrain 1500 --steps 1500

Writes OUT/init/seedS/ (the shared initial weights: base.MODEL, random with seed S, drawn by a child on the
first job's platform, logged in OUT/init/log.txt), per job
OUT/VARIANT/seedS/{train/, passkey.json, passkey.png, ppl.json, ppl.png, result.json, log.txt}, and
OUT/summary.json + OUT/summary.md (variant x length accuracy, mean over seeds with the pooled 95% Wilson
interval, and mean loss). Jobs run in the order of --variants, each variant over all its seeds. A job whose
result.json exists is skipped, so re-running the same command continues an interrupted set (training itself
resumes from its checkpoints).

On a machine lent for a limited time: --time-limit SECONDS starts no job that the longest one so far says
would end past the limit, and at the limit (or on SIGTERM, e.g. from `timeout`) stops the running jobs
(SIGTERM to each job's processes: a training saves a checkpoint), writes the summary of the finished ones
and exits 3; the same command continues.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPRO = os.path.join(ROOT, "configs", "repro")
sys.path.insert(0, ROOT)  # run from a checkout
from longgen_jax.training.config import load_config_module  # noqa: E402


class Stopped(Exception):
  """The set was stopped (time limit, SIGTERM) while this job ran: not a failure; it continues on a re-run."""


class JobProcesses:
  """Every job's command runs as its own process group, so that the set can be stopped at once: at the
  time limit or on SIGTERM / SIGINT / SIGHUP each group gets SIGTERM (a training saves a checkpoint on it),
  then SIGKILL after `grace` seconds (every member of the group, whether or not its leader has exited)."""

  def __init__(self):
    self.running: set[subprocess.Popen] = set()
    self.signalled: set[subprocess.Popen] = set()
    self.lock = threading.Lock()
    self.stopped = threading.Event()

  def run(self, cmd: list[str], env: dict, log) -> int:
    """The command's exit status; raises Stopped if the set was stopped before it started or the stop
    signalled it (a command that ended on its own before the stop keeps its status)."""
    with self.lock:
      if self.stopped.is_set():
        raise Stopped(shlex.join(cmd[:4]))
      p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
      self.running.add(p)
    try:
      rc = p.wait()
    finally:
      with self.lock:
        self.running.discard(p)
    with self.lock:
      if p in self.signalled:
        raise Stopped(shlex.join(cmd[:4]))
    return rc

  def stop(self, grace: float = 30.0) -> None:
    with self.lock:
      self.stopped.set()
      groups = list(self.running)
      self.signalled.update(groups)
    for sig in (signal.SIGTERM, signal.SIGKILL):
      for p in groups:
        try:
          os.killpg(p.pid, sig)
        except ProcessLookupError:   # the whole group is gone
          pass
      if sig == signal.SIGTERM:
        end = time.time() + grace
        for p in groups:
          try:
            p.wait(timeout=max(0.0, end - time.time()))
          except subprocess.TimeoutExpired:
            pass


PROCESSES = JobProcesses()


def variant_names() -> list[str]:
  return sorted(f[:-3] for f in os.listdir(REPRO) if f.endswith(".py") and f != "base.py")


def _flat(cfg, prefix: str = "") -> dict:
  out = {}
  for k, v in cfg.items():
    out.update(_flat(v, f"{prefix}{k}.") if hasattr(v, "items") else {f"{prefix}{k}": v})
  return out


def train_overrides(variant: str, cpu_tiny: bool) -> list[str]:
  """--config.KEY=VALUE flags turning the variant's file into the run (the CPU-tiny shrink, if asked)."""
  module = load_config_module(os.path.join(REPRO, f"{variant}.py"))
  if not cpu_tiny:
    return []
  base = _flat(module.get_config())
  tiny = _flat(module.base.cpu_tiny_config(**module.VARIANT))
  return [f"--config.{k}={v}" for k, v in sorted(tiny.items()) if base[k] != v]


Stage = tuple[int, tuple[str, ...]]  # (steps, KEY=VALUE overrides) of a training stage before the main one


def parse_stage(text: str) -> Stage:
  """'STEPS' or 'STEPS:KEY=VALUE;KEY=VALUE...' (';' between overrides: values may hold commas)."""
  steps, _, sets = text.partition(":")
  overrides = tuple(kv.strip() for kv in sets.split(";") if kv.strip())
  if not steps.strip().isdigit() or int(steps) < 1 or any("=" not in kv for kv in overrides):
    raise ValueError(f"a stage is STEPS[:KEY=VALUE;KEY=VALUE...] with STEPS >= 1, got {text!r}")
  return int(steps), overrides


def training_command(variant: str, seed: int, workdir: str, start: str, cpu_tiny: bool, total_steps: int = 0,
                     sets: tuple[str, ...] = ()) -> list[str]:
  """`longgen_jax.train` of the variant's config from the model at `start`, in `workdir`; `sets` (KEY=VALUE)
  come last, so they override everything before them."""
  cmd = [sys.executable, "-m", "longgen_jax.train", f"--config={os.path.join(REPRO, variant + '.py')}",
         f"--workdir={workdir}", f"--config.init_from={start}", f"--config.seed={seed}",
         "--config.progress_bar=False", *train_overrides(variant, cpu_tiny)]
  if total_steps:
    cmd.append(f"--config.total_steps={total_steps}")
  return cmd + [f"--config.{kv}" for kv in sets]


def pretrain_dir(out: str, seed: int) -> str:
  return os.path.join(out, "pretrain", f"seed{seed}")


def pretrain_command(seed: int, out: str, init: str, cpu_tiny: bool, pretrain: Stage,
                     train_sets: tuple[str, ...] = ()) -> list[str]:
  """The shared pretraining of a seed: the all-full model trained from `init` for pretrain's steps (with
  --set, then pretrain's overrides); every variant of the seed then starts from OUT/pretrain/seedS/model,
  as LongGen starts from a pretrained full-attention model and turns some of its layers sparse."""
  steps, sets = pretrain
  return training_command("all_full", seed, pretrain_dir(out, seed), init, cpu_tiny, steps, (*train_sets, *sets))


def job_commands(variant: str, seed: int, out: str, init: str, cpu_tiny: bool, steps: int = 0,
                 eval_overrides: dict | None = None, train_sets: tuple[str, ...] = (),
                 stages: tuple[Stage, ...] = ()) -> list[tuple[str, list[str]]]:
  """The (name, command) pairs of one (variant, seed) job: one training per stage ("stage1", ...; a
  curriculum: each starts from the previous one's exported model, the first from `init`), the main
  training ("train", from the last stage's model), "passkey" and "ppl". eval_overrides replace keys of
  base.EVAL (or CPU_TINY's); train_sets are KEY=VALUE training-config overrides for every training of every
  variant, a stage's own overrides come after them."""
  ev = eval_settings(cpu_tiny, eval_overrides)
  jobdir = os.path.join(out, variant, f"seed{seed}")

  def training(workdir: str, start: str, total_steps: int, extra: tuple[str, ...]) -> list[str]:
    return training_command(variant, seed, os.path.join(jobdir, workdir), start, cpu_tiny, total_steps,
                            (*train_sets, *extra))

  commands, start = [], init
  for i, (stage_steps, stage_sets) in enumerate(stages, 1):
    commands.append((f"stage{i}", training(f"stage{i}", start, stage_steps, stage_sets)))
    start = os.path.join(jobdir, f"stage{i}", "model")
  commands.append(("train", training("train", start, steps, ())))
  model, title = os.path.join(jobdir, "train", "model"), f"{variant}, seed {seed}"
  return commands + [("passkey", evaluate_command("passkey", model, seed, title, ev, cpu_tiny, jobdir)),
                     ("ppl", evaluate_command("ppl", model, seed, title, ev, cpu_tiny, jobdir))]


def eval_settings(cpu_tiny: bool, eval_overrides: dict | None = None) -> dict:
  """base.EVAL (or CPU_TINY's) with the overrides: the evaluation every model of the set gets."""
  base = load_config_module(os.path.join(REPRO, "base.py"))
  return dict(base.CPU_TINY["eval"] if cpu_tiny else base.EVAL, **(eval_overrides or {}))


def evaluate_command(mode: str, model: str, seed: int, title: str, ev: dict, cpu_tiny: bool, outdir: str) -> list[str]:
  """`evaluate passkey` or `evaluate ppl` of an exported model with the set's settings, into outdir/MODE.json."""
  common = ["--ckpt", model, "--tokenizer", "byte", "--dtype", "float32" if cpu_tiny else "bfloat16",
            "--max-seq-len", str(ev["max_seq_len"]), "--batch-size", str(ev["batch_size"]), "--seed", str(seed),
            "--attn-impl", ev["attn_impl"], "--no-progress", "--force", "--title", title]
  if mode == "passkey":
    args = ["--lengths", ev["lengths"], "--depths", ev["depths"], "--samples", str(ev["samples"])]
  else:
    args = ["--seq-len", str(ev["ppl_seq_len"]), "--bucket", str(ev["ppl_bucket"]), "--docs", str(ev["ppl_docs"])]
  return [sys.executable, "-m", "longgen_jax.evaluate", mode, *common, *args,
          "--out", os.path.join(outdir, f"{mode}.json")]


def write_init(path: str, seed: int, cpu_tiny: bool) -> bool:
  """The seed's initial weights of base.MODEL (or CPU_TINY's model), shared by every variant, drawn on this
  process's JAX platform (init_command: the jobs' own); False if they exist (not drawn again)."""
  if os.path.exists(os.path.join(path, "config.json")):
    return False
  from flax import nnx

  from longgen_jax.model.config import ModelConfig
  from longgen_jax.model.llama import Llama
  from longgen_jax.weights import save_model
  base = load_config_module(os.path.join(REPRO, "base.py"))
  dims = base.CPU_TINY["model"] if cpu_tiny else base.MODEL
  save_model(Llama(ModelConfig(**dims), rngs=nnx.Rngs(seed)), path)
  return True


def init_command(out: str, seeds: list[int], cpu_tiny: bool) -> list[str]:
  """This script writing the seeds' initial weights (write_init) and nothing else: the runner runs it in a job
  slot's environment, so the weights are drawn on the platform the jobs run on. The draw is not the same on
  every platform: the recorded GPU set's weights were drawn on a GPU, and from CPU-drawn ones the same
  pretrainings ended elsewhere (2026-11-28, seed 0: eval loss 0.0762 vs the recorded 0.0907;
  docs/reproduction.md). Drawing them in the runner would also give it a JAX client on the jobs' GPUs."""
  return [sys.executable, os.path.abspath(__file__), "--write-inits", "--seeds", ",".join(map(str, seeds)),
          "--out", out, *(["--cpu-tiny"] if cpu_tiny else [])]


def write_inits(out: str, seeds: list[int], cpu_tiny: bool, env: dict) -> bool:
  """init_command for the seeds (none: nothing to do) in env, logged to OUT/init/log.txt; whether it
  succeeded (raises Stopped if the set is stopped meanwhile)."""
  if not seeds:
    return True
  os.makedirs(os.path.join(out, "init"), exist_ok=True)
  with open(os.path.join(out, "init", "log.txt"), "a") as log:
    cmd = init_command(out, seeds, cpu_tiny)
    log.write(f"$ {shlex.join(cmd)}\n")
    log.flush()
    if PROCESSES.run(cmd, env, log):
      print(f"[reproduce] writing the initial weights failed; see {out}/init/log.txt", file=sys.stderr)
      return False
  return True


def recorded_pretrain_losses(out: str, seed: int) -> set[float]:
  """The pretraining eval losses that the seed's finished variants in OUT started from (their result.json)."""
  losses = set()
  for v in variant_names():
    path = os.path.join(out, v, f"seed{seed}", "result.json")
    if os.path.exists(path):
      with open(path) as f:
        pre = json.load(f).get("pretrain")
      if pre and pre.get("final_eval_loss") is not None:
        losses.add(pre["final_eval_loss"])
  return losses


def read_metrics(workdir: str) -> list[dict]:
  """The rows of a training's metrics.jsonl (empty if it wrote none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def last_eval_loss(metrics: list[dict]) -> float | None:
  evals = [m["eval_loss"] for m in metrics if m.get("eval_loss") is not None]
  return evals[-1] if evals else None


def run_job(variant: str, seed: int, out: str, init: str, cpu_tiny: bool, steps: int, env: dict,
            eval_overrides: dict | None = None, train_sets: tuple[str, ...] = (),
            stages: tuple[Stage, ...] = (), pretrain: Stage | None = None) -> dict:
  """Runs the stages, train and evaluations (logging to log.txt) and writes result.json; returns it. A
  stage whose exported model exists is not run again."""
  jobdir = os.path.join(out, variant, f"seed{seed}")
  os.makedirs(jobdir, exist_ok=True)
  times = {}
  with open(os.path.join(jobdir, "log.txt"), "a") as log:
    for name, cmd in job_commands(variant, seed, out, init, cpu_tiny, steps, eval_overrides, train_sets, stages):
      if name.startswith("stage") and os.path.exists(os.path.join(jobdir, name, "model", "config.json")):
        continue
      log.write(f"$ {shlex.join(cmd)}\n")
      log.flush()
      t0 = time.time()
      rc = PROCESSES.run(cmd, env, log)
      times[name] = round(time.time() - t0, 1)
      if rc:
        raise RuntimeError(f"{variant} seed {seed}: {name} failed (exit {rc}); see {jobdir}/log.txt")
  metrics = read_metrics(os.path.join(jobdir, "train"))
  with open(os.path.join(jobdir, "train", "config.json")) as f:
    resolved = json.load(f)
  passkey = json.load(open(os.path.join(jobdir, "passkey.json")))
  ppl = json.load(open(os.path.join(jobdir, "ppl.json")))
  result = {
      "variant": variant, "seed": seed, "cpu_tiny": cpu_tiny, "pattern": resolved["model"]["layer_specs"],
      "steps": metrics[-1]["step"], "final_loss": metrics[-1]["loss"], "final_eval_loss": last_eval_loss(metrics),
      "train_seq_len": resolved["train"]["seq_len"], "seconds": times,
      # the pretrained model's last eval loss says which side of the retrieval transition the conversion
      # started from (docs/reproduction.md: it decides more than the pattern at CPU size)
      "pretrain": None if pretrain is None else {
          "steps": pretrain[0], "overrides": list(pretrain[1]), "model": init,
          "final_eval_loss": last_eval_loss(read_metrics(pretrain_dir(out, seed)))},
      "stages": [{"steps": n, "overrides": list(sets)} for n, sets in stages],
      "passkey": {k: passkey[k] for k in ("lengths", "depths", "samples", "accuracy", "ci95", "accuracy_by_length",
                                          "ci95_by_length", "mean_accuracy", "mean_ci95")},
      "ppl": {"seq_len": ppl["seq_len"], "mean_loss": ppl["mean_loss"], "mean_ppl": ppl["mean_ppl"],
              "buckets": [{k: b[k] for k in ("start", "end", "loss")} for b in ppl["buckets"]]},
      "files": {"passkey": "passkey.json", "passkey_plot": "passkey.png", "ppl": "ppl.json", "ppl_plot": "ppl.png"},
  }
  with open(os.path.join(jobdir, "result.json"), "w") as f:
    json.dump(result, f, indent=1)
  return result


def variants_with_results(out: str, variants: list[str]) -> list[str]:
  """`variants`, then every other variant an earlier run left results for in `out`: a run that adds
  variants to a directory summarizes the whole directory, not only what it ran."""
  found = sorted(v for v in os.listdir(out) if os.path.isdir(os.path.join(out, v)) and any(
      os.path.exists(os.path.join(out, v, s, "result.json")) for s in os.listdir(os.path.join(out, v))))
  return list(variants) + [v for v in found if v not in variants]


def beyond_window_accuracy(result: dict) -> float | None:
  """Pass-key accuracy over the grid's inner depths (0 < depth < 1) of prompts no longer than the training
  rows: the claims' measure. The ends are left out because a sparse layer may see them without retrieval
  from afar (the GPU set's 64-token sink holds the depth-0 needle, right after BOS; its 256-token window the
  depth-1 one, right before the question), and longer prompts because there every model meets its RoPE
  distance limit, full layers too. None when the grid has no such cell (or the result lacks the grid)."""
  pk = result["passkey"]
  if "accuracy" not in pk or "train_seq_len" not in result:   # a result.json written by hand
    return None
  cells = [acc for n, row in zip(pk["lengths"], pk["accuracy"]) if n <= result["train_seq_len"]
           for d, acc in zip(pk["depths"], row) if 0 < d < 1]
  if not cells:
    return None
  return sum(cells) / len(cells)   # every cell has pk["samples"] prompts


GRID_OF = "passkey_of.json"   # beside a pretrained model's grid: the eval loss its pretraining ended on


def grid_matches_pretraining(d: str, now: float | None, say=None) -> bool:
  """Whether the pass-key grid in the pretraining directory d was made of the model its pretraining produced:
  the pretraining eval loss recorded beside the grid equals this one's (`now`, logged in d). The
  pretrainings are reproducible to the last digit (docs/reproduction.md), so a grid recorded by an earlier
  call (copied in by reproduce_call.sh) serves a redone pretraining; any other recipe or outcome re-runs it.
  A pretraining that logged no eval loss matches a grid recorded as made without one (it cannot be checked).
  say(message): told why an existing grid is kept or not."""
  if not os.path.exists(os.path.join(d, "passkey.json")):
    return False
  say = say or (lambda message: None)
  try:
    with open(os.path.join(d, GRID_OF)) as f:
      made_of = json.load(f)["pretrain_final_eval_loss"]
  except (OSError, ValueError, KeyError, TypeError):
    say(f"{d}/passkey.json has no readable {GRID_OF} (the pretraining it was made of): made again")
    return False
  if made_of != now:
    say(f"the pretraining in {d} ended on eval loss {now}, the grid beside it was made of one that ended on "
        f"{made_of}: made again (recorded variants started from the other model do not pair with new ones)")
    return False
  say(f"the grid in {d} was made of a pretraining that ended on this one's eval loss ({now}): kept"
      + ("" if now is not None else " (no eval loss logged: not checked)"))
  return True


def pretrained_passkeys(out: str, seeds: list[int]) -> list[dict]:
  """Per seed with a pretrained model's pass-key grid (OUT/pretrain/seedS/passkey.json): its accuracy by
  length and beyond the window (its training length from the model's run config)."""
  found = []
  for s in seeds:
    d = pretrain_dir(out, s)
    if not (os.path.exists(os.path.join(d, "passkey.json")) and os.path.exists(os.path.join(d, "config.json"))):
      continue
    pk = json.load(open(os.path.join(d, "passkey.json")))
    seq_len = json.load(open(os.path.join(d, "config.json")))["train"]["seq_len"]
    found.append({"seed": s, "accuracy_by_length": pk["accuracy_by_length"],
                  "beyond_window": beyond_window_accuracy({"passkey": pk, "train_seq_len": seq_len})})
  return found


def summarize(out: str, variants: list[str], seeds: list[int]) -> str:
  """summary.json + summary.md from the result.json files present: per variant and length, the mean
  accuracy over seeds and the 95% Wilson interval of all its samples pooled (sampling noise only: it says
  nothing of how seeds differ, hence each seed's beyond-window accuracy beside it)."""
  from longgen_jax.evaluation.common import format_length, wilson_interval
  rows, lengths = [], None
  for v in variants:
    res = [json.load(open(p)) for s in seeds
           if os.path.exists(p := os.path.join(out, v, f"seed{s}", "result.json"))]
    if not res:
      continue
    lengths = res[0]["passkey"]["lengths"]
    n = len(res[0]["passkey"]["depths"]) * res[0]["passkey"]["samples"]
    acc = [sum(r["passkey"]["accuracy_by_length"][i] for r in res) / len(res) for i in range(len(lengths))]
    hits = [round(sum(r["passkey"]["accuracy_by_length"][i] * n for r in res)) for i in range(len(lengths))]
    ci = [wilson_interval(h, n * len(res)) for h in hits]
    rows.append({"variant": v, "seeds": [r["seed"] for r in res], "pattern": res[0]["pattern"],
                 "accuracy_by_length": acc, "ci95_by_length": ci,
                 "per_seed_mean_accuracy": [r["passkey"]["mean_accuracy"] for r in res],
                 "per_seed_beyond_window": [beyond_window_accuracy(r) for r in res],
                 "per_seed_pretrain_eval_loss": [(r.get("pretrain") or {}).get("final_eval_loss") for r in res],
                 "mean_loss": sum(r["ppl"]["mean_loss"] for r in res) / len(res),
                 "train_seconds": sum(r["seconds"]["train"] for r in res) / len(res)})
  pretrained = pretrained_passkeys(out, seeds)
  with open(os.path.join(out, "summary.json"), "w") as f:
    json.dump({"lengths": lengths, "variants": rows, "pretrained": pretrained}, f, indent=1)
  if not rows:
    return "no results yet"
  head = ("| variant | seeds | " + " | ".join(format_length(n) for n in lengths)
          + " | beyond window, per seed | loss | train s |")
  lines = [head, "|" + " --- |" * (len(lengths) + 5)]
  for r in rows:
    cells = [f"{a:.2f} [{lo:.2f}, {hi:.2f}]" for a, (lo, hi) in zip(r["accuracy_by_length"], r["ci95_by_length"])]
    beyond = " / ".join("-" if a is None else f"{a:.2f}" for a in r["per_seed_beyond_window"])
    lines.append(f"| {r['variant']} | {len(r['seeds'])} | " + " | ".join(cells)
                 + f" | {beyond} | {r['mean_loss']:.3f} | {r['train_seconds']:.0f} |")
  if pretrained:
    lines.append("\nThe pretrained all-full models (each seed's start), beyond window: " + ", ".join(
        f"seed {p['seed']} {'-' if p['beyond_window'] is None else format(p['beyond_window'], '.2f')}"
        for p in pretrained))
  text = "\n".join(lines)
  with open(os.path.join(out, "summary.md"), "w") as f:
    f.write("Pass-key accuracy by context length (mean over seeds [pooled 95% Wilson interval: sampling noise "
            "only]); beyond window: each seed's accuracy at the inner depths (0 < depth < 1: not the needle right "
            "after BOS nor the one right before the question) of prompts within the training length; loss: mean "
            "token loss by position over the ppl documents.\n\n" + text + "\n")
  return text


# GPU jobs run XLA's deterministic ops and no autotuning (a timing-dependent algorithm choice): two runs of
# the same seed on two GPU machines (2026-11-27) fed identical tokens, had identical step-1 losses, then
# differed in the last bit from step 2 (seed 2) or 17 (seed 1), and seed 2's ended on opposite sides of the
# retrieval transition (docs/reproduction.md). With these flags each seed's pretraining (one GPU) ended on the
# same eval loss to the last digit on three H200 machines in three sessions (2026-11-28). XLA_FLAGS set by the user come
# after these, so they win.
DETERMINISTIC_XLA_FLAGS = "--xla_gpu_deterministic_ops=true --xla_gpu_autotune_level=0"


def job_slots(gpus: list[str], workers: int) -> list[dict]:
  """The environment of each parallel job slot: one per listed GPU id (an id listed k times: k jobs on that
  GPU at once, none preallocating GPU memory then; deterministic XLA ops), else `workers` CPU slots. Under
  an outer CUDA_VISIBLE_DEVICES (scripts/gpu_jobs.sh gives each command one GPU) the ids index the GPUs it
  lists, as JAX's device ids would; an id past them is an error, not a silent jump to another job's GPU."""
  if not gpus:
    return [{"JAX_PLATFORMS": "cpu"}] * max(1, workers)
  outer = os.environ.get("CUDA_VISIBLE_DEVICES")
  if outer is not None:   # set, even to "" (no GPU at all)
    visible = [g.strip() for g in outer.split(",") if g.strip()]
    bad = [g for g in gpus if not (g.isdigit() and int(g) < len(visible))]
    if bad:
      raise ValueError(f"--gpus {','.join(bad)}: CUDA_VISIBLE_DEVICES={outer!r} shows {len(visible)} GPU(s)"
                       + (f", ids 0..{len(visible) - 1}" if visible else ""))
    gpus = [visible[int(g)] for g in gpus]
  shared = {"XLA_PYTHON_CLIENT_PREALLOCATE": "false"} if len(set(gpus)) < len(gpus) else {}
  flags = " ".join(f for f in (DETERMINISTIC_XLA_FLAGS, os.environ.get("XLA_FLAGS", "")) if f)
  return [dict(CUDA_VISIBLE_DEVICES=g, XLA_FLAGS=flags, **shared) for g in gpus]


def slot_env(slot: dict) -> dict:
  """A job's environment: this one with the slot's variables (job_slots) and this checkout first on
  PYTHONPATH; a GPU slot drops JAX_PLATFORMS (a "cpu" here must not keep its jobs off their GPU)."""
  env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **slot)
  if "CUDA_VISIBLE_DEVICES" in slot:
    env.pop("JAX_PLATFORMS", None)
  return env


def run_on_slots(items: list, fn, slots: list[dict], failures: list[str], deadline: float | None = None,
                 limit: float | None = None, durations: list[float] | None = None,
                 stopped: threading.Event | None = None, ready=None) -> list:
  """fn(item, env, slot) for every item, one at a time per slot (a GPU, or a CPU worker), slots in parallel;
  an exception is recorded in `failures` and the slot goes on with the next item. Each slot takes the first
  item in order that `ready(item)` allows: True starts it, False waits for a running item (one it depends
  on), None never (what it depends on failed); default: all ready. After `deadline` (a time.time()) no slot
  starts another item, nor one that the longest item so far says would end past `limit` (the longest of
  `durations`, this call's items added, and of the running items' times so far: a variant may start while
  the pretraining it waited for still runs), nor any once `stopped` is set; a Stopped item ends its slot.
  Returns the items never started or stopped."""
  pending = list(items)
  durations = [] if durations is None else durations
  ready = ready or (lambda item: True)
  cut, never = [], []
  running_since: list[float] = []   # the start times of the running items
  changed = threading.Condition()   # guards pending, running_since, durations; notified when an item ends

  def past_limits() -> bool:
    now = time.time()
    longest = max([*durations, *(now - t for t in running_since)], default=0.0)
    return ((deadline is not None and now >= deadline) or (stopped is not None and stopped.is_set())
            or (limit is not None and now + longest > limit))

  def take() -> tuple | None:
    """(the next item, its start time), or None: nothing more for this slot."""
    with changed:
      while True:
        if past_limits():
          return None
        for item in list(pending):
          verdict = ready(item)
          if verdict is None:
            pending.remove(item)
            never.append(item)
          elif verdict:
            pending.remove(item)
            running_since.append(t0 := time.time())
            return item, t0
        if not pending or not running_since:   # nothing left, or only items that nothing running can unblock
          return None
        changed.wait(timeout=1.0)         # a running item may unblock one; re-check the limits meanwhile

  def worker(extra: dict):
    env = slot_env(extra)
    while (taken := take()) is not None:
      item, t0 = taken
      finished = False
      try:
        fn(item, env, extra)
        finished = True
      except Stopped:
        cut.append(item)
        return
      except Exception as e:   # noqa: BLE001 - a failed job must not end its slot silently
        failures.append(f"{item}: {type(e).__name__}: {e}" if not isinstance(e, RuntimeError) else str(e))
        print(f"[reproduce] {failures[-1]}", file=sys.stderr)
        finished = True
      finally:
        with changed:   # its time counts before a waiting slot wakes to check the limit
          running_since.remove(t0)
          if finished:
            durations.append(time.time() - t0)
          changed.notify_all()

  threads = [threading.Thread(target=worker, args=(slot,)) for slot in slots]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  return cut + pending + never


def main(argv: list[str] | None = None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--variants", default="all", help=f"'all' or comma-separated names: {', '.join(variant_names())}")
  p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 for the contrasts asserted)")
  p.add_argument("--gpus", default="", help="comma-separated GPU ids (CUDA_VISIBLE_DEVICES), one job per listed id "
                                           "at a time; an id listed k times runs k jobs on that GPU at once")
  p.add_argument("--cpu-tiny", action="store_true", help="the CPU-sized experiment (configs/repro/base.py CPU_TINY); "
                                                           "on the CPU, or on GPUs with --gpus")
  p.add_argument("--workers", type=int, default=1, help="parallel jobs without --gpus")
  p.add_argument("--steps", type=int, default=0, help="override total_steps (smoke tests)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="a training-config override for every variant (e.g. data.synthetic.min_chars=1024)")
  p.add_argument("--stage", action="append", default=[], metavar="STEPS[:KEY=VALUE;...]",
                 help="a training stage before the main one (repeatable, in order; each starts from the "
                      "previous one's model): a curriculum, e.g. '500:data.synthetic.max_chars=1024'; "
                      "default: configs/repro/base.py STAGES (none with --cpu-tiny)")
  p.add_argument("--pretrain", default=None, metavar="STEPS[:KEY=VALUE;...]",
                 help="first train the all-full model once per seed (OUT/pretrain/seedS) and start every variant "
                      "from it, as LongGen converts a pretrained full-attention model; default: configs/repro/"
                      "base.py PRETRAIN (none with --cpu-tiny); 'none' for none")
  p.add_argument("--out", default="results/repro", help="results directory")
  for key in ("lengths", "depths", "samples"):
    p.add_argument(f"--{key}", default=None, help=f"override the pass-key {key} of configs/repro/base.py")
  p.add_argument("--stop-after", type=float, default=0, metavar="SECONDS",
                 help="start no job (pretraining or variant) later than SECONDS after the start, then summarize "
                      "and exit 3; re-running the same command continues (for machines lent by the call)")
  p.add_argument("--time-limit", type=float, default=0, metavar="SECONDS",
                 help="start no job the longest so far says would end past SECONDS after the start, and at SECONDS "
                      "stop the running ones (a training saves a checkpoint), summarize and exit 3; the same "
                      "command continues")
  p.add_argument("--dry-run", action="store_true", help="print every command, run nothing")
  p.add_argument("--write-inits", action="store_true",
                 help="only write the seeds' initial weights (OUT/init/seedS), on this process's JAX platform; the "
                      "runner calls this in a job's environment")
  args = p.parse_args(argv)
  global PROCESSES
  PROCESSES = JobProcesses()   # a fresh, unstopped set per call
  started = time.time()
  deadline = started + args.stop_after if args.stop_after > 0 else None
  limit = started + args.time_limit if args.time_limit > 0 else None

  names = variant_names()
  variants = names if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
  unknown = [v for v in variants if v not in names]
  if unknown:
    p.error(f"unknown variant(s) {unknown}; choose from {names}")
  try:
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    gpus = [g.strip() for g in args.gpus.split(",") if g.strip()]
  except ValueError:
    p.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
  if not seeds:
    p.error("give at least one seed")
  out = os.path.abspath(args.out)
  inits = {s: os.path.join(out, "init", f"seed{s}") for s in seeds}
  # variant by variant, each over all its seeds: a set cut short (a device budget) leaves whole variants with
  # every seed (contrasts that can be asserted) rather than every variant with one seed; list first the
  # variants that matter most
  jobs = [(v, s) for v in variants for s in seeds]
  ev = {k: getattr(args, k) for k in ("lengths", "depths", "samples") if getattr(args, k)}
  bad = [kv for kv in args.set if "=" not in kv]
  if bad:
    p.error(f"--set takes KEY=VALUE, got {bad}")
  sets = tuple(args.set)
  try:
    stages = tuple(map(parse_stage, args.stage))
  except ValueError as e:
    p.error(str(e))
  base = load_config_module(os.path.join(REPRO, "base.py"))
  if not args.stage and not args.cpu_tiny:
    stages = tuple((n, tuple(f"{k}={v}" for k, v in o.items())) for n, o in base.STAGES)
  pretrain = None
  if args.pretrain is not None and args.pretrain.lower() != "none":
    try:
      pretrain = parse_stage(args.pretrain)
    except ValueError as e:
      p.error(str(e).replace("a stage", "--pretrain"))
  elif args.pretrain is None and not args.cpu_tiny and base.PRETRAIN:
    pretrain = (base.PRETRAIN[0], tuple(f"{k}={v}" for k, v in base.PRETRAIN[1].items()))
  starts = {s: os.path.join(pretrain_dir(out, s), "model") for s in seeds} if pretrain else inits
  start_written = {s: os.path.join(starts[s], "config.json") for s in seeds}   # a model is written whole, atomically

  try:
    slots = job_slots(gpus, args.workers)
  except ValueError as e:
    p.error(str(e))
  def pretrain_commands(s: int) -> list[tuple[str, list[str]]]:
    """The seed's pretraining, then its model's pass-key grid (which side of the retrieval transition the
    variants start from, read directly)."""
    return [("pretraining", pretrain_command(s, out, inits[s], args.cpu_tiny, pretrain, sets)),
            ("pass-key of the pretrained model", evaluate_command(
                "passkey", starts[s], s, f"pretrained all_full, seed {s}", eval_settings(args.cpu_tiny, ev),
                args.cpu_tiny, pretrain_dir(out, s)))]

  if args.dry_run:
    for s in seeds if pretrain else ():
      for _, cmd in pretrain_commands(s):
        print(shlex.join(cmd))
    for v, s in jobs:
      for _, cmd in job_commands(v, s, out, starts[s], args.cpu_tiny, args.steps, ev, sets, stages):
        print(shlex.join(cmd))
    return 0

  if args.write_inits:
    import jax   # this child's client; the runner itself starts none
    for s in seeds:
      drawn = write_init(inits[s], s, args.cpu_tiny)
      print(f"[reproduce] {inits[s]}: " + (f"drawn on {jax.default_backend()}" if drawn else "exists, kept"))
    return 0
  failures = []

  pretrained = {}  # seed -> True once its model exists and pairs with the seed's finished variants, False if
                   # its pretraining failed or does not pair (this call)

  def pretrain_seed(s: int, env: dict, extra: dict):
    """pretrain_commands(s): the pretraining unless its model exists, then the grid unless one made of this
    model exists (grid_matches_pretraining). The seed's variants may start once the model is there and
    pairs with those finished before (recorded_pretrain_losses; the grid runs meanwhile); after a failed or
    unpairing pretraining none of them will."""
    d = pretrain_dir(out, s)
    os.makedirs(d, exist_ok=True)
    t0, ran = time.time(), False
    (_, pretraining), (grid_name, grid) = pretrain_commands(s)
    with open(os.path.join(d, "log.txt"), "a") as log:
      def run(cmd: list[str]) -> int:
        nonlocal ran
        ran = True
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        return PROCESSES.run(cmd, env, log)

      if not os.path.exists(start_written[s]):
        if run(pretraining):
          raise RuntimeError(f"pretraining of seed {s} failed; see {d}/log.txt")
        if not os.path.exists(start_written[s]):
          raise RuntimeError(f"pretraining of seed {s} exited 0 but wrote no model {starts[s]}; see {d}/log.txt")
      now, recorded = last_eval_loss(read_metrics(d)), recorded_pretrain_losses(out, s)
      if recorded and now not in recorded:
        raise RuntimeError(
            f"seed {s}: its pretraining ended on eval loss {now}, its finished variants in {out} started from one "
            f"that ended on {', '.join(map(str, sorted(recorded)))}: new variants would not pair with them, so "
            f"none of this seed's is run. If {inits[s]} was drawn on another platform than theirs (its log.txt says "
            f"where), remove it and {pretrain_dir(out, s)} so both are made again; to start the seed afresh "
            "instead, move its finished variants aside")
      pretrained[s] = True
      if not grid_matches_pretraining(d, now, lambda message: print(f"[reproduce] seed {s}: {message}",
                                                                  file=sys.stderr)):
        if run(grid):
          raise RuntimeError(f"{grid_name} of seed {s} failed; see {d}/log.txt")
        with open(os.path.join(d, GRID_OF), "w") as f:
          json.dump({"pretrain_final_eval_loss": now}, f)
    if ran:
      print(f"[reproduce] pretraining seed {s} ({extra}): {time.time() - t0:.0f} s", file=sys.stderr)

  def variant_job(job: tuple[str, int], env: dict, extra: dict):
    v, s = job
    if os.path.exists(os.path.join(out, v, f"seed{s}", "result.json")):
      print(f"[reproduce] {v} seed {s}: done before, skipped", file=sys.stderr)
      return
    t0 = time.time()
    r = run_job(v, s, out, starts[s], args.cpu_tiny, args.steps, env, ev, sets, stages, pretrain)
    acc = " ".join(f"{a:.2f}" for a in r["passkey"]["accuracy_by_length"])
    print(f"[reproduce] {v} seed {s} ({extra}): {time.time() - t0:.0f} s, pass-key by length {acc}",
          file=sys.stderr)

  all_jobs = list(jobs)
  watchdog = threading.Timer(limit - time.time(), PROCESSES.stop) if limit else None
  if watchdog:
    watchdog.daemon = True
    watchdog.start()
  # SIGTERM (`timeout`, a scheduler), SIGINT (Ctrl-C) and SIGHUP stop the set as the time limit does (the
  # jobs run in their own sessions, so nothing else would reach them); the handler runs in this thread while
  # it waits for the slots, so the stopping is handed to another thread. Only the main thread may set them.
  stop_signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
  previous = {}
  if threading.current_thread() is threading.main_thread():
    for sig in stop_signals:
      previous[sig] = signal.signal(sig, lambda *_: threading.Thread(target=PROCESSES.stop, daemon=True).start())
  durations = []   # every job's time so far, pretraining and variants: what --time-limit expects of the next

  def run_item(item: tuple, env: dict, extra: dict):
    if item[0] == "variant":
      return variant_job(item[1:], env, extra)
    try:
      pretrain_seed(item[1], env, extra)
    except Stopped:
      raise
    except Exception:   # raised before its model was accepted (failed, no model, does not pair, a log it
      pretrained.setdefault(item[1], False)   # cannot open): none of its seed's variants will run; after, they do
      raise

  def ready(item: tuple) -> bool | None:
    """A variant starts once its own seed's pretraining is done, not every seed's (a free GPU need not wait
    for another seed's); never, if that pretraining failed or does not pair."""
    if item[0] == "pretrain" or not pretrain:
      return True
    state = pretrained.get(item[2])
    return None if state is False else bool(state)

  try:
    if not write_inits(out, [s for s in seeds if not os.path.exists(os.path.join(inits[s], "config.json"))],
                       args.cpu_tiny, slot_env(slots[0])):
      return 1
    items = [("pretrain", s) for s in seeds] if pretrain else []
    run_on_slots(items + [("variant", v, s) for v, s in jobs], run_item, slots, failures, deadline, limit,
                 durations, PROCESSES.stopped, ready)
  except Stopped:   # while the initial weights were written: nothing ran, the same command starts again
    pass
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    if watchdog:
      watchdog.cancel()
  print(summarize(out, variants_with_results(out, variants), seeds))
  if failures:
    print(f"[reproduce] {len(failures)} job(s) failed", file=sys.stderr)
  left = [j for j in all_jobs if not os.path.exists(os.path.join(out, j[0], f"seed{j[1]}", "result.json"))
          and not (pretrain and pretrained.get(j[1]) is False)]   # a failed or unpairing pretraining's: failures
  if left and (PROCESSES.stopped.is_set() or limit or deadline):   # else only failures left them
    why = ("stopped" if PROCESSES.stopped.is_set() else
           f"--time-limit {args.time_limit:g} s" if limit else f"--stop-after {args.stop_after:g} s")
    print(f"[reproduce] {why}: {len(left)} job(s) not done (a stopped training resumes from its checkpoint); run "
          "the same command again to continue", file=sys.stderr)
  if failures:
    return 1
  return 3 if left else 0


if __name__ == "__main__":
  sys.exit(main())
