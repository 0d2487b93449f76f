r"""Train a model: `python -m mrcnn_jax.main --config=configs/FILE.py[:arg] --workdir=DIR [--config.key=value ...]`.

The config is an ml_collections file, locked, so a misspelt override fails before anything runs. Restarting with the
same workdir resumes from its newest checkpoint. On a TPU pod or a multi-node GPU cluster, run the same command on
every host with `--distributed` (jax.distributed.initialize: it finds the coordinator itself on Cloud TPU and
under SLURM; elsewhere set JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID); each host then reads its
own shard of the data and the global batch is split over all devices.
"""

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file: configs/FILE.py[:arg].", lock_config=True)
flags.DEFINE_string("workdir", None, "Where checkpoints and metrics.jsonl go; an existing one is resumed.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() first (multi-host runs).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  import jax

  if FLAGS.distributed:
    jax.distributed.initialize()
  from mrcnn_jax import train

  logging.info("jax %s, %d processes, %d devices (%s)", jax.__version__, jax.process_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  train.train(FLAGS.config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
