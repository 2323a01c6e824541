"""`mmar-jax` and `python -m mmar_jax`: the command line's XLA setup, then the command."""

import sys

from mmar_jax import startup


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  for note in startup.configure(argv):
    print(f"[mmar-jax] {note}", file=sys.stderr)
  # Imported after configure: the command modules import JAX, which reads XLA_FLAGS only once.
  from mmar_jax import cli
  return cli.main(argv)


if __name__ == "__main__":
  sys.exit(main())
