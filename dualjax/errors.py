"""Errors that are the user's to fix: reported in one line naming the field or file, exit code 2."""


class ConfigError(ValueError):
  """A configuration that cannot run; the message names the field."""
