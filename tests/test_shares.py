"""The share rule of many-item jobs (parallel/shares.py): what each process does, against the
plain set arithmetic it must equal."""

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
