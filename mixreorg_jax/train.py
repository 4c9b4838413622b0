r"""Pretrains MixReorg (or the GroupViT baseline) on image-caption data.

  python -m mixreorg_jax.train --config=configs/demo.py --workdir=workdirs/demo [--config.key=value ...]

Multi-host: run the same command on every host (launch/tpu_pod.sh, launch/slurm.sh); pass `--multihost` for
`jax.distributed.initialize()` auto-detection, or `--coordinator_address/--num_processes/--process_id`
(launch/local_cpu.sh does this on 127.0.0.1). The run resumes from the workdir's latest checkpoint, including the
input position, and SIGTERM/SIGINT save a checkpoint at the current step before exiting.

The console shows the config summary, parameter count, mesh, set-up and compile times, one line per log step,
evaluation results and warnings; library INFO and native output go to WORKDIR/train.log (train.<process>.log
with several processes), and --verbose puts them back on the console.
"""
import contextlib
import datetime
import errno
import json
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Mapping, Optional

from mixreorg_jax import console
if __name__ == "__main__":
  console.hold_native_output()  # before TF and XLA load: their native start-up banners go to the log file.

from absl import app  # noqa: E402  (every import below loads after the hold above)
from absl import flags
from absl import logging
from clu import metric_writers
from clu import parameter_overview
from clu import periodic_actions
import jax
from jax.experimental import multihost_utils
import ml_collections
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp

from mixreorg_jax import evaluator
from mixreorg_jax import losses
from mixreorg_jax import optim
from mixreorg_jax import sharding
from mixreorg_jax import train_step
from mixreorg_jax import visualize
from mixreorg_jax import workdir as workdir_lib
from mixreorg_jax.models import groupvit

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined only when it runs, so that importing this module defines none."""
  config_flags.DEFINE_config_file("config", None, "Training config file (configs/*.py).", lock_config=True)
  flags.DEFINE_string("workdir", None, "Where checkpoints, metrics and outputs go.")
  flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() with cluster auto-detection.")
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for explicit multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
  flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
  flags.mark_flags_as_required(["config", "workdir"])

MAX_STEPS_IN_FLIGHT = 2  # steps dispatched ahead of the device; enough to overlap input with compute.


class Preempted(Exception):
  """Raised after a clean save when SIGTERM/SIGINT (or a pod preemption notice) arrived."""


# A process that loses a peer exits with this status (EX_TEMPFAIL): relaunching every process resumes the run.
EXIT_PEER_LOST = 75
# jax.distributed drops a process whose heartbeats stop (SIGKILLed, frozen, host down) after this long. The peer
# watch then sees it gone within PEER_POLL_SECONDS, so a survivor stops within ~15 s of the loss.
HEARTBEAT_TIMEOUT_SECONDS = 10
PEER_POLL_SECONDS = 1.0
# A question to the coordination service that takes this long means process 0, which runs it, is frozen.
SERVICE_TIMEOUT_SECONDS = HEARTBEAT_TIMEOUT_SECONDS / 2
# The loop's phases in which a step may take config.peer_timeout_long_seconds: the first step after a (re)start
# (it waits for every peer's compile and the input's warm-up), saves, evaluations and the periodic hooks (profile).
LONG_PHASES = ("setup", "save", "eval", "hooks")
# The phase of a loop waiting for the device (a step's results), and so maybe for a peer's part of a collective.
WAITING = "sync"
# The phase of a process past the processes' last meeting (PeerWatch.end_of_run): the run is over, and its peers
# may disconnect at any moment.
DONE = "done"
# The peer watch's keys in the coordination service: progress_<process> ("step phase"), stop (the first verdict:
# what happened, who is gone) and stopped_<process> (that process has printed it and is exiting).
KEYS = "mixreorg_jax/"
# Process 0 runs the coordination service, and every process still connected to it aborts (a native trace, status
# -6) when it exits: so it waits this long at most for the others to print the verdict and exit first.
STOP_GRACE_SECONDS = 10


class PeerWatch:
  """Stops this process cleanly when another process of a multi-process run is lost or hung.

  One thread asks the coordination service every PEER_POLL_SECONDS which processes are alive; the loop also calls
  `collective_failed()` when a collective raises (a dead peer resets gloo's connections at once), which waits
  for the service to tell which process is gone. Either way one message (the lost processes, the step reached,
  the latest complete checkpoint) goes to the console and the process exits with EXIT_PEER_LOST, skipping
  jax.distributed's shutdown: that would wait for the lost peer and then abort with a native trace.

  A process can also stop making progress while its heartbeats go on (a hung filesystem, a deadlock). So a second
  thread publishes the loop's step and phase in the service's key-value store every PEER_POLL_SECONDS and reads
  every process's. When none has changed for config.peer_timeout_seconds (config.peer_timeout_long_seconds in the
  LONG_PHASES), the processes at the earliest step are hung (those of them not WAITING for the device, if any):
  the others wait for them in a collective, at a later step or at the same one. Every process, the hung ones
  included, then stops in the same way. A service that takes SERVICE_TIMEOUT_SECONDS to answer (process 0, which
  runs it, is frozen) stops the others too. Every process prints the first process's verdict, and process 0 exits
  last (its exit ends the service). With one process, nothing runs.
  """

  def __init__(self, ckpt_dir: str, timeout_seconds: float, long_timeout_seconds: float,
               process_count: Optional[int] = None):
    self._ckpt_dir = ckpt_dir
    self._timeouts = (timeout_seconds, long_timeout_seconds)
    self._count, self._index = process_count or jax.process_count(), jax.process_index()
    self._stop = threading.Event()
    self._threads = [threading.Thread(target=self._watch_live, name="peer_watch_live", daemon=True),
                     threading.Thread(target=self._watch_progress, name="peer_watch_progress", daemon=True)]
    self._seen: Dict[int, tuple] = {}  # process -> (its (step, phase), when this process first saw it)
    self._published = ""
    self._publishing = threading.Lock()  # the loop's last "done" must not be overwritten by an older phase.
    self._exiting = threading.Lock()  # the first thread to stop the process holds it until the exit.
    self.step = 0  # the step the loop is on, and what it does in it; kept current by the loop.
    self.phase = "setup"

  @contextlib.contextmanager
  def during(self, phase: str):
    """Marks a part of the step (a save, an evaluation, a wait for the device) as `phase`."""
    previous, self.phase = self.phase, phase
    try:
      yield
    finally:
      self.phase = previous

  def __enter__(self):
    if self._count > 1:
      from jax._src import distributed  # noqa: PLC0415  (the client is not public API)
      self._client = distributed.global_state.client
      for thread in self._threads:
        thread.start()
    return self

  def __exit__(self, *exc_info):
    self._stop.set()

  def lost(self) -> List[int]:
    """The processes the coordination service no longer counts as alive ([0] if the service itself is gone).

    None once a process is DONE: every process then met at the end of the run, and one that has gone since
    just finished first.
    """
    try:
      alive = self._client.get_live_nodes(list(range(self._count)))
      gone = [i for i in range(self._count) if i not in alive]
      if gone and self._run_is_over(progress_of(dict(self._client.key_value_dir_get(KEYS)))):
        return []
    except Exception:  # the service runs in process 0: no answer means process 0 is lost.
      return [0]
    return gone

  @staticmethod
  def _run_is_over(progress: Dict[int, str]) -> bool:
    """Whether a process has passed the processes' last meeting (its phase is DONE)."""
    return any(value.partition(" ")[2] == DONE for value in progress.values())

  def _publish(self) -> None:
    """Publishes this process's "step phase" if it changed since it last did."""
    with self._publishing:
      if (mine := f"{self.step} {self.phase}") != self._published:
        self._client.key_value_set(f"{KEYS}progress_{self._index}", mine, allow_overwrite=True)
        self._published = mine

  def _publish_and_read(self) -> Dict[str, str]:
    """Publishes this process's "step phase" if it changed; returns every key of the peer watch (KEYS).

    One small request a second per process, and one more when its step or phase changed.
    """
    self._publish()
    return dict(self._client.key_value_dir_get(KEYS))

  def end_of_run(self) -> None:
    """The processes' last meeting, after training and the final evaluation (or a preemption save).

    Every process waits here for all the others (a peer lost or hung before it stops this one as anywhere
    else), then publishes that it is DONE, before it leaves the watch: from then on no peer that disconnects
    is taken for lost. Nothing with one process.
    """
    if self._count == 1:
      return
    with self.during(WAITING):
      multihost_utils.sync_global_devices("end of run")
    self.phase = DONE
    _, error = self._within(SERVICE_TIMEOUT_SECONDS, self._publish)
    if error is not None:
      self._exit(f"Process 0 of {self._count} (the coordination service) lost at the end of the run", error,
                 service_gone=True)

  @staticmethod
  def _within(seconds: float, fn):
    """fn() from a helper thread, so that a frozen service cannot freeze the caller. -> (its result, None), or
    (None, the error: TimeoutError if no answer came)."""
    out: Dict[str, Any] = {}

    def call():
      try:
        out["result"] = fn()
      except Exception as e:  # the service is gone with process 0.
        out["error"] = e

    thread = threading.Thread(target=call, name="peer_watch_ask", daemon=True)
    thread.start()
    thread.join(seconds)
    if "result" in out:
      return out["result"], None
    return None, out.get("error", TimeoutError(f"the coordination service did not answer within {seconds:g} s"))

  def hung(self, progress: Dict[int, str], now: float) -> Dict[int, tuple]:
    """{process: (its step, seconds without progress)} of the hung processes, from every process's "step phase".

    Hung: no process has moved for the timeout of the phase of a process at the earliest step, which is one; of
    those, the ones not WAITING for the device if there are any (a waiting one waits for them). None once a
    process is DONE (the run is over).
    """
    if self._run_is_over(progress):
      return {}
    steps = {}
    for i in range(self._count):
      step, _, phase = progress.get(i, "0 setup").partition(" ")
      if self._seen.get(i, (None,))[0] != (step, phase):
        self._seen[i] = ((step, phase), now)
      steps[i] = int(step)
    # The whole run must be still: a process that only waited for a slower one starts its count when that moved.
    still = now - max(since for _, since in self._seen.values())
    first = min(steps.values())
    earliest = {i: phase for i, ((_, phase), _) in self._seen.items() if steps[i] == first}
    culprits = [i for i, phase in earliest.items() if phase != WAITING] or list(earliest)
    return {i: (first, now - self._seen[i][1]) for i in culprits
            if still > self._timeouts[earliest[i] in LONG_PHASES]}

  def _watch_live(self) -> None:
    # get_live_nodes returns once every live process has asked (or the service has dropped the missing ones).
    while not self._stop.wait(PEER_POLL_SECONDS):
      if (lost := self.lost()) and not self._stop.is_set():  # once training is over, a peer may finish first.
        self._exit(f"Process {self._ids(lost)} of {self._count} lost at step {self.step}", gone=lost)

  def _watch_progress(self) -> None:
    while not self._stop.wait(PEER_POLL_SECONDS):
      keys, error = self._within(SERVICE_TIMEOUT_SECONDS, self._publish_and_read)
      if self._stop.is_set():
        return
      if error is not None:
        self._exit(f"Process 0 of {self._count} (the coordination service) lost at step {self.step}", error,
                   service_gone=True)
      if f"{KEYS}stop" in keys:  # another process stopped the run: the same verdict here.
        verdict = json.loads(keys[f"{KEYS}stop"])
        self._exit(verdict["what"], gone=verdict["gone"])
      if hung := self.hung(progress_of(keys), time.monotonic()):
        step, seconds = max(hung.values(), key=lambda v: v[1])
        self._exit(f"Process {self._ids(hung)} of {self._count} hung at step {step} (no progress for {seconds:.0f} "
                   f"s; config.peer_timeout_seconds={self._timeouts[0]:g}, peer_timeout_long_seconds="
                   f"{self._timeouts[1]:g} in {'/'.join(LONG_PHASES)})")

  def collective_failed(self, error: Exception) -> None:
    """Exits as _watch_live would if a process is lost within the heartbeat timeout; returns if none is."""
    if self._count == 1:
      return
    deadline = time.time() + HEARTBEAT_TIMEOUT_SECONDS + 5 * PEER_POLL_SECONDS
    while time.time() < deadline:
      if lost := self.lost():
        self._exit(f"Process {self._ids(lost)} of {self._count} lost at step {self.step}", error, gone=lost)
      time.sleep(PEER_POLL_SECONDS)

  @staticmethod
  def _ids(processes) -> str:
    return ", ".join(map(str, sorted(processes)))

  def _exit(self, what: str, error: Optional[Exception] = None, gone=(), service_gone: bool = False) -> None:
    """Prints what happened (which processes, at which step), this process's stop and the checkpoint; exits.

    The first process to stop publishes its verdict (`what`, and the processes `gone` for good); every other one
    prints that same verdict when it reads it, within PEER_POLL_SECONDS. Process 0 exits last (see
    STOP_GRACE_SECONDS).
    """
    with self._exiting:
      if not service_gone:
        verdict = json.dumps({"what": what, "gone": sorted(gone)})
        self._within(SERVICE_TIMEOUT_SECONDS, lambda: self._client.key_value_set(f"{KEYS}stop", verdict))
        first, _ = self._within(SERVICE_TIMEOUT_SECONDS, lambda: self._client.key_value_try_get(f"{KEYS}stop"))
        if first:  # ours, or one set a moment earlier by another process.
          what, gone = json.loads(first)["what"], json.loads(first)["gone"]
      logging.error("%s; stopping process %d. The latest complete checkpoint is step %s in %s; relaunch every "
                    "process to resume from it.%s", what, self._index, latest_complete_step(self._ckpt_dir),
                    self._ckpt_dir, f" ({type(error).__name__}; details in the log file)" if error else "")
      if error is not None:
        logging.info("The error: %r", error, extra=console.LOG_FILE_ONLY)
      logging.flush()
      sys.stderr.flush()
      if not service_gone:
        self._within(SERVICE_TIMEOUT_SECONDS,
                     lambda: self._client.key_value_set(f"{KEYS}stopped_{self._index}", "", allow_overwrite=True))
        if self._index == 0:
          self._wait_for_the_others(set(range(1, self._count)) - set(gone))
      os._exit(EXIT_PEER_LOST)

  def _wait_for_the_others(self, waiting: set) -> None:
    """Process 0: until every process in `waiting` has said it stops, STOP_GRACE_SECONDS at most."""
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while waiting and time.monotonic() < deadline:
      keys, error = self._within(SERVICE_TIMEOUT_SECONDS, lambda: self._client.key_value_dir_get(KEYS))
      if error is not None:
        return
      waiting -= {int(key.rpartition("_")[2]) for key, _ in keys if key.startswith(f"{KEYS}stopped_")}
      time.sleep(0.2)


def progress_of(keys: Mapping[str, str]) -> Dict[int, str]:
  """{process: its published "step phase"} from the peer watch's keys in the coordination service (KEYS)."""
  return {int(key.rpartition("_")[2]): value for key, value in keys.items() if key.startswith(f"{KEYS}progress_")}


def hang_fault(spec: str, step: int) -> None:
  """Test hook config.debug_hang: "PROCESS:STEP" hangs that process's loop at the start of step STEP for good,
  every thread of it (heartbeats, the peer watch) still running, as a hung filesystem or a deadlock would; STEP
  = config.total_steps + 1 hangs it after the final evaluation, before the processes' last meeting. "" (the
  default) does nothing."""
  if not spec:
    return
  process, _, at = spec.partition(":")
  if not (process.isdigit() and at.isdigit()):
    raise ValueError(f"config.debug_hang={spec!r}: expected '' or 'PROCESS:STEP'.")
  while (int(process), int(at)) == (jax.process_index(), step):
    time.sleep(1)


class SaveFailed(Exception):
  """A checkpoint could not be written (full disk, read-only or vanished directory); the previous one stays."""


class JsonlWriter(metric_writers.MetricWriter):
  """Appends scalars as one JSON object per line to `path` (read by plots, tests and the ablation script)."""

  def __init__(self, path: str):
    self._file = open(path, "a")

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    self._file.write(json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}}) + "\n")
    self._file.flush()

  def write_summaries(self, step, values, metadata=None): pass
  def write_images(self, step, images): pass
  def write_videos(self, step, videos): pass
  def write_audios(self, step, audios, *, sample_rate): pass
  def write_texts(self, step, texts): pass
  def write_histograms(self, step, arrays, num_buckets=None): pass
  def write_hparams(self, hparams): pass
  def flush(self): self._file.flush()
  def close(self): self._file.close()


def initialize_distributed() -> None:
  """Starts jax.distributed for multi-process runs; CPU processes talk over gloo.

  Recoverability keeps the coordination service from aborting every process with a native trace when one is
  lost; PeerWatch stops the survivors cleanly instead.
  """
  if not FLAGS.coordinator_address and not FLAGS.multihost:
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.config.update("jax_enable_recoverability", True)
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                               heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS)
  else:
    jax.distributed.initialize(heartbeat_timeout_seconds=HEARTBEAT_TIMEOUT_SECONDS)


def shutdown_distributed() -> None:
  """Ends jax.distributed in order, after train_and_evaluate's last meeting (PeerWatch.end_of_run): the others
  disconnect, then process 0 stops the service.

  With recoverability on, process 0 would otherwise stop the coordination service under a peer that is still
  disconnecting, and that peer would abort with a native trace.
  """
  if jax.process_count() == 1:
    return
  if jax.process_index() == 0:
    from jax._src import distributed  # noqa: PLC0415  (the client is not public API)
    deadline = time.time() + 60
    while time.time() < deadline:
      with contextlib.suppress(Exception):
        if len(distributed.global_state.client.get_live_nodes(list(range(jax.process_count())))) <= 1:
          break
      time.sleep(0.2)
  jax.distributed.shutdown()


def validate_config(config: ml_collections.ConfigDict, mesh) -> None:
  """Every check that can fail before anything compiles, each naming the config key to change."""
  from mixreorg_jax.data import pixels  # noqa: PLC0415
  from mixreorg_jax.data import tokenizers  # noqa: PLC0415  (TF is imported only when training)
  train_step.check_batch(config, mesh)
  pixels.pixel_statistics(config.input.normalization)
  if config.input.batch_size % jax.process_count():
    raise ValueError(f"config.input.batch_size={config.input.batch_size} must divide over "
                     f"{jax.process_count()} processes.")
  v = config.model.vision
  if config.input.image_size % v.patch_size:
    raise ValueError(f"config.input.image_size={config.input.image_size} must be a multiple of "
                     f"config.model.vision.patch_size={v.patch_size}.")
  if config.input.noun_context_length and not 3 <= config.input.noun_context_length <= config.input.context_length:
    raise ValueError(f"config.input.noun_context_length={config.input.noun_context_length} must be 0 (the caption "
                     f"length) or in [3, config.input.context_length={config.input.context_length}].")
  if config.input.context_length > config.model.text.context_length:
    raise ValueError(f"config.input.context_length={config.input.context_length} exceeds "
                     f"config.model.text.context_length={config.model.text.context_length}.")
  if config.model.multi_label and not config.input.num_nouns:
    raise ValueError("config.model.multi_label=True needs config.input.num_nouns > 0.")
  if not 0.0 <= config.optim.ema_decay < 1.0:
    raise ValueError(f"config.optim.ema_decay={config.optim.ema_decay} must be in [0, 1) (0 = no moving average).")
  if config.loss.seg_targets not in losses.SEG_TARGETS:
    raise ValueError(f"config.loss.seg_targets={config.loss.seg_targets!r}: expected one of {losses.SEG_TARGETS}.")
  uses_nouns = {weight: bool(config.loss[weight]) for weight in losses.NOUN_TERMS}
  uses_nouns["seg_targets='nouns'"] = config.loss.seg_targets == "nouns"
  uses_nouns["w_source_nouns"] = bool(config.loss.w_source_nouns)
  for key, used in uses_nouns.items():
    if used and not config.model.multi_label:
      raise ValueError(f"config.loss.{key} needs the noun prompts of config.model.multi_label=True.")
  tokenizer = tokenizers.make_tokenizer(config.input)
  if tokenizer.vocab_size > config.model.text.vocab_size:
    raise ValueError(f"The tokenizer has {tokenizer.vocab_size} ids but config.model.text.vocab_size="
                     f"{config.model.text.vocab_size}.")
  if tokenizer.eot_id != config.model.text.eot_id:
    raise ValueError(f"The tokenizer's end-of-text id is {tokenizer.eot_id} but config.model.text.eot_id="
                     f"{config.model.text.eot_id}.")
  evaluator.check_evals(config)


def input_state_path(workdir: str, step: int) -> str:
  """Where this host's tf.data iterator position for checkpoint `step` goes.

  The process count is part of the name: a position is only meaningful for the same host sharding of the files,
  so a run on a different number of hosts starts its input afresh instead of restoring a foreign position.
  """
  name = f"process_{jax.process_index()}_of_{jax.process_count()}"
  return os.path.join(workdir_lib.input_state_dir(workdir), f"step_{step}", name)


def prune_input_states(workdir: str, keep_steps: List[int]) -> None:
  """Deletes the input positions of checkpoints the CheckpointManager no longer keeps (process 0 only)."""
  root = workdir_lib.input_state_dir(workdir)
  if jax.process_index() or not os.path.isdir(root):
    return
  for name in os.listdir(root):
    if int(name.split("_")[1]) not in keep_steps:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def latest_complete_step(ckpt_dir: str) -> Optional[int]:
  """The newest checkpoint orbax finished (renamed from <step>.orbax-checkpoint-tmp to <step>), read from disk."""
  steps = [int(n) for n in os.listdir(ckpt_dir) if n.isdigit()] if os.path.isdir(ckpt_dir) else []
  return max(steps, default=None)


def check_skips(step: int, consecutive: int, max_skipped_steps: int, ckpt_dir: str) -> None:
  """Raises FloatingPointError if step `step` is the config.max_skipped_steps-th non-finite step in a row."""
  if consecutive >= max_skipped_steps:
    raise FloatingPointError(
        f"Halting at step {step}: {consecutive} consecutive steps had a non-finite loss or gradient "
        f"(limit config.max_skipped_steps={max_skipped_steps}); lower config.optim.base_lr or check the data. "
        f"The latest checkpoint, step {latest_complete_step(ckpt_dir)} in {ckpt_dir}, holds finite parameters.")


def global_sum(value: float) -> float:
  """Sum of a host-local number over all processes (a collective: every process must call it)."""
  if jax.process_count() == 1:
    return float(value)
  return float(np.sum(multihost_utils.process_allgather(np.asarray(value, np.float64))))


@contextlib.contextmanager
def stop_on_signals(stop: Dict[str, Any]):
  """Records SIGTERM/SIGINT in stop["signal"] so the loop saves and exits at the end of the current step.

  Single-process only: with jax.distributed, SIGTERM goes to JAX's preemption service instead, and the hosts
  agree on the step to save at through multihost_utils.reached_preemption_sync_point. The previous handlers are
  put back on exit, so an in-process caller (tests, notebooks) keeps its own.
  """
  if jax.process_count() > 1:
    yield
    return
  signals = (signal.SIGTERM, signal.SIGINT)
  previous = {sig: signal.getsignal(sig) for sig in signals}
  for sig in signals:
    signal.signal(sig, lambda signum, _: stop.update(signal=signum))
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


@contextlib.contextmanager
def save_fault(spec: str):
  """Test hook config.debug_save_fault, active inside the block: a fault in orbax's commit of one checkpoint.

  "kill:STEP" SIGKILLs this process, and "enospc:STEP" fails the save with ENOSPC (a full disk), when checkpoint
  STEP has been written into its temporary directory and is about to be renamed complete: the exact moment a
  lost host or a full disk does the most harm. "" (the default) changes nothing.
  """
  if not spec:
    yield
    return
  kind, _, step = spec.partition(":")
  if kind not in ("kill", "enospc") or not step.isdigit():
    raise ValueError(f"config.debug_save_fault={spec!r}: expected '', 'kill:STEP' or 'enospc:STEP'.")
  cls = ocp.path.atomicity.AtomicRenameTemporaryPath
  finalize = cls.finalize

  async def faulty_finalize(self):
    if self.get_final().name == step:
      if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.get()))
    await finalize(self)

  cls.finalize = faulty_finalize
  try:
    yield
  finally:
    cls.finalize = finalize


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, float]:
  """Runs training to config.total_steps (resuming if possible), then every evaluation. -> final metrics.

  Raises Preempted after saving a checkpoint at the current step when SIGTERM/SIGINT (or, multi-host, a
  preemption notice) arrives, and FloatingPointError after config.max_skipped_steps consecutive non-finite steps.
  In a multi-process run, the PeerWatch covers everything from the set-up to the processes' last meeting
  (PeerWatch.end_of_run): a process lost or hung at any point stops the others with EXIT_PEER_LOST.
  """
  watch = PeerWatch(workdir_lib.checkpoint_dir(workdir), config.peer_timeout_seconds,
                    config.peer_timeout_long_seconds)
  try:
    with watch:
      try:
        results = _train_and_evaluate(config, workdir, watch)
      except Preempted:
        watch.end_of_run()
        raise
      hang_fault(config.debug_hang, config.total_steps + 1)
      watch.end_of_run()
      return results
  except jax.errors.JaxRuntimeError as e:
    watch.collective_failed(e)  # exits if a peer is gone; otherwise the error is ours to raise.
    raise


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, watch: "PeerWatch") -> Dict[str, float]:
  """train_and_evaluate's work; keeps watch.step and watch.phase current."""
  # ------------------------------------------------------------------------------------------- set-up
  t_start = time.time()
  os.makedirs(workdir, exist_ok=True)
  jax.config.update("jax_threefry_partitionable", True)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if jax.process_index() == 0:
    writer = metric_writers.MultiWriter([writer, JsonlWriter(workdir_lib.metrics_path(workdir))])
    with open(workdir_lib.config_path(workdir), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  logging.info("Config: %s", config_summary(config))
  logging.info("Full config:\n%s", config, extra=console.LOG_FILE_ONLY)

  # ------------------------------------------------------------------------------------------- mesh
  mesh = sharding.make_mesh(config.mesh)
  logging.info("Mesh %s over %d processes", dict(mesh.shape), jax.process_count())
  if not config.input.data_dir and not config.input.datasets:
    from mixreorg_jax.data import synthetic  # noqa: PLC0415
    synthetic.check_scene_share(config.input.synthetic_scene_share, "config.input.synthetic_scene_share")
    if jax.process_index() == 0:
      synthetic.ensure_synthetic_data(config.input.synthetic_dir, scene_share=config.input.synthetic_scene_share)
    _sync("synthetic data")  # the input pipeline then finds it complete on every host.
  validate_config(config, mesh)

  # ------------------------------------------------------------------------------------------- data
  from mixreorg_jax.data import input_pipeline  # noqa: PLC0415
  train_iter = input_pipeline.make_train_iterator(config.input)
  batch_sharding = sharding.batch_sharding(mesh)

  # ------------------------------------------------------------------------------------------- model init
  model = groupvit.GroupViT.from_config(config.model)
  tx, schedule = optim.make_optimizer(config.optim, config.input.batch_size, config.total_steps)
  abstract = train_step.abstract_state(config, model, tx)
  state_shardings = sharding.state_shardings(mesh, abstract)
  logging.info("Parameters: %s", f"{int(parameter_overview.count_parameters(abstract.params)):,}")
  logging.info("%s", parameter_overview.get_parameter_overview(abstract.params, include_stats=False),
               extra=console.LOG_FILE_ONLY)

  # ------------------------------------------------------------------------------------------- restore
  # Orbax writes a checkpoint into `<step>.orbax-checkpoint-tmp` and renames it when complete, so a save cut
  # short (SIGKILL, lost host) is never taken for the latest step.
  ckpt_dir = workdir_lib.checkpoint_dir(workdir)
  manager = ocp.CheckpointManager(ckpt_dir, options=ocp.CheckpointManagerOptions(
      max_to_keep=config.keep_ckpts, enable_async_checkpointing=True, create=True))
  latest = manager.latest_step()
  if latest is None:
    state = train_step.jit_init_state(config, model, tx, state_shardings)(jax.random.key(config.seed))
  else:
    # Restoring onto this run's shardings re-lays the arrays out for whatever mesh and device count it has.
    target = train_step.sharded_abstract_state(abstract, state_shardings)
    state = manager.restore(latest, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    path = input_state_path(workdir, latest)
    if os.path.exists(path + ".index"):
      train_iter.restore_state(path)
    else:
      logging.warning("No input position for step %d on process %d of %d (the process count changed?); the "
                      "input restarts from the beginning of its shuffle.", latest, jax.process_index(),
                      jax.process_count())
    logging.info("Resumed from step %d", latest)
  first_step = int(jax.device_get(state.step))
  evaluations = evaluator.Evaluations.for_training(config, model, workdir,
                                                   evaluator.initial_variables(config, model, state))
  saving = {"step": None}  # the step of the save in flight, for SaveFailed's message.

  def finish_saving() -> None:
    """Waits for the asynchronous save in flight; its failure becomes SaveFailed (naming step and directory)."""
    try:
      manager.wait_until_finished()
    except Exception as e:  # orbax re-raises whatever its commit thread hit (OSError, tensorstore errors, ...)
      raise SaveFailed(f"Saving checkpoint {saving['step']} into {ckpt_dir} failed: {e!r}. The latest complete "
                       f"checkpoint is step {latest_complete_step(ckpt_dir)}; free space or fix the directory, "
                       "then rerun the same command to resume from it.") from e

  def save(step: int, force: bool = False) -> None:
    # Skipped updates keep the last finite parameters, so this only fires if a finite step produced a NaN.
    if not np.isfinite(float(jax.device_get(optax.global_norm(state.params)))):
      raise FloatingPointError(f"Refusing to checkpoint non-finite parameters at step {step} into {ckpt_dir}; the "
                               f"latest checkpoint, step {latest_complete_step(ckpt_dir)}, holds finite ones.")
    finish_saving()  # the previous save, long done at config.ckpt_steps apart, must not fail unseen.
    saving["step"] = step
    try:
      train_iter.save_state(input_state_path(workdir, step))
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=force)
    except Exception as e:
      raise SaveFailed(f"Saving checkpoint {step} into {ckpt_dir} failed: {e!r}. The latest complete checkpoint "
                       f"is step {latest_complete_step(ckpt_dir)}.") from e
    prune_input_states(workdir, list(manager.all_steps()) + [step])

  # ------------------------------------------------------------------------------------------- the jitted step
  step_fn = train_step.jit_train_step(config, model, tx, schedule, mesh, state_shardings)
  setup_seconds = time.time() - t_start
  t0 = time.time()
  compiled = step_fn.lower(state, train_step.abstract_batch(config, mesh)).compile()
  compile_seconds = time.time() - t0
  logging.info("Set-up (data, init, restore) %.1f s; compiled the train step in %.1f s", setup_seconds,
               compile_seconds)
  writer.write_scalars(first_step, {"setup_seconds": setup_seconds, "compile_seconds": compile_seconds})

  # ------------------------------------------------------------------------------------------- the loop
  # Progress (steps/s, ETA) is reported right after each log window's metrics fetch, when the device has caught
  # up with the dispatched steps; timed reports in between would only measure dispatch.
  hooks = [periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer,
                                           every_steps=config.log_steps, every_secs=None)]
  if config.profile_steps and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(num_profile_steps=config.profile_steps, logdir=workdir,
                                          first_profile=first_step + config.log_steps))
  stop = {"signal": None}
  pending: List[Dict[str, jax.Array]] = []
  window_start = time.time()
  try:
    with stop_on_signals(stop), save_fault(config.debug_save_fault):
      for step in range(first_step + 1, config.total_steps + 1):
        watch.step, watch.phase = step, "setup" if step == first_step + 1 else "train"
        hang_fault(config.debug_hang, step)
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
          batch = input_pipeline.make_global_batch(next(train_iter), batch_sharding)
          state, metrics = compiled(state, batch)
        pending.append(metrics)
        if len(pending) > MAX_STEPS_IN_FLIGHT:
          # Dispatch is asynchronous: without a bound the host would queue a whole log window of steps ahead
          # of the device, holding their batches in memory and delaying a preemption save by that much.
          done = pending[-1 - MAX_STEPS_IN_FLIGHT]
          # Its skip counter is ready now, so reading it costs no extra sync: the guard halts at the exact step
          # the limit was reached, at most MAX_STEPS_IN_FLIGHT steps later (and never after saving past it).
          with watch.during(WAITING):
            consecutive = int(done["consecutive_skips"])
          check_skips(step - MAX_STEPS_IN_FLIGHT, consecutive, config.max_skipped_steps, ckpt_dir)
        if step % config.log_steps == 0 or step == config.total_steps:
          with watch.during(WAITING):
            fetched = jax.device_get(pending)  # one host sync per log window, not per step.
          summary = {f"train/{k}": float(np.mean([m[k] for m in fetched])) for k in fetched[0]
                     if k not in ("skipped", "consecutive_skips")}
          summary["train/skipped_steps"] = float(jax.device_get(state.skipped_steps))
          seconds_per_step = (time.time() - window_start) / len(pending)
          summary["train/images_per_sec"] = config.input.batch_size / seconds_per_step
          skipped = train_iter.skipped()
          with watch.during(WAITING):
            summary["data/skipped_files"] = global_sum(skipped.pop("corrupt_file"))
            summary["data/skipped"] = global_sum(sum(skipped.values()))
          writer.write_scalars(step, summary)
          logging.info("%s", step_line(step, config.total_steps, summary, seconds_per_step))
          for i, m in enumerate(fetched):  # after the window's metrics are written: they show the non-finite steps.
            check_skips(step - len(fetched) + 1 + i, int(m["consecutive_skips"]), config.max_skipped_steps, ckpt_dir)
          pending, window_start = [], time.time()
        with watch.during("hooks"):
          for hook in hooks:
            hook(step)
        preempted = stop["signal"] is not None or (
            jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(step))
        if step % config.ckpt_steps == 0 or step == config.total_steps or preempted:
          # A save syncs anyway: the step about to be saved must not be the one that reached the limit.
          check_skips(step, int(metrics["consecutive_skips"]), config.max_skipped_steps, ckpt_dir)
          with watch.during("save"):
            save(step, force=preempted)
        if preempted:
          raise Preempted(f"Stopped by a signal or preemption notice at step {step}; checkpoint written to "
                          f"{ckpt_dir}.")
        if evaluations.due(step) and step < config.total_steps:  # the last step's are the final evaluation.
          with watch.during("eval"):
            writer.write_scalars(step, evaluations.run(variables(state), step, final=False))
      with watch.during("save"):
        finish_saving()  # a pending async save completes (or fails loudly) before a clean exit ...
  finally:
    # Past the last step (or the preemption save): the save's wait and close are a save's phase for the peer watch.
    with watch.during("save"):
      with contextlib.suppress(Exception):  # ... and, quietly, before any other: the first error is the one to see.
        manager.wait_until_finished()
      with contextlib.suppress(Exception):
        manager.close()
      writer.flush()

  # ------------------------------------------------------------------------------------------- final evaluation
  with watch.during("eval"):  # the plot too: process 0 draws it while the others wait at the end of the run.
    results = evaluations.run(variables(state), config.total_steps, final=True)
    if results:
      writer.write_scalars(config.total_steps, results)
    writer.close()
    if results and jax.process_index() == 0:
      visualize.plot_training_curves(workdir_lib.metrics_path(workdir),
                                     os.path.join(workdir, "training_curves.png"))
  return results


def variables(state) -> Dict[str, Any]:
  """The {"params", "batch_stats"} of a TrainState, as the evaluations take them: the parameters' moving average
  when the run keeps one (config.optim.ema_decay > 0)."""
  params = state.params if state.ema_params is None else state.ema_params
  return {"params": params, "batch_stats": state.batch_stats}


def config_summary(config: ml_collections.ConfigDict) -> str:
  """One line: the run's size; the full config goes to the log file and WORKDIR/config.json."""
  v = config.model.vision
  return (f"{config.total_steps} steps at global batch {config.input.batch_size}, {config.input.image_size} px, "
          f"vision width {v.width} depths {tuple(v.depths)} groups {tuple(v.num_output_groups)}, "
          f"lr {config.optim.base_lr:g}, seed {config.seed}, "
          f"evals {', '.join(evaluator.enabled_evals(config)) or 'off'}")


def step_line(step: int, total_steps: int, summary: Mapping[str, float], seconds_per_step: float) -> str:
  """The console line of one log step: step, loss and its terms, images/s, ETA (and skips, when there are any).

  `summary` holds the log window's values as written to the metric writers (train/loss, train/loss_<term>,
  train/images_per_sec, train/skipped_steps, data/skipped, data/skipped_files); the ETA assumes the remaining
  steps take `seconds_per_step` each.
  """
  terms = " ".join(f"{k[len('train/loss_'):]} {v:.4g}" for k, v in sorted(summary.items())
                   if k.startswith("train/loss_"))
  eta = datetime.timedelta(seconds=round((total_steps - step) * seconds_per_step))
  line = (f"step {step}/{total_steps}  loss {summary['train/loss']:.6g} ({terms})  "
          f"{summary['train/images_per_sec']:.1f} img/s  ETA {eta}")
  skips = [(int(summary.get(key, 0)), name) for key, name in (
      ("train/skipped_steps", "steps"), ("data/skipped", "records"), ("data/skipped_files", "files"))]
  if any(n for n, _ in skips):
    line += "  skipped " + ", ".join(f"{n} {name}" for n, name in skips if n)
  return line


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def main(argv):
  del argv
  initialize_distributed()
  name = "train" if jax.process_count() == 1 else f"train.{jax.process_index()}"
  console.to_log_file(os.path.join(FLAGS.workdir, f"{name}.log"))
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
    shutdown_distributed()
  except Preempted as e:
    logging.warning("%s", e)
    shutdown_distributed()
  except (SaveFailed, FloatingPointError) as e:  # a plain message on the console, the traceback in the log file.
    logging.error("%s", e)
    logging.info("Traceback of the stop", exc_info=True, extra=console.LOG_FILE_ONLY)
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  jax.config.config_with_absl()
  app.run(main)
