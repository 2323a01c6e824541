"""The errors that several packages raise for bad user input; the CLI turns each into one line
on stderr and exit status 2."""


class ConfigError(ValueError):
  """A config file, key or value given by the user is not usable."""


class ConversionError(ValueError):
  """A checkpoint that cannot be converted; the message names the tensor, key or file."""


class InputError(ValueError):
  """A data file given on the command line (prompts, benchmark records) is not usable; the
  message names the file and line."""
