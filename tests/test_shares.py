"""The share rule of many-item jobs (parallel/shares.py): what each process does, against the
plain set arithmetic it must equal."""

import os

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmar_jax.parallel import shares


@pytest.mark.parametrize("first, second", [(2, 3), (3, 2), (1, 4), (4, 1)])
def test_a_run_resumed_on_another_process_count_does_each_missing_item_once(first, second):
  """A run of `first` processes stopped part-way (each did a different number of its items),
  then resumed on `second`: the resumed shares are disjoint and cover exactly the items not
  done, and every item is done exactly once over both runs."""
  items = [(i, k) for i in range(11) for k in range(2)]
  todo = shares.missing(items, [False] * len(items))
  done_first = []
  for p in range(first):
    mine = shares.share(todo, p, first)
    done_first += mine[:p + 1]  # killed after p + 1 items
  done = [it in set(done_first) for it in items]
  left = shares.missing(items, done)
  resumed = [shares.share(left, p, second) for p in range(second)]
  flat = [it for part in resumed for it in part]
  assert sorted(flat) == sorted(set(items) - set(done_first))
  assert len(flat) == len(set(flat))
  assert sorted(done_first + flat) == sorted(items)
  assert max(map(len, resumed)) - min(map(len, resumed)) <= 1  # balanced


def test_missing_keeps_input_order_and_checks_lengths():
  assert shares.missing(list("abcde"), [False, True, False, True, False]) == ["a", "c", "e"]
  with pytest.raises(ValueError, match="3 items but 2"):
    shares.missing([1, 2, 3], [True, False])
  with pytest.raises(ValueError, match="process 2"):
    shares.share([1], 2, 2)


def test_batches_pad_with_the_last_item():
  got = list(shares.batches(list(range(5)), 2))
  assert got == [([0, 1], [0, 1]), ([2, 3], [2, 3]), ([4], [4, 4])]


@pytest.mark.parametrize("spec", [P(("data", "fsdp")), P(), P("fsdp")])
def test_every_row_of_a_global_array_has_one_owner(cpu_devices, spec):
  """Rows split over 8 devices, replicated, or split over 4 and replicated over 2: each row
  comes out once, with its value (in one process every shard is addressable)."""
  mesh = Mesh(np.asarray(cpu_devices).reshape(2, 4, 1), ("data", "fsdp", "tensor"))
  host = np.arange(8 * 3).reshape(8, 3)
  array = shares.global_rows(host, NamedSharding(mesh, spec))
  rows = sorted(shares.owned_rows(array), key=lambda r: r[0])
  assert [r for r, _ in rows] == list(range(8))
  np.testing.assert_array_equal(np.stack([v for _, v in rows]), host)


def test_agreed_in_one_process_is_the_check():
  assert shares.agreed(lambda i: i % 2 == 0, 4, "t") == [True, False, True, False]
  assert jax.process_count() == 1


def test_item_records_resume_refuse_another_job_and_merge(tmp_path):
  """Records of finished items survive a re-run with the same plan, a different plan is refused
  naming the folder (unless --overwrite, which starts over), and the merge writes the output
  and removes the folder with every temporary file."""
  from mmar_jax.errors import InputError
  out = tmp_path / "captions.jsonl"
  records = shares.ItemRecords(out, dict(inputs=[("a.png", None)], seed=0))
  records.check(False)
  records.start(False)
  records.write("00000000", {"image": "a.png", "caption": "x"})
  (records.dir / ".00000001.json.tmp-abc").write_text("half")  # a process killed mid-write
  again = shares.ItemRecords(out, dict(inputs=[("a.png", None)], seed=0))
  again.check(False)
  again.start(False)
  assert again.has("00000000") and not again.has("00000001")
  assert sorted(p.name for p in again.dir.iterdir()) == ["00000000.json", "plan.json"]
  other = shares.ItemRecords(out, dict(inputs=[("a.png", None)], seed=1))
  with pytest.raises(InputError, match=str(other.dir)):
    other.check(False)
  other.check(True)
  other.start(True)
  assert not other.has("00000000")
  other.write("00000000", {"image": "a.png", "caption": "y"})
  other.finish(b"merged\n")
  assert out.read_bytes() == b"merged\n" and os.listdir(tmp_path) == ["captions.jsonl"]


def test_item_keys_fold_each_index_in_turn():
  key = jax.random.key(3)
  want = jax.random.key_data(jax.random.fold_in(jax.random.fold_in(key, 4), 1))
  np.testing.assert_array_equal(shares.item_keys(3, [(4, 1)])[0], want)
  np.testing.assert_array_equal(shares.item_keys(3, [7])[0],
                                jax.random.key_data(jax.random.fold_in(key, 7)))
