"""`mmar-jax prepare-data --config CFG --src SOURCE --out DIR`: encode a data source's images into
`latents:` shards (data/prepare.py), on one process or on every process of a pod."""

from __future__ import annotations

import json

from mmar_jax import config as config_lib
from mmar_jax import startup
from mmar_jax.data.prepare import prepare
from mmar_jax.parallel import distributed


def add_args(p):
  p.add_argument("--config", required=True, help="config file[:variant] (model.image, init.vae)")
  p.add_argument("--src", required=True,
                 help="demo | folder:PATH | jsonl:PATH | wds:GLOB | tfds[:NAME] (data.tfds.*)")
  p.add_argument("--out", required=True, help="output directory (local or gs://)")
  p.add_argument("--records-per-shard", type=int, default=10000)
  p.add_argument("--batch-size", type=int, default=64,
                 help="images per device in an encoder call (the same on every device, so the "
                      "latents do not depend on the device count)")
  p.add_argument("--threads", type=int, default=8, help="threads reading and decoding images")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out (deleted first), or restart another job's unfinished one")
  distributed.add_arguments(p)


def cli_prepare_data(args) -> int:
  distributed.join(args)  # before any other JAX call
  startup.log_to_console()
  config = config_lib.apply_overrides(config_lib.load_file(args.config), args.config_overrides)
  meta, here = prepare(config, args.src, args.out, records_per_shard=args.records_per_shard,
                       batch_size=args.batch_size, threads=args.threads, overwrite=args.overwrite)
  print(json.dumps(here), flush=True)
  if meta is not None:
    print(f"prepare-data: {meta['records']} records ({meta['unreadable']} unreadable), tokens "
          f"{meta['token_shape']} -> {args.out}", flush=True)
  return 0
