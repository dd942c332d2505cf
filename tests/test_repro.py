"""The reproduction set (configs/repro, scripts/reproduce.py): every variant's config loads and validates
with the pattern its name promises, the CPU-tiny shrink keeps the fractions, the runner's commands are
the ones documented, a tiny job runs end to end, and the summary pools seeds correctly."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, process_gone
from longgen_jax.evaluation.common import wilson_interval
from longgen_jax.training.config import build_model_config, load_config_file, validate_config

REPRO = os.path.join(ROOT, "configs", "repro")
EXPECTED = {  # variant: (full layers of 12, sparse kind, placement)
    "all_full": (12, "sink_window", "middle"), "all_sparse_sink": (0, "sink_window", "middle"),
    "all_sparse_block": (0, "block_sparse", "middle"), "hybrid_third_middle": (4, "sink_window", "middle"),
    "hybrid_third_bottom": (4, "sink_window", "bottom"), "hybrid_third_top": (4, "sink_window", "top"),
    "hybrid_third_interleaved": (4, "sink_window", "interleaved"),
    "hybrid_sixth_middle": (2, "sink_window", "middle"), "hybrid_half_middle": (6, "sink_window", "middle"),
    "hybrid_third_middle_block": (4, "block_sparse", "middle"),
}


def _script():
  spec = importlib.util.spec_from_file_location("reproduce", os.path.join(ROOT, "scripts", "reproduce.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_every_variant_config_loads_validates_and_has_its_pattern():
  rep = _script()
  assert rep.variant_names() == sorted(EXPECTED)
  for name, (full, sparse, placement) in EXPECTED.items():
    cfg = load_config_file(os.path.join(REPRO, f"{name}.py"))
    validate_config(cfg)
    assert cfg.seq_len >= 8192 and cfg.data.source.startswith("retrieval(answer_weight=")
    mc = build_model_config(cfg, 259)
    specs = [str(s) for s in mc.layer_specs]
    assert len(specs) == 12 and sum(s == "full" for s in specs) == full
    assert all(s == "full" or s.startswith(sparse) for s in specs)
    if full == 4 and placement == "middle":
      assert specs[4:8] == ["full"] * 4
    if placement == "bottom":
      assert specs[:4] == ["full"] * 4
    if placement == "top":
      assert specs[-4:] == ["full"] * 4


def test_cpu_tiny_dry_run_prints_the_documented_commands(tmp_path):
  out = tmp_path / "r"
  p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--cpu-tiny", "--variants",
                      "all_full,hybrid_sixth_middle", "--seeds", "0,1", "--out", str(out), "--dry-run"],
                     capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert p.returncode == 0, p.stderr
  lines = p.stdout.splitlines()
  assert len(lines) == 2 * 2 * 3 and not out.exists()  # train, passkey, ppl per job; nothing written
  train = [line for line in lines if "longgen_jax.train" in line]
  # variant by variant, each over its seeds (a cut set keeps whole variants)
  assert [("num_full_layers=1 " in t, f"--config.seed={s}" in t) for t, s in zip(train, (0, 1, 0, 1))] == \
      [(False, True), (False, True), (True, True), (True, True)]
  assert f"--config.init_from={out}/init/seed1" in train[-1] and "--config.seed=1" in train[-1]
  assert "--config.model.num_full_layers=1 " in train[2]  # 1/6 of the tiny model's 6 layers
  assert "'--config.model.sparse_spec=sink_window(4,16)'" in train[2] and "--config.seq_len=256" in train[2]
  for line in train:  # every override is a real key of the variant's config
    cfg = load_config_file(os.path.join(REPRO, "all_full.py"))
    for flag in line.split(" --config.")[1:]:
      key = flag.strip("'").split("=")[0]
      node = cfg
      for k in key.split("."):
        node = node[k]
  passkey = [line for line in lines if " passkey " in line]
  assert "--max-seq-len 512" in passkey[0] and f"--out {out}/all_full/seed0/passkey.json" in passkey[0]
  with_pretrain = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--cpu-tiny",
                                  "--variants", "all_full", "--seeds", "0", "--pretrain", "5", "--out", str(out),
                                  "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert with_pretrain.returncode == 0, with_pretrain.stderr
  first, second = with_pretrain.stdout.splitlines()[:2]   # the pretraining, then its model's pass-key grid
  assert "longgen_jax.train" in first and f"--workdir={out}/pretrain/seed0 " in first
  assert f" passkey --ckpt {out}/pretrain/seed0/model " in second
  assert f"--out {out}/pretrain/seed0/passkey.json" in second
  bad = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--variants", "nope",
                        "--dry-run"], capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert bad.returncode == 2 and "unknown variant(s) ['nope']" in bad.stderr


def test_a_tiny_job_runs_end_to_end(tmp_path):
  out = tmp_path / "r"
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--cpu-tiny", "--variants",
         "hybrid_third_middle", "--seeds", "3", "--steps", "2", "--lengths", "128", "--depths", "0.5",
         "--samples", "2", "--out", str(out), "--stage", "2:data.synthetic.max_chars=150;optim.lr=1e-3",
         "--pretrain", "3:optim.lr=2e-3"]
  p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  job = out / "hybrid_third_middle" / "seed3"
  res = json.loads((job / "result.json").read_text())
  assert res["steps"] == 2 and res["seed"] == 3 and res["train_seq_len"] == 256
  assert res["pattern"] == ["sink_window(4,16)", "sink_window(4,16)", "full", "full", "sink_window(4,16)",
                            "sink_window(4,16)"]
  assert res["passkey"]["lengths"] == [128] and (job / "passkey.png").exists() and (job / "ppl.png").exists()
  assert "| hybrid_third_middle | 1 |" in (out / "summary.md").read_text()
  # the shared pretraining (the all-full model) ran first, then the curriculum stage from it, with its
  # overrides, then the main training from the stage's model
  pretrained = out / "pretrain" / "seed3"
  pre = json.loads((pretrained / "config.json").read_text())
  assert pre["model"]["layer_specs"] == ["full"] * 6 and pre["train"]["total_steps"] == 3
  assert pre["train"]["optim"]["lr"] == 2e-3 and pre["train"]["init_from"] == str(out / "init" / "seed3")
  pre_evals = [m["eval_loss"] for line in (pretrained / "metrics.jsonl").read_text().splitlines()
               if (m := json.loads(line)).get("eval_loss") is not None]
  assert pre_evals and res["pretrain"] == {"steps": 3, "overrides": ["optim.lr=2e-3"], "model": str(pretrained / "model"),
                                           "final_eval_loss": pre_evals[-1]}
  summary = json.loads((out / "summary.json").read_text())
  assert summary["variants"][0]["per_seed_pretrain_eval_loss"] == [pre_evals[-1]]
  # the pretrained model's own pass-key grid (the set's evaluation, with this run's overrides)
  pre_passkey = json.loads((pretrained / "passkey.json").read_text())
  assert pre_passkey["lengths"] == [128] and pre_passkey["depths"] == [0.5] and pre_passkey["samples"] == 2
  assert summary["pretrained"] == [{"seed": 3, "accuracy_by_length": pre_passkey["accuracy_by_length"],
                                    "beyond_window": pre_passkey["accuracy"][0][0]}]   # 128 <= 256, depth 0.5
  assert "pretrained all-full models (each seed's start), beyond window: seed 3 " in (out / "summary.md").read_text()
  assert res["stages"] == [{"steps": 2, "overrides": ["data.synthetic.max_chars=150", "optim.lr=1e-3"]}]
  stage = json.loads((job / "stage1" / "config.json").read_text())
  assert stage["train"]["init_from"] == str(pretrained / "model")
  assert stage["train"]["total_steps"] == 2 and stage["train"]["data"]["synthetic"]["max_chars"] == 150
  main = json.loads((job / "train" / "config.json").read_text())
  assert main["train"]["init_from"] == str(job / "stage1" / "model")
  assert main["train"]["data"]["synthetic"]["max_chars"] != 150
  (pretrained / "passkey.json").unlink()   # a pretrained model without its grid: only the grid runs again
  again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
  assert again.returncode == 0 and "done before, skipped" in again.stderr  # re-running continues a set
  assert (pretrained / "passkey.json").exists()
  log = (pretrained / "log.txt").read_text()
  assert log.count("longgen_jax.train") == 1 and log.count("longgen_jax.evaluate passkey") == 2
  assert json.loads((pretrained / "passkey_of.json").read_text()) == {"pretrain_final_eval_loss": pre_evals[-1]}
  # a fresh machine with a recorded grid (only the grid, its sidecar and the log left): the pretraining runs
  # again from scratch, ends on the same eval loss, and keeps the grid; a grid made of another pretraining's
  # model is made again
  import shutil
  for made_of, grids, said in ((pre_evals[-1], 2, "kept"), (pre_evals[-1] + 1e-9, 3, "made again")):
    for path in pretrained.iterdir():
      if path.name not in ("passkey.json", "passkey_of.json", "log.txt"):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    (pretrained / "passkey_of.json").write_text(json.dumps({"pretrain_final_eval_loss": made_of}))
    rerun = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert rerun.returncode == 0 and (pretrained / "model" / "config.json").exists(), rerun.stderr[-2000:]
    log = (pretrained / "log.txt").read_text()
    last_training = [run for run in log.split("\n$ ") if "longgen_jax.train" in run.split("\n")[0]][-1]
    assert "[train] step" in last_training and "resumed" not in last_training   # trained from scratch
    assert log.count("longgen_jax.evaluate passkey") == grids and said in rerun.stderr, (made_of, rerun.stderr[-2000:])
  assert log.count("longgen_jax.train") == 3
  assert json.loads((pretrained / "passkey_of.json").read_text()) == {"pretrain_final_eval_loss": pre_evals[-1]}
  # a finished variant of this seed that started from another pretraining (recorded elsewhere, copied in):
  # new variants would not pair with it, so the seed's are not run
  res["pretrain"]["final_eval_loss"] = pre_evals[-1] + 1e-9
  (job / "result.json").write_text(json.dumps(res))
  unpaired = subprocess.run([*cmd[:4], "hybrid_third_middle,all_full", *cmd[5:], "--time-limit", "600"],
                            capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
  assert unpaired.returncode == 1 and "would not pair" in unpaired.stderr, unpaired.stderr[-2000:]
  assert "run the same command again" not in unpaired.stderr   # a re-run would not run them either
  assert not (out / "all_full").exists()


def test_stage_syntax():
  rep = _script()
  assert rep.parse_stage("500") == (500, ())
  assert rep.parse_stage("300:data.source=retrieval(answer_weight=8, kv_fraction=0); optim.lr=3e-3") == (
      300, ("data.source=retrieval(answer_weight=8, kv_fraction=0)", "optim.lr=3e-3"))
  for bad in ("", "0", "x:a=1", "10:lr"):
    with pytest.raises(ValueError, match="STEPS"):
      rep.parse_stage(bad)


def test_summary_pools_seeds(tmp_path):
  rep = _script()
  # [length][depth] accuracies at depths 0, 0.5, 1 of lengths 128 (the training length) and 256
  for seed, grid in ((0, [[1.0, 1.0, 1.0], [0.2, 0.0, 0.4]]), (1, [[0.8, 0.6, 1.0], [0.0, 0.0, 0.0]])):
    job = tmp_path / "v" / f"seed{seed}"
    job.mkdir(parents=True)
    acc = [sum(row) / 3 for row in grid]
    (job / "result.json").write_text(json.dumps({
        "seed": seed, "pattern": ["full"], "seconds": {"train": 10.0}, "ppl": {"mean_loss": 1.0 + seed},
        "train_seq_len": 128,
        "passkey": {"lengths": [128, 256], "depths": [0, 0.5, 1], "samples": 5, "accuracy": grid,
                    "accuracy_by_length": acc, "mean_accuracy": sum(acc) / 2}}))
  text = rep.summarize(str(tmp_path), ["v", "missing"], [0, 1])
  summary = json.loads((tmp_path / "summary.json").read_text())
  (row,) = summary["variants"]
  assert row["accuracy_by_length"] == pytest.approx([0.9, 0.1]) and row["mean_loss"] == 1.5
  assert row["per_seed_pretrain_eval_loss"] == [None, None]   # these runs had no pretraining
  lo, hi = wilson_interval(27, 30)  # 15 + 12 of 2 x 15 samples at 128 tokens
  assert row["ci95_by_length"][0] == pytest.approx([lo, hi])
  # beyond the window: depth 0.5 only (not the sink's 0 nor the window's 1), at 128 only (not past training)
  assert row["per_seed_beyond_window"] == pytest.approx([1.0, 0.6])
  assert "| v | 2 | 0.90 [" in text and "| 1.00 / 0.60 |" in text and "missing" not in text
  # no such cell (only longer prompts, or only depths 0 and 1): no figure, and the summary still writes
  assert rep.beyond_window_accuracy({"train_seq_len": 64, "passkey": {"lengths": [128], "depths": [0.5],
                                                                      "accuracy": [[1.0]]}}) is None


def test_summary_keeps_earlier_variants_of_the_directory(tmp_path):
  """A second run adding a variant to a results directory summarizes both (it used to drop the first)."""
  rep = _script()
  for v in ("hybrid", "all_full"):
    job = tmp_path / v / "seed0"
    job.mkdir(parents=True)
    (job / "result.json").write_text("{}")
  (tmp_path / "pretrain" / "seed0").mkdir(parents=True)   # no result.json: not a variant
  assert rep.variants_with_results(str(tmp_path), ["all_full"]) == ["all_full", "hybrid"]


def test_job_slots_share_a_gpu_without_preallocating(monkeypatch):
  rep = _script()
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  assert rep.job_slots([], 2) == [{"JAX_PLATFORMS": "cpu"}] * 2
  det = rep.DETERMINISTIC_XLA_FLAGS
  assert "--xla_gpu_deterministic_ops=true" in det
  assert rep.job_slots(["0", "1"], 1) == [{"CUDA_VISIBLE_DEVICES": "0", "XLA_FLAGS": det},
                                          {"CUDA_VISIBLE_DEVICES": "1", "XLA_FLAGS": det}]
  monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=4")   # the user's flags come last: they win
  assert rep.job_slots(["0"], 1)[0]["XLA_FLAGS"] == det + " --xla_gpu_autotune_level=4"
  shared = rep.job_slots(["0", "0", "1"], 1)
  assert [s["CUDA_VISIBLE_DEVICES"] for s in shared] == ["0", "0", "1"]
  assert all(s["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false" for s in shared)


def test_job_slots_index_an_outer_cuda_visible_devices(monkeypatch):
  """Inside scripts/gpu_jobs.sh (CUDA_VISIBLE_DEVICES=3 for its fourth command) --gpus 0,0 means that GPU
  twice, not physical GPU 0 (another command's)."""
  rep = _script()
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
  assert [s["CUDA_VISIBLE_DEVICES"] for s in rep.job_slots(["0", "0"], 1)] == ["3", "3"]
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
  assert [s["CUDA_VISIBLE_DEVICES"] for s in rep.job_slots(["1", "0"], 1)] == ["5", "2"]
  with pytest.raises(ValueError, match="ids 0..1"):
    rep.job_slots(["2"], 1)
  monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")   # set to nothing: no GPU, not "every GPU"
  with pytest.raises(ValueError, match="shows 0 GPU"):
    rep.job_slots(["0"], 1)
  assert rep.job_slots([], 2) == [{"JAX_PLATFORMS": "cpu"}] * 2


def test_slots_start_nothing_after_the_deadline_and_return_what_was_left():
  """--stop-after: a slot takes no item once the deadline has passed (the running one finishes); the items
  never started come back, and re-running them is the caller's continuation."""
  import time
  rep = _script()
  ran, failures = [], []
  left = rep.run_on_slots([1, 2, 3], lambda item, env, slot: ran.append(item), [{}] * 2, failures,
                          deadline=time.time() - 1)
  assert ran == [] and sorted(left) == [1, 2, 3]

  def slow(item, env, slot):   # the first item outlasts the deadline: nothing after it starts
    ran.append(item)
    time.sleep(0.3)
  left = rep.run_on_slots([1, 2, 3], slow, [{}], failures, deadline=time.time() + 0.1)
  assert ran == [1] and left == [2, 3] and not failures
  ran.clear()
  assert rep.run_on_slots([1, 2, 3], lambda item, env, slot: ran.append(item), [{}], failures) == []
  assert ran == [1, 2, 3]


def test_stop_after_exits_3_and_names_the_jobs_left(tmp_path):
  p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--cpu-tiny", "--variants",
                      "all_full", "--seeds", "0", "--steps", "1", "--stop-after", "0.001", "--out", str(tmp_path)],
                     capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT), timeout=300)
  assert p.returncode == 3, p.stderr[-2000:]
  assert "--stop-after 0.001 s: 1 job(s) not done" in p.stderr and not (tmp_path / "all_full").exists()


def test_the_initial_weights_are_drawn_in_a_child_with_the_first_job_s_environment(tmp_path, monkeypatch):
  """On its GPU (from CPU-drawn weights the recorded pretrainings ended elsewhere), and not by the runner,
  whose JAX client would take memory on the jobs' GPUs."""
  reproduce, ran = _script(), []
  monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")   # a GPU job must not inherit it
  monkeypatch.setattr(reproduce.JobProcesses, "run", lambda self, cmd, env, log: ran.append((cmd, env)) or 0)
  monkeypatch.setattr(reproduce, "run_on_slots", lambda *a, **k: [])
  reproduce.main(["--variants", "all_full", "--seeds", "0,1", "--gpus", "2,3", "--out", str(tmp_path)])
  (cmd, env), = ran
  assert cmd[1:] == [os.path.join(ROOT, "scripts", "reproduce.py"), "--write-inits", "--seeds", "0,1", "--out",
                     str(tmp_path)]
  assert env["CUDA_VISIBLE_DEVICES"] == "2" and "deterministic_ops" in env["XLA_FLAGS"]
  assert "JAX_PLATFORMS" not in env
  # the child writes them (here on the CPU, at the tiny size); an existing one is not drawn again
  child = subprocess.run([*cmd[:4], "1", *cmd[5:], "--cpu-tiny"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), timeout=120)
  assert child.returncode == 0 and (tmp_path / "init" / "seed1" / "config.json").exists(), child.stderr[-2000:]
  assert f"{tmp_path / 'init' / 'seed1'}: drawn on cpu" in child.stdout
  again = subprocess.run([*cmd[:4], "1", *cmd[5:], "--cpu-tiny"], capture_output=True, text=True, cwd=ROOT,
                         env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), timeout=120)
  assert f"{tmp_path / 'init' / 'seed1'}: exists, kept" in again.stdout, again.stderr[-2000:]
  ran.clear()
  reproduce.main(["--cpu-tiny", "--variants", "all_full", "--seeds", "1", "--out", str(tmp_path)])
  assert ran == []


def test_eval_settings_fit_the_longest_prompt_and_its_answer():
  """Both eval settings pass `evaluate passkey`'s own argument check on their model with their
  --max-seq-len (the GPU set's first 8K pilot stopped there: 16K prompts with --max-seq-len 16K)."""
  from longgen_jax.data.tokenizer import ByteTokenizer
  from longgen_jax.evaluate import parse_length, parse_list
  from longgen_jax.evaluation.passkey import check_passkey_args
  from longgen_jax.model.config import ModelConfig
  base = _script().load_config_module(os.path.join(REPRO, "base.py"))
  for model, ev in ((base.MODEL, base.EVAL), (base.CPU_TINY["model"], base.CPU_TINY["eval"])):
    cfg = ModelConfig(**dict(model, max_seq_len=parse_length(ev["max_seq_len"])))
    check_passkey_args(cfg, ByteTokenizer(), parse_list(ev["lengths"], parse_length),
                       parse_list(ev["depths"], float), ev["samples"], ev["batch_size"])


def test_slots_start_an_item_as_soon_as_what_it_waits_for_is_done():
  """A variant waits for its own seed's pretraining only: with two slots, j1 (after p1) runs while p2 is still
  running; j3 after a failed p3 never runs, and one waiting for an item nobody runs does not hang the set."""
  import threading
  import time
  rep = _script()
  done, log, failures = set(), [], []
  lock = threading.Lock()

  def fn(item, env, slot):
    with lock:
      log.append(("start", item))
    if item == "p3":
      raise RuntimeError("p3 failed")
    time.sleep({"p1": 0.05, "p2": 0.6}.get(item, 0.05))
    with lock:
      log.append(("end", item))
      done.add(item)

  def ready(item):
    dep = {"j1": "p1", "j2": "p2", "j3": "p3", "j4": "p9"}.get(item)
    if dep is None or dep in done:
      return True
    return None if dep == "p3" and ("start", "p3") in log else False

  t0 = time.time()
  left = rep.run_on_slots(["p1", "p2", "p3", "j1", "j2", "j3", "j4"], fn, [{}] * 2, failures, ready=ready)
  assert time.time() - t0 < 5
  assert log.index(("end", "j1")) < log.index(("end", "p2"))   # j1 did not wait for p2
  assert log.index(("end", "p2")) < log.index(("start", "j2"))
  assert sorted(left) == ["j3", "j4"] and failures == ["p3 failed"]
  assert ("start", "j3") not in log and ("start", "j4") not in log


def test_a_failed_pretraining_runs_none_of_its_variants_and_exits_1(tmp_path):
  p = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--cpu-tiny", "--variants",
                      "all_full,all_sparse_sink", "--seeds", "0", "--pretrain", "1:batch_size=0", "--out",
                      str(tmp_path)], capture_output=True, text=True, cwd=ROOT,
                     env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT), timeout=120)
  assert p.returncode == 1 and "pretraining of seed 0 failed" in p.stderr, p.stderr[-2000:]
  assert not (tmp_path / "all_full").exists() and not (tmp_path / "all_sparse_sink").exists()


def test_the_limit_counts_a_running_item_s_time_so_far():
  """A variant may start while the pretraining it waited for still runs (its model written, its grid not):
  that item's time so far is a lower bound on an item's length, so the limit sees it although no item has
  finished: the waiting slot re-checks after ~1 s, when p has run 1 s and 1 s more would end past the 1.5 s
  limit (counting finished items only, j would start)."""
  import threading
  import time
  rep = _script()
  written, j_waits, ran, failures = threading.Event(), threading.Event(), [], []

  def fn(item, env, slot):
    ran.append(item)
    if item == "p":
      j_waits.wait(timeout=0.5)   # the other slot has found j blocked and waits (a stalled slot must not
      written.set()               # find j already ready on its first look)
      time.sleep(1.3)

  def ready(item):
    if item == "p" or written.is_set():
      return True
    j_waits.set()
    return False

  left = rep.run_on_slots(["p", "j"], fn, [{}] * 2, failures, limit=time.time() + 1.5, ready=ready)
  assert ran == ["p"] and left == ["j"] and not failures


def test_slots_start_no_item_the_longest_so_far_says_would_end_past_the_limit():
  import time
  rep = _script()
  ran, failures = [], []

  def slow(item, env, slot):
    ran.append(item)
    time.sleep(0.3)
  left = rep.run_on_slots([1, 2, 3], slow, [{}], failures, limit=time.time() + 0.5)
  assert ran == [1] and left == [2, 3] and not failures   # 0.3 s done, another 0.3 s would end past 0.5 s
  ran.clear()
  assert rep.run_on_slots([1, 2], slow, [{}], failures, limit=time.time() + 5) == [] and ran == [1, 2]


@pytest.mark.parametrize("script", [
    "trap '' TERM; sleep 60 & echo $! > {pid}; wait",           # the whole group ignores SIGTERM
    "(trap '' TERM; exec sleep 60) & echo $! > {pid}; wait"])   # the leader exits on it, its child does not
def test_stopping_the_set_kills_each_job_s_process_group_and_is_not_a_failure(tmp_path, script):
  """stop(): SIGTERM to every running job's process group, SIGKILL after the grace period to every member
  left; the job's runner raises Stopped, so does every later run; run_on_slots hands the stopped item back
  as not done, and a job that ended before the stop keeps its status."""
  import threading
  import time
  rep = _script()
  procs = rep.JobProcesses()
  assert procs.run(["bash", "-c", "exit 4"], dict(os.environ), subprocess.DEVNULL) == 4
  pid_file = tmp_path / "pid"
  outcome = []

  def job(item, env, slot):
    with open(tmp_path / "log", "w") as log:
      procs.run(["bash", "-c", script.format(pid=pid_file)], dict(os.environ), log)
    outcome.append("finished")

  failures = []
  t = threading.Thread(target=lambda: outcome.append(rep.run_on_slots(["a", "b"], job, [{}], failures)))
  t.start()
  for _ in range(200):
    if pid_file.exists() and pid_file.read_text().strip():
      break
    time.sleep(0.05)
  child = int(pid_file.read_text())
  t0 = time.time()
  procs.stop(grace=0.5)
  t.join(timeout=10)
  assert not t.is_alive() and time.time() - t0 < 5
  assert outcome == [["a", "b"]] and not failures   # "a" stopped, "b" never started: both left
  assert process_gone(child), "the job's child outlived the stop"
  with pytest.raises(rep.Stopped):
    procs.run(["true"], dict(os.environ), subprocess.DEVNULL)


def test_a_job_that_raises_is_a_failure_and_its_slot_goes_on():
  rep = _script()
  failures, ran = [], []

  def job(item, env, slot):
    ran.append(item)
    if item == 1:
      raise FileNotFoundError("passkey.json")
  assert rep.run_on_slots([1, 2], job, [{}], failures) == [] and ran == [1, 2]
  assert failures == ["1: FileNotFoundError: passkey.json"]


@pytest.mark.parametrize("how", ["time_limit", "sigterm", "sigint"])
def test_a_set_stopped_mid_training_saves_its_checkpoint_summarizes_and_exits_3(tmp_path, how):
  """--time-limit, or SIGTERM (`timeout`) or SIGINT (Ctrl-C) to the runner: the running training gets SIGTERM (and, once it
  is stepping, saves a checkpoint), the summary of the finished jobs is written, the exit status is 3 and
  the job is left for the next run."""
  import signal
  import time
  out = tmp_path / "r"
  done = out / "all_sparse_sink" / "seed0"   # a job finished by an earlier run: the summary must show it
  done.mkdir(parents=True)
  (done / "result.json").write_text(json.dumps({
      "seed": 0, "pattern": ["sink_window(4,16)"] * 6, "seconds": {"train": 1.0}, "ppl": {"mean_loss": 1.0},
      "passkey": {"lengths": [128], "depths": [0.5], "samples": 2, "accuracy_by_length": [0.5],
                  "mean_accuracy": 0.5}}))
  cmd = [sys.executable, os.path.join(ROOT, "scripts", "reproduce.py"), "--cpu-tiny", "--variants", "all_full",
         "--seeds", "0", "--steps", "100000", "--pretrain", "none", "--set", "log_every=1", "--out", str(out)]
  if how == "time_limit":
    cmd += ["--time-limit", "20"]
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                       env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
  log = out / "all_full" / "seed0" / "log.txt"
  if how in ("sigterm", "sigint"):
    metrics = out / "all_full" / "seed0" / "train" / "metrics.jsonl"
    for _ in range(1800):   # until the training has logged its first steps
      if metrics.exists() and metrics.read_text().count("\n") >= 2:
        break
      time.sleep(0.1)
    p.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGINT)
  try:
    stdout, stderr = p.communicate(timeout=240)
  finally:   # a hung runner: stop it and, through it, its job
    if p.poll() is None:
      p.terminate()
      p.communicate(timeout=60)
  assert p.returncode == 3, stderr[-3000:]
  assert "stopped: 1 job(s) not done" in stderr
  if how != "time_limit":   # stopped mid-training (a time limit may also fall before the first step)
    assert "SIGTERM: saved step" in log.read_text()
  assert "| all_sparse_sink | 1 | 0.50" in (out / "summary.md").read_text()
  assert not (out / "all_full" / "seed0" / "result.json").exists()


def test_reproduce_call_copies_recorded_results_in_and_packs_the_small_files(tmp_path):
  """scripts/reproduce_call.sh: a recorded VARIANT/seedS/ (with result.json) lands in the results directory
  and reproduce.py skips its job; an unfinished one (no result.json) is not copied; a recorded pretrained
  model's grid (pretrain/seedS/passkey.json, .png) is copied in with the eval loss its pretraining ended on
  (passkey_of.json), not without it; the archive holds the
  summary and the small files, no model; bad arguments exit 2 before anything runs."""
  import shutil
  import tarfile
  recorded = tmp_path / "recorded"
  (recorded / "all_full" / "seed0" / "train" / "model").mkdir(parents=True)
  shutil.copy(os.path.join(ROOT, "docs", "reproduction", "gpu_8k_set", "all_full", "seed0", "result.json"),
              recorded / "all_full" / "seed0" / "result.json")
  (recorded / "all_full" / "seed0" / "train" / "model" / "config.json").write_text("{}")
  (recorded / "all_sparse_sink" / "seed0").mkdir(parents=True)
  (recorded / "all_sparse_sink" / "seed0" / "log.txt").write_text("cut off")
  for seed in (0, 1):   # pretrained models' recorded grids: seed 1's without the loss its model ended on
    (recorded / "pretrain" / f"seed{seed}").mkdir(parents=True)
    (recorded / "pretrain" / f"seed{seed}" / "passkey.json").write_text('{"recorded": true}')
    (recorded / "pretrain" / f"seed{seed}" / "passkey.png").write_bytes(b"png")
    (recorded / "pretrain" / f"seed{seed}" / "log.txt").write_text("not copied")
  (recorded / "pretrain" / "seed0" / "passkey_of.json").write_text('{"pretrain_final_eval_loss": 0.5}')
  out = tmp_path / "res" / "repro"
  env = dict(os.environ, REPRODUCE_OUT=str(out), REPRODUCE_ARGS="--cpu-tiny --variants all_full",
             PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
  script = os.path.join(ROOT, "scripts", "reproduce_call.sh")
  p = subprocess.run(["bash", script, "0", "", "300", str(tmp_path / "call" / "a.tgz"), str(recorded)],
                     capture_output=True, text=True, env=env, timeout=600)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "all_full seed 0: done before, skipped" in p.stderr
  assert not (out / "all_sparse_sink").exists()
  assert (out / "pretrain" / "seed0" / "passkey.json").read_text() == '{"recorded": true}'
  pre0 = out / "pretrain" / "seed0"
  assert (pre0 / "passkey_of.json").exists() and (pre0 / "passkey.png").exists()
  assert not (out / "pretrain" / "seed0" / "log.txt").exists() and not (out / "pretrain" / "seed1").exists()
  with tarfile.open(tmp_path / "call" / "a.tgz") as tar:
    names = tar.getnames()
  assert {"repro/all_full/seed0/result.json", "repro/summary.md"} <= set(names)
  assert not any("/train/" in n or "/init/" in n for n in names)
  for args in (["0", "", "60", str(tmp_path / "b.tgz"), str(tmp_path / "nonesuch")],   # a mistyped directory
               ["0", ""]):                                                             # too few arguments
    p = subprocess.run(["bash", script, *args], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and not (tmp_path / "b.tgz").exists(), p.stderr
