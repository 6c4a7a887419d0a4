"""The launch scripts parse, and the TPU pod script runs the user's command on every worker
(checked with DRY_RUN=1, which prints the gcloud commands instead of running them)."""

import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("launch/tpu_pod.sh", "launch/slurm_gpu.sbatch", "launch/gpu_box.sh")


@pytest.mark.parametrize("script", SCRIPTS)
def test_script_parses(script):
  subprocess.run(["bash", "-n", script], cwd=REPO, check=True)


def tpu(*args, **env):
  base = {k: v for k, v in os.environ.items() if k not in ("TPU_NAME", "ZONE", "PROJECT")}
  return subprocess.run(["bash", "launch/tpu_pod.sh", *args], cwd=REPO, text=True,
                        capture_output=True, env=dict(base, DRY_RUN="1", **env))


def test_tpu_pod_runs_the_same_command_on_all_workers():
  out = tpu("run", "--config=configs/imagenet.py", "--workdir=gs://bucket/run",
            TPU_NAME="pod", ZONE="us-central2-b")
  assert out.returncode == 0, out.stderr
  assert "tpu-vm ssh pod --zone=us-central2-b --worker=all" in out.stdout
  assert "RESGEN_DISTRIBUTED=auto" in out.stdout  # every worker joins the pod's processes
  assert "resgen_jax.main\\ --config=configs/imagenet.py\\ --workdir=gs://bucket/run" in (
      out.stdout)


def test_tpu_pod_names_what_is_missing_or_unknown():
  assert "set TPU_NAME" in tpu("create", ZONE="z").stderr
  out = tpu("launch", TPU_NAME="pod", ZONE="z")
  assert out.returncode == 2 and "unknown command 'launch'" in out.stderr
