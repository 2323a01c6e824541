import sys

from mmar_jax.cli import main

sys.exit(main())
