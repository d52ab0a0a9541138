"""Tasks: what differs between kinds of runs (data, model, loss, eval, headline metrics).

`config.task` names one of `TASKS`; see `experiments.tasks.base` for the interface. Importing
this package registers the built-in tasks.
"""
from experiments.tasks import classify  # noqa: F401 (registers "classify")
from experiments.tasks import forecast  # noqa: F401 (registers "forecast")
from experiments.tasks import lm  # noqa: F401 (registers "lm")
from experiments.tasks import recsys  # noqa: F401 (registers "recsys")
from experiments.tasks import sae  # noqa: F401 (registers "sae")
from experiments.tasks.base import TASKS
from experiments.tasks.base import Task
from experiments.tasks.base import batch_sharding
from experiments.tasks.base import build_task
from experiments.tasks.base import param_counts
from experiments.tasks.base import weighted_cross_entropy
