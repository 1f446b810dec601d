"""Errors raised for bad configurations and bad inputs."""


class ConfigError(ValueError):
  """A configuration value is invalid.

  The message always names the dotted config field (e.g. ``model.moe.top_k``),
  the offending value, and what is allowed.
  """


def config_error(field: str, value, allowed: str) -> ConfigError:
  """Builds a ConfigError with the project's standard message layout."""
  return ConfigError(f"{field}={value!r} is invalid: {allowed}")
