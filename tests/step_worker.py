r"""Steps of the train step on a fixed batch, on the mesh of every process's devices.

As one process of a multi-process run (started by tests/test_train_processes.py):

  python -m tests.step_worker ADDRESS NUM_PROCESSES PROCESS_ID OUT.npz '{"input.micro_batch_size": 8, ...}'

The processes talk over gloo on 127.0.0.1; process 0 writes every step's metrics to OUT.npz.
"""
import json
import sys
from typing import Dict

import jax
import ml_collections
import numpy as np

STEPS = 3


def steps_on_fixed_batch(config: ml_collections.ConfigDict, devices=None) -> Dict[str, np.ndarray]:
  """STEPS train steps of `config` on tests/helpers.random_batch over a config.mesh of `devices` (default all, of
  every process). Every process builds the same batch and gives its devices their rows of it, so the global batch
  is the one a single process steps on. -> {"step{i}/{metric}": value}."""
  from mixreorg_jax import optim  # noqa: PLC0415  (imported after jax.distributed.initialize)
  from mixreorg_jax import sharding  # noqa: PLC0415
  from mixreorg_jax import train_step  # noqa: PLC0415
  from mixreorg_jax.models import groupvit  # noqa: PLC0415
  from tests import helpers  # noqa: PLC0415

  mesh = sharding.make_mesh(config.mesh, devices)
  train_step.check_batch(config, mesh)
  model = groupvit.GroupViT.from_config(config.model)
  tx, schedule = optim.make_optimizer(config.optim, config.input.batch_size, config.total_steps)
  shardings = sharding.state_shardings(mesh, train_step.abstract_state(config, model, tx), min_size=64)
  state = train_step.jit_init_state(config, model, tx, shardings)(jax.random.key(config.seed))
  rows = jax.device_get(helpers.random_batch(config))
  batch = {k: jax.make_array_from_callback(v.shape, sharding.batch_sharding(mesh), lambda index, v=v: v[index])
           for k, v in rows.items()}
  step = train_step.jit_train_step(config, model, tx, schedule, mesh, shardings)
  logged = {}
  for i in range(STEPS):
    state, metrics = step(state, batch)  # metrics are replicated: every process holds them.
    logged.update({f"step{i}/{k}": np.asarray(v.addressable_data(0)) for k, v in metrics.items()})
  return logged


def main(address: str, num_processes: str, process_id: str, out: str, overrides: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(address, int(num_processes), int(process_id))
  from tests import helpers  # noqa: PLC0415
  logged = steps_on_fixed_batch(helpers.tiny_config(**json.loads(overrides)))
  if jax.process_index() == 0:
    np.savez(out, **logged)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(*sys.argv[1:])
