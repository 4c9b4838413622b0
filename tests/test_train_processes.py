"""The trainer as a program: config typos, SIGKILL mid-save, SIGTERM, and two processes over gloo on 127.0.0.1;
the micro-batched step over two processes."""
import contextlib
import json
import os
import re
import resource
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


def wait_for(condition, proc, timeout=600, poll=0.1):
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
    ("--config.modle.vision.width=32", 'Did you mean "model" instead of "modle"?'),
    ("--config.total_steps=ten", "flag --config.total_steps=ten: invalid literal for int()"),
])
def test_config_typo_fails_within_seconds(tmp_path, flag, message):
  start = resource.getrusage(resource.RUSAGE_CHILDREN)
  command = common.train_command(common.demo.get_config(), str(tmp_path))
  assert "--config=configs/demo.py" in command  # the override must reach the config, not absl's unknown-flag check.
  result = subprocess.run([*command, flag], cwd=common.REPO, env=common.SUBPROCESS_ENV, capture_output=True,
                          text=True, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-2000:]
  end = resource.getrusage(resource.RUSAGE_CHILDREN)
  # Start-up (imports) only: nothing is built or compiled. CPU seconds, which a loaded machine does not inflate.
  assert end.ru_utime + end.ru_stime - start.ru_utime - start.ru_stime < 60
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.mark.slow
def test_sigkill_during_save_then_sigterm_then_export(synthetic_dir, tmp_path, processes):
  """A save cut by SIGKILL is never taken as the latest; SIGTERM saves the current step; it exports."""
  workdir = str(tmp_path / "run")
  config = common.train_config(synthetic_dir, ckpt_steps=2, keep_ckpts=3)
  ckpts = os.path.join(workdir, "checkpoints")

  # SIGKILLed by the trainer's own test hook once step 4 is written but not yet renamed complete.
  proc = processes.train(common.train_config(synthetic_dir, ckpt_steps=2, keep_ckpts=3, debug_save_fault="kill:4"),
                         workdir, log_name="killed.txt")
  assert proc.wait(timeout=600) == -signal.SIGKILL
  assert "4.orbax-checkpoint-tmp" in os.listdir(ckpts)
  assert checkpoint_steps(workdir) == [2]

  proc = processes.train(config, workdir, log_name="resumed.txt")
  # The killed run logged steps past 4 (the save was asynchronous): wait for this run's own step 6.
  wait_for(lambda: "step 6/" in read_log(workdir, "resumed.txt"), proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 0  # a clean exit after the save.
  with open(os.path.join(workdir, "resumed.txt")) as f:
    log = f.read()
  assert "Resumed from step 2" in log
  stopped = stopped_step(log)
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


def start_two_processes(processes, config, workdir: str, run: str) -> list:
  """Both processes of a 2 x 2-device run over gloo on 127.0.0.1 (console output to workdir/<run>_<i>.txt)."""
  address = f"127.0.0.1:{free_port()}"
  return [processes.train(config, workdir, f"--coordinator_address={address}", "--num_processes=2",
                          f"--process_id={i}", log_name=f"{run}_{i}.txt") for i in range(2)]


def read_log(workdir: str, name: str) -> str:
  with open(os.path.join(workdir, name)) as f:
    return f.read()


LOGGED_STEP = re.compile(r"step (\d+)/\d+  loss ([-\d.e+]+)")  # the trainer's console line of a step


def logged_losses(workdir: str, log: str) -> list:
  """(step, loss as printed) of every step one run's console output `log` (in workdir) has reported so far:
  unlike metrics.jsonl, which every run of the workdir appends to, only this run's."""
  with contextlib.suppress(FileNotFoundError):
    return [(int(step), loss) for step, loss in LOGGED_STEP.findall(read_log(workdir, log))]
  return []


def logged_steps(workdir: str, log: str) -> list:
  """The steps of `logged_losses`."""
  return [step for step, _ in logged_losses(workdir, log)]


def stopped_step(log: str) -> int:
  """The step at which a run whose console output is `log` stopped for a signal or a preemption notice."""
  return int(re.search(r"Stopped by a signal or preemption notice at step (\d+)", log).group(1))


@pytest.mark.slow
def test_two_processes_then_restore_on_one(synthetic_dir, tmp_path, processes):
  """2 processes x 2 CPU devices (gloo) agree on the loss and write one checkpoint; 1 process x 8 resumes it."""
  workdir = str(tmp_path / "run")
  config = common.train_config(synthetic_dir, total_steps=3, ckpt_steps=3)
  assert [p.wait(timeout=900) for p in start_two_processes(processes, config, workdir, "process")] == [0, 0]
  logged = [logged_losses(workdir, f"process_{i}.txt") for i in range(2)]
  assert [s for s, _ in logged[0]] == [1, 2, 3]
  assert logged[0] == logged[1]  # the same global loss on both processes.
  assert checkpoint_steps(workdir) == [3]
  assert sorted(os.listdir(os.path.join(workdir, "input_state", "step_3"))) == [
      f"process_{i}_of_2.{ext}" for i in range(2) for ext in ("data-00000-of-00001", "index")]

  # This test process has 8 devices: the 2 x 2 checkpoint is laid out on a (data=8) mesh.
  train.train_and_evaluate(common.train_config(synthetic_dir, total_steps=4, ckpt_steps=4), workdir)
  steps = [m["step"] for m in common.read_metrics(workdir) if "train/loss" in m]
  assert steps == [1, 2, 3, 4]  # resumed at 3: steps 1-3 were not run again.
  assert checkpoint_steps(workdir) == [3, 4]


def stops_for_a_peer(proc, workdir: str, log: str, since: float, what: str) -> float:
  """`proc` exits with EXIT_PEER_LOST within 30 s of `since`, its console ending with one line: `what` (a pattern:
  which process was lost or hung, at which step), then this process's stop and the latest complete checkpoint.
  -> the seconds taken."""
  assert proc.wait(timeout=60) == train.EXIT_PEER_LOST
  seconds = time.time() - since
  assert seconds < 30, seconds
  last = read_log(workdir, log).strip().splitlines()[-1]
  latest = train.latest_complete_step(os.path.join(workdir, "checkpoints"))
  assert re.search(rf"{what} at step \d+.*; stopping process \d\. The latest complete checkpoint is step "
                   rf"{latest} in ", last), last
  return seconds


@pytest.mark.slow
def test_two_processes_preempted_then_peer_lost_stopped_hung_resume_exactly(synthetic_dir, tmp_path, processes):
  """SIGTERM to both processes: they save one agreed step and exit 0. Then process 1 is SIGKILLed, SIGSTOPped, and
  hung in its loop with its threads alive (config.debug_hang): each time process 0 stops within 30 s with one
  message (and the hung process 1 too). Each relaunch resumes; every loss equals an uninterrupted run's to 1e-6."""
  config = common.train_config(synthetic_dir, total_steps=16, ckpt_steps=4, peer_timeout_seconds=15)
  straight = str(tmp_path / "straight")
  assert [p.wait(timeout=900) for p in start_two_processes(processes, config, straight, "run")] == [0, 0]
  want = common.losses(straight)
  assert sorted(want) == list(range(1, 17))
  workdir = str(tmp_path / "run")

  procs = start_two_processes(processes, config, workdir, "preempted")
  wait_for(lambda: max(common.losses(workdir), default=0) >= 2, procs[0])
  for p in procs:
    p.send_signal(signal.SIGTERM)
  assert [p.wait(timeout=300) for p in procs] == [0, 0]
  stopped = {stopped_step(read_log(workdir, f"preempted_{i}.txt")) for i in range(2)}
  assert len(stopped) == 1 and checkpoint_steps(workdir)[-1] == stopped.pop()  # one agreed step, saved.

  seconds = {}
  ckpts = os.path.join(workdir, "checkpoints")
  for run, fault, past in (("killed", signal.SIGKILL, 4), ("stopped", signal.SIGSTOP, 8)):
    procs = start_two_processes(processes, config, workdir, run)
    # This run's own steps, past the complete checkpoint of step `past`. (The steps in metrics.jsonl will not do:
    # the previous run may have logged past `past` itself, and the fault would then land in this one's set-up.)
    wait_for(lambda: max(logged_steps(workdir, f"{run}_0.txt"), default=0) > past
             and train.latest_complete_step(ckpts) >= past, procs[0])
    procs[1].send_signal(fault)
    seconds[run] = stops_for_a_peer(procs[0], workdir, f"{run}_0.txt", time.time(), "Process 1 of 2 (lost|hung)")
    procs[1].kill()
    procs[1].wait()

  hang = common.train_config(synthetic_dir, total_steps=16, ckpt_steps=4, peer_timeout_seconds=15, debug_hang="1:14")
  procs = start_two_processes(processes, hang, workdir, "hung")
  # Process 1 hangs as it starts step 14.
  wait_for(lambda: max(logged_steps(workdir, "hung_0.txt"), default=0) >= 13, procs[0])
  since = time.time()
  seconds["hung"] = stops_for_a_peer(procs[0], workdir, "hung_0.txt", since, "Process 1 of 2 hung")
  stops_for_a_peer(procs[1], workdir, "hung_1.txt", since, "Process 1 of 2 hung")  # the same verdict, first.
  assert train.latest_complete_step(ckpts) == 12

  assert [p.wait(timeout=900) for p in start_two_processes(processes, config, workdir, "resumed")] == [0, 0]
  got = common.losses(workdir)
  assert sorted(got) == list(range(1, 17))
  print("peer lost/stopped/hung to exit: " + ", ".join(f"{k} {v:.1f} s" for k, v in seconds.items()) +
        f"; max |loss - uninterrupted|: {max(abs(got[s] - want[s]) for s in want):.2e}")
  np.testing.assert_allclose([got[s] for s in range(1, 17)], [want[s] for s in range(1, 17)], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_two_processes_a_peer_hung_at_the_end_of_the_run_stops_both(synthetic_dir, tmp_path, processes):
  """Process 1 hangs after its last step and save (config.debug_hang at total_steps + 1) while process 0 waits
  for it at the processes' last meeting: both stop within 30 s with one message. The relaunch finds the run
  complete, and both exit 0."""
  config = common.train_config(synthetic_dir, total_steps=3, ckpt_steps=3, peer_timeout_seconds=15, debug_hang="1:4")
  workdir = str(tmp_path / "run")
  procs = start_two_processes(processes, config, workdir, "hung")
  ckpts = os.path.join(workdir, "checkpoints")
  # The last save is complete: process 1 then hangs, and the timeout runs from there.
  wait_for(lambda: train.latest_complete_step(ckpts) == 3, procs[0])
  since = time.time()
  stops_for_a_peer(procs[0], workdir, "hung_0.txt", since, "Process 1 of 2 hung")
  stops_for_a_peer(procs[1], workdir, "hung_1.txt", since, "Process 1 of 2 hung")
  assert train.latest_complete_step(ckpts) == 3
  config = common.train_config(synthetic_dir, total_steps=3, ckpt_steps=3, peer_timeout_seconds=15)
  assert [p.wait(timeout=900) for p in start_two_processes(processes, config, workdir, "resumed")] == [0, 0]
  assert logged_steps(workdir, "resumed_0.txt") == []  # resumed at step 3: nothing left to train.


@pytest.mark.slow
def test_two_processes_micro_batched_give_the_losses_of_one_process(tmp_path, processes):
  """2 processes x 2 CPU devices (gloo) on a data=2, fsdp=2 mesh, micro-batched (2 micro-batches of 8, 2 examples
  per device): every loss term of 3 steps is that of the one-shot step in one process on one device."""
  overrides = {"input.micro_batch_size": 8, "mesh.data": 2, "mesh.fsdp": 2, "model.multi_label": True,
               "input.num_nouns": 3, "model.vision.drop_path_rate": 0.2, "optim.base_lr": 1e-2,
               "optim.base_batch_size": 16}
  out = str(tmp_path / "metrics.npz")
  address = f"127.0.0.1:{free_port()}"
  procs = [processes.start([sys.executable, "-m", "tests.step_worker", address, "2", str(i), out,
                            json.dumps(overrides)], str(tmp_path / f"process_{i}.txt")) for i in range(2)]
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
