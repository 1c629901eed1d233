"""Training runs, as used by ``fmjax train``: configuration, the one training loop for every kind of run,
evaluation, sampling and likelihoods of trained runs, and reflow.

- ``config``: ``RunConfig``, every hyperparameter and the one source of ``fmjax train``'s options;
- ``options``: the option metadata of ``RunConfig``'s fields, the kinds of run, and the rules between options;
- ``streams``: the run's named random streams (``STREAMS``, ``stream_key``);
- ``rundir``: the run directory's files, lock, atomic writes and metrics log;
- ``distributed``: the device mesh and the agreement of a run's processes;
- ``pipeline``: chunks of steps, prefetched input and host-solved pairs;
- ``run``: ``Run`` (model, optimiser, state) and ``load_run``;
- ``loop``: ``train``, the loop itself;
- ``tasks``: what differs between kinds of run (``toy``: 2D samplers and an MLP; ``images``: a tfds
  dataset and a UNet; ``sphere``: an Earth dataset on S^2 and a tangent MLP), picked by ``RunConfig.kind``;
- ``evaluate``, ``reflow``: the evaluation of a trained run, and a reflow run prepared from one.

>>> import tempfile
>>> from fmjax.runs import RunConfig, train
>>> config = RunConfig(steps=20, batch_size=64, log_every=10, eval_samples=200)
>>> run = train(config, tempfile.mkdtemp())
>>> int(run.state.step)
20
"""

from fmjax.runs.config import (
    DATASET_CHANNEL_MULTS,
    DEFAULT_SIGMA,
    DEFAULT_SIGMA_IMAGES,
    EULER_STEPS,
    IMAGE_DEFAULTS,
    KINDS,
    RunConfig,
)
from fmjax.runs.distributed import environment, make_mesh, versions
from fmjax.runs.evaluate import evaluate
from fmjax.runs.loop import TrainingInterrupted, first_nonfinite, train
from fmjax.runs.reflow import REFLOW_INITS, prepare_reflow
from fmjax.runs.run import Run, load_run
from fmjax.runs.rundir import (
    CHECKPOINT_DIR,
    CONFIG_FILE,
    LOCK_FILE,
    METRICS_FILE,
    PAIRS_FILE,
    SUMMARY_FILE,
    TENSORBOARD_DIR,
    RunLock,
    append_record,
    check_run_dir,
    pairs_path,
    resume_metrics,
    write_atomic,
)
from fmjax.runs.sinks import log_to_sinks
from fmjax.runs.streams import STREAMS, stream_key
from fmjax.runs.tasks import TASKS, task_of
from fmjax.runs.tasks.toy import class_points, generate, negative_log_likelihood
from fmjax.runs.velocity import check_class, check_finite_params, run_velocity

__all__ = [
    "RunConfig",
    "Run",
    "TrainingInterrupted",
    "train",
    "evaluate",
    "load_run",
    "generate",
    "negative_log_likelihood",
    "prepare_reflow",
    "STREAMS",
    "stream_key",
    "TASKS",
    "task_of",
    "KINDS",
    "IMAGE_DEFAULTS",
    "DATASET_CHANNEL_MULTS",
    "DEFAULT_SIGMA",
    "DEFAULT_SIGMA_IMAGES",
    "EULER_STEPS",
    "REFLOW_INITS",
    "CONFIG_FILE",
    "METRICS_FILE",
    "SUMMARY_FILE",
    "CHECKPOINT_DIR",
    "LOCK_FILE",
    "TENSORBOARD_DIR",
    "PAIRS_FILE",
    "RunLock",
    "append_record",
    "check_run_dir",
    "pairs_path",
    "resume_metrics",
    "write_atomic",
    "log_to_sinks",
    "make_mesh",
    "environment",
    "versions",
    "first_nonfinite",
    "class_points",
    "check_class",
    "check_finite_params",
    "run_velocity",
]
