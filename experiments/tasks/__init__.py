"""The tasks an experiment can train on, one file each, found through a registry.

``data.task=<name>`` picks the `Task` registered under that name; its config section
is ``data.<name>``.  Built in: ``lm`` (bytes of text), ``recall`` (associative
recall), ``passkey`` (retrieve one value thousands of tokens back), ``sort``
(sorting), ``classify`` (an encoder labels a variable-length sequence) and
``translate`` (an encoder-decoder transliterates and reverses a string).  The
protocol and the shared parts are in `experiments.tasks.base`; to add a task, write
its module and import it below.

Example:
  >>> from experiments import tasks
  >>> sorted(tasks.REGISTRY)
  ['classify', 'lm', 'passkey', 'recall', 'sort', 'translate']
"""

from experiments.tasks import classify, lm, passkey, recall, sort, translate  # noqa: F401 (importing a task registers it)
from experiments.tasks.base import REGISTRY, Task, build, get, register  # noqa: F401

DEFAULT = "recall"  # data.task when a config does not say
