"""The output folder of `prepare-data`, shared by every process of the run (data/prepare.py).

  DIR/latents-KKKKK-of-NNNNN.array_record   shard K, complete (renamed or uploaded whole)
  DIR/.progress/plan.json                   what the job is: a re-run resumes only the same job
  DIR/.progress/shard-KKKKK.json            shard K's summary, written before the shard appears
  DIR/latents.json                          last, by process 0: DIR is now a `latents:` source

`.progress/` is removed once `latents.json` is written; an interrupted run leaves it, and the
temporary `.NAME.tmp-*` of a shard being written, which the next run's process 0 deletes before
any process writes again.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from array_record.python.array_record_module import ArrayRecordWriter
from etils import epath

from mmar_jax.data import sources
from mmar_jax.errors import ConfigError
from mmar_jax.files import remove_temporaries, write_bytes_atomic

SHARD = "latents-{:05d}-of-{:05d}.array_record"
PROGRESS = ".progress"
PLAN = "plan.json"
NAMED = 20  # unreadable records named in latents.json; all are counted


def shard_names(records: int, per_shard: int) -> list[str]:
  num = max(1, -(-records // per_shard))
  return [SHARD.format(k, num) for k in range(num)]


class Output:
  """DIR of one prepare-data job, described by `plan` (records, shards, source, fingerprint)."""

  def __init__(self, out: str, plan: dict):
    self.out, self.plan = out, plan
    self.path = epath.Path(out)
    self.progress = self.path / PROGRESS

  def verdict(self, overwrite: bool) -> str:
    """new | resume | replace, from what DIR holds. Reads only: every process calls it before
    any writes, so all see the same folder and stop with the same error."""
    if not self.path.exists() or not any(self.path.iterdir()):
      return "new"
    if (self.path / sources.LATENTS_META).exists():
      if not overwrite:
        raise FileExistsError(f"output {self.out} exists; pass --overwrite to replace it")
      return "replace"
    plan_path = self.progress / PLAN
    if plan_path.exists():
      stored = json.loads(plan_path.read_text())
      if stored == self.plan:
        return "resume"
      if not overwrite:
        differ = sorted(k for k in set(stored) | set(self.plan) if stored.get(k) != self.plan.get(k))
        raise ConfigError(f"{self.out} holds an unfinished prepare-data of another job (it differs "
                          f"in {', '.join(differ)}); pass --overwrite to start it again")
      return "replace"
    if not overwrite:
      raise FileExistsError(f"output {self.out} exists and is not a prepare-data output; pass "
                            "--overwrite to replace it")
    return "replace"

  def start(self, verdict: str) -> None:
    """Process 0, before any other writes: an empty or resumable DIR with this job's plan."""
    if verdict == "replace":  # asked for with --overwrite: the old output goes first
      self.path.rmtree()
    self.progress.mkdir(parents=True, exist_ok=True)
    write_bytes_atomic(self.progress / PLAN, _json(self.plan))
    remove_temporaries(self.out)  # of a process killed while writing a shard

  def done(self, k: int) -> bool:
    return (self.path / self.plan["shards"][k]).exists()

  def write_shard(self, k: int, records, summarize) -> dict:
    """Writes the record bytes of `records` as shard k; `summarize()` (called once they are all
    written) gives its summary, stored before the shard appears under its name."""
    name = self.plan["shards"][k]
    remote = "://" in self.out
    # Local: beside the target, then renamed. Remote: on local disk, then uploaded whole.
    where = tempfile.mkdtemp(prefix="mmar-latents-") if remote else self.out
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.tmp-", dir=where)
    os.close(fd)
    try:
      writer = ArrayRecordWriter(tmp, "group_size:1")
      for data in records:
        writer.write(data)
      writer.close()
      summary = summarize()
      write_bytes_atomic(self.progress / f"shard-{k:05d}.json", _json(summary))
      if remote:
        epath.Path(tmp).copy(self.path / name)
      else:
        os.replace(tmp, self.path / name)
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
      if remote:
        shutil.rmtree(where, ignore_errors=True)
    return summary

  def finish(self) -> dict:
    """Process 0, after every shard is written: latents.json from the shards' summaries."""
    summaries = [json.loads((self.progress / f"shard-{k:05d}.json").read_text())
                 for k in range(len(self.plan["shards"]))]
    named = [r for s in summaries for r in s["unreadable"]][:NAMED]
    shapes = [s["token_shape"] for s in summaries if s["token_shape"] is not None]
    meta = dict(self.plan,
                unreadable=sum(s["unreadable_count"] for s in summaries),
                unreadable_records=named, token_shape=shapes[0] if shapes else None,
                created_by="mmar-jax prepare-data")
    write_bytes_atomic(self.path / sources.LATENTS_META, _json(meta))
    self.progress.rmtree()
    return meta


def _json(obj) -> bytes:
  return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()
