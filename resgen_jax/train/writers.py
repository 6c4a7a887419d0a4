"""Metric writers: TensorBoard and logging (clu) plus a plain JSON-lines file."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional

import jax
import numpy as np
from clu import metric_writers

METRICS_FILE = "metrics.jsonl"


def _to_python(value: Any):
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


class JsonlWriter(metric_writers.MetricWriter):
  """Appends one JSON object per ``write_scalars`` call: ``{"step", "stage", name: value}``.

  Only scalars are written; every other kind of summary is ignored by this writer.
  """

  def __init__(self, path: str, stage: str):
    self._path = path
    self._stage = stage

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    row = {"step": int(step), "stage": self._stage}
    row.update({k: _to_python(v) for k, v in scalars.items()})
    with open(self._path, "a") as f:
      f.write(json.dumps(row) + "\n")

  def write_summaries(self, step, values, metadata=None):
    pass

  def write_images(self, step, images):
    pass

  def write_videos(self, step, videos):
    pass

  def write_audios(self, step, audios, *, sample_rate):
    pass

  def write_texts(self, step, texts):
    pass

  def write_histograms(self, step, arrays, num_buckets=None):
    pass

  def write_hparams(self, hparams):
    pass

  def flush(self):
    pass

  def close(self):
    pass


def truncate_metrics(path: str, stage: str, last_step: int) -> None:
  """Drops rows of ``stage`` logged after ``last_step`` (written by a run that was cut off
  before its next checkpoint), so a resumed run does not log those steps twice."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    rows = [line for line in f if line.strip()]
  keep = [r for r in rows
          if not (json.loads(r).get("stage") == stage and json.loads(r)["step"] > last_step)]
  if len(keep) != len(rows):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.writelines(keep)
    os.replace(tmp, path)


def create_writer(workdir: str, logdir: str, stage: str,
                  resume_step: Optional[int] = None) -> metric_writers.MetricWriter:
  """TensorBoard summaries in ``logdir`` plus ``workdir/metrics.jsonl``; silent on non-zero
  processes except for logging."""
  if jax.process_index() > 0:
    return metric_writers.create_default_writer(logdir, just_logging=True)
  path = os.path.join(workdir, METRICS_FILE)
  if resume_step is not None:
    truncate_metrics(path, stage, resume_step)
  return metric_writers.MultiWriter([
      metric_writers.create_default_writer(logdir, asynchronous=False),
      JsonlWriter(path, stage)])
