"""Two processes on this machine (loopback coordinator, gloo collectives) train like one.

The command line is the user's: ``python -m resgen_jax.main ... --coordinator_address=...
--num_processes=2 --process_id=i`` in each process, 2 CPU devices each, with a 2x2
data x FSDP mesh over the 4 global devices. The reference is one process with 4 devices
and a data-parallel mesh. The test starts and always stops both processes itself.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import CHILD_JAX_ENV
from resgen_jax.train import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 400  # both processes together take ~45 s on 2 cores
TINY = [
    "--config=configs/digits.py", "--config.stages=('tokenizer',)",
    "--config.tokenizer.model.channels=8", "--config.tokenizer.model.latent_dim=4",
    "--config.tokenizer.model.norm_groups=4", "--config.tokenizer.quantizer.depth=2",
    "--config.tokenizer.quantizer.codebook_size=8", "--config.tokenizer.train.num_steps=6",
    "--config.tokenizer.train.warmup_steps=1", "--config.tokenizer.train.log_every=2",
    "--config.tokenizer.train.eval_every=0", "--config.tokenizer.train.batch_size=8",
    "--config.tokenizer.train.checkpoint_every=3", "--config.tokenizer.train.eval_examples=64",
    # the reconstruction-FID classifier trains in every process; a few steps exercise it
    "--config.evaluation.classifier_steps=20",
]
FSDP = ["--config.mesh.axes=('data','fsdp')", "--config.mesh.shape=(2,2)",
        "--config.mesh.fsdp_min_size=64"]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(args, devices):
  env = dict(os.environ, JAX_PLATFORMS="cpu", **CHILD_JAX_ENV,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  for name in (distributed.ENV_ADDRESS, distributed.ENV_COUNT, distributed.ENV_ID,
               distributed.ENV_AUTO):
    env.pop(name, None)
  return subprocess.Popen([sys.executable, "-m", "resgen_jax.main", *args], cwd=REPO,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs):
  """Waits for every process; kills all of them if any fails or overruns."""
  try:
    outputs = [p.communicate(timeout=TIMEOUT_S)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, out in zip(procs, outputs):
    assert p.returncode == 0, out[-4000:]


def rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  single, multi = str(root / "single"), str(root / "multi")
  address = f"127.0.0.1:{free_port()}"
  procs = [start([*TINY, *FSDP, f"--workdir={multi}", f"--coordinator_address={address}",
                  "--num_processes=2", f"--process_id={i}"], devices=2) for i in range(2)]
  procs.append(start([*TINY, f"--workdir={single}"], devices=4))
  finish(procs)
  return single, multi


def test_two_processes_train_like_one(runs):
  single, multi = runs
  a, b = rows(single), rows(multi)
  assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6, 6]  # one writer
  for ra, rb in zip(a, b):
    for key in ra:
      if key.startswith(("train/", "eval/")) and key != "train/steps_per_sec":
        np.testing.assert_allclose(rb[key], ra[key], rtol=1e-5, err_msg=key)
  with open(os.path.join(multi, "tokenizer", "results.json")) as f:
    psnr = json.load(f)["psnr_by_depth"]
  assert psnr[1] > psnr[0]


def test_multi_process_fsdp_checkpoint_encodes_in_one_process(runs):
  _, multi = runs
  proc = start([*TINY, f"--workdir={multi}", "--mode=encode"], devices=1)
  finish([proc])
  tokens = os.listdir(os.path.join(multi, "tokens"))
  assert "meta.json" in tokens and any(name.startswith("train.") for name in tokens)


@pytest.mark.parametrize("args, env, expected", [
    ((None, None, None), {}, None),
    (("h:1", 2, 1), {}, dict(coordinator_address="h:1", num_processes=2, process_id=1)),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:2", "JAX_NUM_PROCESSES": "4",
                          "JAX_PROCESS_ID": "3"},
     dict(coordinator_address="h:2", num_processes=4, process_id=3)),
    ((None, None, None), {"SLURM_NTASKS": "8"}, {}),
    ((None, None, None), {"SLURM_NTASKS": "1"}, None),
    ((None, None, None), {"TPU_WORKER_HOSTNAMES": "w0,w1,w2,w3"}, {}),
    ((None, None, None), {"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ((None, None, None), {"RESGEN_DISTRIBUTED": "auto"}, {}),
])
def test_distributed_settings_come_from_flags_env_or_cluster(args, env, expected):
  assert distributed.resolve(*args, env) == expected


@pytest.mark.parametrize("args, env, message", [
    (("h:1", None, None), {}, "needs the process count"),
    (("h:1", 2, 2), {}, "must lie in"),
    ((None, 2, 0), {}, "without a coordinator"),
    ((None, None, None), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "two",
                          "JAX_PROCESS_ID": "0"}, "must be an integer"),
    ((None, None, None), {"RESGEN_DISTRIBUTED": "yes"}, "must be 'auto' or unset"),
])
def test_bad_distributed_settings_are_named(args, env, message):
  with pytest.raises(ValueError, match=message):
    distributed.resolve(*args, env)
