"""The trainer as a program: config typos, SIGKILL mid-save, SIGTERM, and two processes over gloo on 127.0.0.1;
the micro-batched step over two processes."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mixreorg_jax import train
from mixreorg_jax.tools import export
from tests import step_worker
from tests import test_train_common as common


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
  return common.synthetic_data(tmp_path_factory)


def wait_for(condition, proc, timeout=600, poll=0.005):
  """Polls `condition()` until true; fails if `proc` exits first or the timeout passes."""
  deadline = time.time() + timeout
  while not condition():
    assert proc.poll() is None, f"the trainer exited early with code {proc.returncode}"
    assert time.time() < deadline, "timed out"
    time.sleep(poll)


def checkpoint_steps(workdir):
  with ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints"))) as manager:
    return list(manager.all_steps())


@pytest.mark.parametrize("flag, message", [
    ("--config.modle.vision.width=32", "modle"),
    ("--config.total_steps=ten", "total_steps"),
])
def test_config_typo_fails_within_seconds(tmp_path, flag, message):
  start = time.time()
  result = subprocess.run(
      [*common.train_command(common.demo.get_config(), str(tmp_path))[:4], flag],
      cwd=common.REPO, env=common.SUBPROCESS_ENV, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr
  assert time.time() - start < 60  # start-up (imports) only: nothing is built or compiled.
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_sigkill_during_save_then_sigterm_then_export(synthetic_dir, tmp_path):
  """A save cut by SIGKILL is never taken as the latest; SIGTERM saves the current step; it exports."""
  workdir = str(tmp_path / "run")
  config = common.train_config(synthetic_dir, ckpt_steps=2, keep_ckpts=3)
  ckpts = os.path.join(workdir, "checkpoints")

  proc = common.start_training(config, workdir, log_name="killed.txt")
  wait_for(lambda: os.path.isdir(os.path.join(ckpts, "2")), proc)
  wait_for(lambda: os.path.isdir(os.path.join(ckpts, "4.orbax-checkpoint-tmp")), proc)  # mid-save of step 4.
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert "4.orbax-checkpoint-tmp" in os.listdir(ckpts)
  assert checkpoint_steps(workdir) == [2]

  proc = common.start_training(config, workdir, log_name="resumed.txt")
  wait_for(lambda: max(common.losses(workdir), default=0) >= 6, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0  # a clean exit after the save.
  with open(os.path.join(workdir, "resumed.txt")) as f:
    log = f.read()
  assert "Resumed from step 2" in log
  stopped = int(re.search(r"Stopped by a signal or preemption notice at step (\d+)", log).group(1))
  assert stopped == max(common.losses(workdir)) >= 6  # the step in flight finished and was saved.
  assert max(checkpoint_steps(workdir)) == stopped
  assert os.path.exists(os.path.join(workdir, "input_state", f"step_{stopped}", "process_0_of_1.index"))

  variables, step = export.restore_variables(workdir, export.load_train_config(workdir))
  assert step == stopped
  assert all(np.isfinite(x).all() for x in common.helpers.jax.tree.leaves(variables))


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_then_restore_on_one(synthetic_dir, tmp_path):
  """2 processes x 2 CPU devices (gloo) agree on the loss and write one checkpoint; 1 process x 8 resumes it."""
  workdir = str(tmp_path / "run")
  config = common.train_config(synthetic_dir, total_steps=3, ckpt_steps=3)
  address = f"127.0.0.1:{free_port()}"
  procs = [common.start_training(config, workdir, f"--coordinator_address={address}", "--num_processes=2",
                                 f"--process_id={i}", log_name=f"process_{i}.txt") for i in range(2)]
  assert [p.wait(timeout=900) for p in procs] == [0, 0]
  logged = []
  for i in range(2):
    with open(os.path.join(workdir, f"process_{i}.txt")) as f:
      logged.append(re.findall(r"\[(\d+)\] .*train/loss=([-\d.e+]+)", f.read()))
  assert [s for s, _ in logged[0]] == ["1", "2", "3"]
  assert logged[0] == logged[1]  # the same global loss on both processes.
  assert checkpoint_steps(workdir) == [3]
  assert sorted(os.listdir(os.path.join(workdir, "input_state", "step_3"))) == [
      f"process_{i}_of_2.{ext}" for i in range(2) for ext in ("data-00000-of-00001", "index")]

  # This test process has 8 devices: the 2 x 2 checkpoint is laid out on a (data=8) mesh.
  train.train_and_evaluate(common.train_config(synthetic_dir, total_steps=4, ckpt_steps=4), workdir)
  steps = [m["step"] for m in common.read_metrics(workdir) if "train/loss" in m]
  assert steps == [1, 2, 3, 4]  # resumed at 3: steps 1-3 were not run again.
  assert checkpoint_steps(workdir) == [3, 4]


@pytest.mark.slow
def test_two_processes_micro_batched_give_the_losses_of_one_process(tmp_path):
  """2 processes x 2 CPU devices (gloo) on a data=2, fsdp=2 mesh, micro-batched (2 micro-batches of 8, 2 examples
  per device): every loss term of 3 steps is that of the one-shot step in one process on one device."""
  overrides = {"input.micro_batch_size": 8, "mesh.data": 2, "mesh.fsdp": 2, "model.multi_label": True,
               "input.num_nouns": 3, "model.vision.drop_path_rate": 0.2, "optim.base_lr": 1e-2,
               "optim.base_batch_size": 16}
  out = str(tmp_path / "metrics.npz")
  address = f"127.0.0.1:{free_port()}"
  logs = [open(tmp_path / f"process_{i}.txt", "w") for i in range(2)]
  procs = [subprocess.Popen([sys.executable, "-m", "tests.step_worker", address, "2", str(i), out,
                             json.dumps(overrides)], cwd=common.REPO, env=common.SUBPROCESS_ENV, stdout=logs[i],
                            stderr=subprocess.STDOUT) for i in range(2)]
  reference = step_worker.steps_on_fixed_batch(
      common.helpers.tiny_config(**{**overrides, "input.micro_batch_size": 0, "mesh.data": 1, "mesh.fsdp": 1}),
      jax.devices()[:1])
  assert [p.wait(timeout=900) for p in procs] == [0, 0], (tmp_path / "process_0.txt").read_text()[-3000:]
  two_processes = dict(np.load(out))
  keys = [f"step{i}/{k}" for i in range(step_worker.STEPS)
          for k in ("loss", "loss_orig", "loss_rest", "loss_seg", "loss_multi_label", "group_info", "grad_norm")]
  assert set(keys) <= set(two_processes) and reference["step0/grad_norm"] > 0
  assert reference["step2/loss"] != reference["step1/loss"]  # step 1 (learning rate > 0) changed the parameters.
  for key in keys:
    np.testing.assert_allclose(two_processes[key], reference[key], rtol=1e-5, atol=1e-6, err_msg=key)
