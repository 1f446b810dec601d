"""A ``--config`` file that reads a run's config.json: ``--config=<this file>:runs/x/config.json``
(``moejax.train`` rewrites ``--config=runs/x/config.json`` to that)."""


def get_config(path: str):
  from moejax.training.workdir import load_config_json

  return load_config_json(path)
