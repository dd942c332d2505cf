"""scripts/gpu_jobs.sh: commands side by side, one GPU id each, a time limit, one archive back."""

import os
import subprocess
import tarfile

from conftest import ROOT


def test_jobs_run_side_by_side_with_their_gpu_and_limit_and_come_back_in_one_archive(tmp_path):
  out = tmp_path / "r"
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  p = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_jobs.sh"), "3", str(out),
                      'echo gpu=$CUDA_VISIBLE_DEVICES; echo kept > $JOB_OUT/a.txt; head -c 5000000 /dev/zero > $JOB_OUT/big',
                      "echo gpu=$CUDA_VISIBLE_DEVICES; sleep 30"],
                     capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
  assert p.returncode == 0, p.stderr
  assert not out.exists() and (tmp_path / "r.tgz").exists()
  with tarfile.open(tmp_path / "r.tgz") as tar:
    read = lambda name: tar.extractfile(f"r/{name}").read().decode()
    job0, job1 = read("job0.txt"), read("job1.txt")
    assert "gpu=0" in job0 and "[gpu_jobs] exit 0" in job0
    assert "gpu=1" in job1 and "[gpu_jobs] exit 124" in job1        # stopped at the limit
    assert read("job0/a.txt") == "kept\n"
    assert "job0/big" in read("left_out.txt") and "r/job0/big" not in tar.getnames()   # over 4 MB
