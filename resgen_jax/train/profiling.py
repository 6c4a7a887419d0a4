"""A profiler trace of a few training steps (``train.profile_steps``), for TensorBoard's
profile plugin or Perfetto (``<stage dir>/profile/plugins/profile/<run>/*.xplane.pb`` and
``*.trace.json.gz``).

Each step runs under ``jax.profiler.StepTraceAnnotation``, so the trace viewer groups the
device work by step number. The trace starts after the first step of a (resumed) run, which
compiles the step, and stops after ``profile_steps`` steps once their work has finished on
the devices (dispatch is asynchronous: stopping at once would cut the last steps off).
"""

from __future__ import annotations

import contextlib
import logging
import os

import jax

PROFILE_DIR = "profile"  # under the stage's directory
SKIPPED_STEPS = 1  # the first step of a run compiles: tracing it would show the compiler


def profile_dir(stage_dir: str) -> str:
  """Where this process writes its traces: ``<stage_dir>/profile``, with a folder per
  process in a multi-process run (each traces its own devices)."""
  directory = os.path.join(stage_dir, PROFILE_DIR)
  if jax.process_count() > 1:
    directory = os.path.join(directory, f"process_{jax.process_index()}")
  return directory


class StepProfiler:
  """Traces the training steps ``start + SKIPPED_STEPS + [0, count)`` into ``directory``.

  Use as ``with profiler.step(step): ...`` around each step, ``profiler.finish(state)``
  after it, and ``profiler.close()`` when the loop ends (early exits included: a trace
  left open would never be written). ``count == 0`` only annotates the steps."""

  def __init__(self, directory: str, start: int, count: int):
    if count < 0:
      raise ValueError(f"train.profile_steps must be >= 0 (0: off), got {count}")
    self.directory = directory
    self.first, self.stop_after = start + SKIPPED_STEPS, start + SKIPPED_STEPS + count
    self.active = False

  def step(self, step: int) -> contextlib.AbstractContextManager:
    """The context of training step ``step`` (0-based): starts the trace at the first
    traced step and names the step for the trace viewer."""
    if step == self.first and self.first < self.stop_after:
      os.makedirs(self.directory, exist_ok=True)
      jax.profiler.start_trace(self.directory)
      self.active = True
      logging.info("profiling steps %d..%d into %s", self.first + 1, self.stop_after,
                   self.directory)
    return jax.profiler.StepTraceAnnotation("train", step_num=step)

  def finish(self, step: int, outputs) -> None:
    """After step ``step``: once the last traced step's ``outputs`` are computed, stops."""
    if self.active and step + 1 == self.stop_after:
      jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
      logging.info("wrote the profile to %s", self.directory)
