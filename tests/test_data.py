"""Input pipelines: one global index stream sliced by processes, resumable at a global example
index; the sources (folders, JSONL manifests, webdataset tars, TFDS array_record, prepared
latents) with their bad records skipped or truncated and counted."""

import io
import json
import logging
import os
import tarfile

import jax
import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TINY, tiny_config
from mmar_jax import cli
from mmar_jax.data import sources
from mmar_jax.data.pipeline import Batcher, global_batch, local_rows, record_order

LONG = "a very long caption " * 4  # 80 bytes: over the tiny model's 40 text tokens


def _batcher(source, tokenizer, **kw):
  kw = dict(dict(batch_size=8, max_text_len=40, seed=0, mix="0.45,0.45,0.1"), **kw)
  return Batcher(source, tokenizer, **kw)


def _equal(a: dict, b: dict):
  assert sorted(a) == sorted(b)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# -- the index stream -------------------------------------------------------------------------------


def test_processes_slice_one_global_batch(demo_batcher, bytes_tokenizer):
  """Two processes' slices, put together, are the one-process batch; and the rows a process
  builds are the rows its devices hold."""
  whole = demo_batcher.local_batch(3)
  parts = [_batcher(demo_batcher.source, bytes_tokenizer, process_index=i, process_count=2).local_batch(3)
           for i in range(2)]
  _equal(whole, {k: np.concatenate([p[k] for p in parts]) for k in whole})
  np.testing.assert_array_equal(whole["index"], np.arange(24, 32))
  from mmar_jax.parallel.mesh import make_mesh
  from jax.sharding import NamedSharding, PartitionSpec as P
  sharding = NamedSharding(make_mesh("2,2,2"), P(("data", "fsdp")))
  np.testing.assert_array_equal(local_rows(sharding, 8), np.arange(8))
  batch = global_batch(demo_batcher, 3, sharding)
  np.testing.assert_array_equal(np.asarray(batch["index"]), whole["index"])


def test_resume_at_a_global_example_index(demo_batcher, bytes_tokenizer):
  fresh = _batcher(demo_batcher.source, bytes_tokenizer)
  fresh.resume(5, 40)
  _equal(fresh.local_batch(6), demo_batcher.local_batch(6))
  # A batch size changed on resume continues the stream where it stopped: nothing repeated.
  half = _batcher(demo_batcher.source, bytes_tokenizer, batch_size=4)
  half.resume(10, 80)
  np.testing.assert_array_equal(half.local_batch(11)["index"], np.arange(84, 88))


def test_every_record_once_per_epoch_in_a_new_order():
  order = record_order(50, seed=3)
  epochs = np.asarray([int(order[i]) for i in range(150)]).reshape(3, 50)
  for e in epochs:
    assert sorted(e) == list(range(50))
  assert (epochs[0] != epochs[1]).any() and (epochs[1] != epochs[2]).any()
  again = record_order(50, seed=3)
  assert [int(again[i]) for i in range(150)] == epochs.ravel().tolist()


def test_threads_build_the_same_batches(demo_batcher, bytes_tokenizer):
  b = _batcher(demo_batcher.source, bytes_tokenizer)
  it = b.batches(7, threads=2, prefetch=2)
  for step in (7, 8, 9):
    _equal(next(it), demo_batcher.local_batch(step))


def test_mix_sets_the_kinds(demo_batcher, bytes_tokenizer):
  only_t2i = _batcher(demo_batcher.source, bytes_tokenizer, mix="1,0,0")
  assert (only_t2i.local_batch(0)["kind"] == 0).all()
  # Fixed counts per batch: 0.45, 0.45, 0.1 of 8 by largest remainder (3.6, 3.6, 0.8) is 4, 3, 1.
  for s in range(10):
    assert tuple(np.bincount(demo_batcher.local_batch(s)["kind"], minlength=3)) == (4, 3, 1)


# -- sources with bad records ---------------------------------------------------------------------


def _png(seed: int, size=(20, 24)) -> bytes:
  rng = np.random.default_rng(seed)
  buf = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, format="PNG")
  return buf.getvalue()


def _jpeg(seed: int) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
      buf, format="JPEG")
  return buf.getvalue()


# name -> (image bytes or None, caption or None); what each does to a Batcher with max_text_len 40.
SAMPLES = {
    "good0": (_png(0), "a red square at the top"),
    "good1": (_png(1), "a blue plus at the left"),
    "good2": (_jpeg(2), "a green cross"),
    "good3": (_png(3, (40, 16)), "a tall picture"),
    "long": (_png(4), LONG),                 # truncated (or skipped with long_caption=skip)
    "empty": (_png(5), "   "),               # skipped: empty caption
    "nocap": (_png(6), None),                # skipped: no caption
    "trunc": (_jpeg(7)[:200], "cut short"),  # skipped: truncated image file
    "text": (b"this is not an image", "not an image"),  # skipped: not an image
}
USABLE, SKIPPED, TRUNCATED = 5, 4, 1


def _scan(source, tokenizer, long_caption="truncate"):
  """Every record once, through the pipeline: (examples, counters)."""
  b = _batcher(source, tokenizer, long_caption=long_caption)
  got = [b.example(i) for i in range(len(source))]
  return [g for g in got if g is not None], b.counters


def _check_counts(source, tokenizer, caplog):
  with caplog.at_level(logging.WARNING, logger="mmar_jax.data.pipeline"):
    got, counters = _scan(source, tokenizer)
  assert len(got) == USABLE and (counters.skipped, counters.truncated) == (SKIPPED, TRUNCATED)
  for ex in got:
    assert ex["image"].shape == (16, 16, 3) and ex["image"].dtype == np.float32
    assert -1 <= ex["image"].min() and ex["image"].max() <= 1
    assert ex["text_len"] <= 40
  assert "truncated" in caplog.text and "empty caption" in caplog.text  # the first few are named
  got, counters = _scan(source, tokenizer, long_caption="skip")
  assert len(got) == USABLE - 1 and (counters.skipped, counters.truncated) == (SKIPPED + 1, 0)
  # Whole batches over several epochs: replacements fill the gaps, nothing raises.
  b = _batcher(source, tokenizer)
  for step in range(4):
    assert len(b.local_batch(step)["index"]) == 8


def _write_folder(root):
  os.makedirs(root / "sub", exist_ok=True)
  for k, (name, (image, caption)) in enumerate(SAMPLES.items()):
    where = root / "sub" if k % 2 else root
    ext = "jpg" if name in ("good2", "trunc", "text") else "png"
    (where / f"{name}.{ext}").write_bytes(image)
    if caption is not None:
      (where / f"{name}.txt").write_text(caption)
  (root / "notes.md").write_text("not part of the data")


def test_folder_source_skips_and_counts_bad_records(tmp_path, bytes_tokenizer, caplog):
  _write_folder(tmp_path)
  source = sources.FolderSource(str(tmp_path), 16)
  assert len(source) == len(SAMPLES)
  _check_counts(source, bytes_tokenizer, caplog)
  assert "trunc.jpg" in caplog.text or "text.jpg" in caplog.text  # records are named by file


def test_jsonl_manifest_source(tmp_path, bytes_tokenizer, caplog):
  _write_folder(tmp_path / "images")
  lines = []
  for name, (_, caption) in SAMPLES.items():
    path = next(p for p in (tmp_path / "images").rglob(f"{name}.*") if p.suffix != ".txt")
    image = str(path) if name == "good0" else str(path.relative_to(tmp_path))  # both forms
    entry = {"image": image}
    if caption is not None:
      entry["caption"] = caption
    lines.append(json.dumps(entry))
  lines += ["{not json", json.dumps({"caption": "no image"}),
            json.dumps({"image": "images/missing.png", "caption": "gone"})]
  (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n\n")
  source = sources.JsonlSource(str(tmp_path / "data.jsonl"), 16)
  got, counters = _scan(source, bytes_tokenizer)
  assert len(got) == USABLE and (counters.skipped, counters.truncated) == (SKIPPED + 3, TRUNCATED)


def _write_tar(path, members, truncate_at=None):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  if truncate_at is not None:
    data = open(path, "rb").read()
    open(path, "wb").write(data[:truncate_at])


def _write_shards(root) -> str:
  """img2dataset's layout: KEY.jpg + KEY.txt (+ KEY.json); a sample whose download failed leaves
  only KEY.json. The second shard is cut off inside its last image."""
  items = list(SAMPLES.items())
  members = [[], []]
  for k, (name, (image, caption)) in enumerate(items):
    shard = members[k % 2]
    key = f"{k:09d}"
    ext = "jpg" if name in ("good2", "trunc", "text") else "png"
    shard.append((f"{key}.{ext}", image))
    if caption is not None:
      shard.append((f"{key}.txt", caption.encode()))
    shard.append((f"{key}.json", json.dumps({"name": name}).encode()))
  members[0].append(("000000099.json", b'{"status": "failed_to_download"}'))
  members[1] += [("000000100.txt", b"a lost picture"), ("000000100.png", _png(9, (64, 64)))]
  _write_tar(root / "shard-000.tar", members[0])
  _write_tar(root / "shard-001.tar", members[1])
  with tarfile.open(root / "shard-001.tar") as tar:
    last = tar.getmembers()[-1]
  _write_tar(root / "shard-001.tar", members[1], truncate_at=last.offset_data + last.size // 2)
  return str(root / "shard-{000..001}.tar")


def test_webdataset_shards_skip_and_count_bad_records(tmp_path, bytes_tokenizer, caplog):
  pattern = _write_shards(tmp_path)
  assert sources.expand_braces("a-{08..10}.tar") == ["a-08.tar", "a-09.tar", "a-10.tar"]
  source = sources.WebDatasetSource(pattern, 16)
  # The cut-off sample's header was read but its image is short: a record that fails to read.
  assert len(source) == len(SAMPLES) + 1
  with caplog.at_level(logging.WARNING, logger="mmar_jax.data.pipeline"):
    got, counters = _scan(source, bytes_tokenizer)
  assert len(got) == USABLE and (counters.skipped, counters.truncated) == (SKIPPED + 1, TRUNCATED)
  assert "cut short" in caplog.text or "truncated" in caplog.text


def _tiny_run(tmp_path, *overrides):
  """Two steps of the tiny model on a given source, in this process (the compiled step is
  shared with the other tests), from scratch."""
  from mmar_jax.train.loop import train
  config = tiny_config(("steps", "2"), ("train.log_every", "1"), *overrides)
  state = train(config, str(tmp_path / "run"), progress=False)
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2] and int(state["step"]) == 2
  assert all(np.isfinite(r["loss"]) for r in records)
  return records


def test_webdataset_feeds_training_and_the_demo_eval_is_skipped(tmp_path, capsys):
  """`mmar-jax train` on shards, with the demo config's eval.at_end: it trains, says in one line
  why the demo's evaluation does not apply, and exits 0 (the run trained)."""
  pattern = _write_shards(tmp_path)
  run = tmp_path / "run"
  rc = cli.main(["train", "--config", os.path.join(ROOT, TINY), "--workdir", str(run),
                 "--config.steps=2", "--config.train.log_every=1", "--config.eval.at_end=true",
                 f"--config.data.source=wds:{pattern}"])
  out = capsys.readouterr().out
  assert rc == 0, out
  assert "skipped the demo's evaluation (eval.at_end): it measures the built-in demo data" in out
  assert not (run / "eval").exists()
  with open(run / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  assert [r["step"] for r in records] == [1, 2] and all(np.isfinite(r["loss"]) for r in records)
  assert records[-1]["data_skipped"] > 0 and records[-1]["data_truncated"] > 0
  # `eval` on that run names the reason instead of a traceback.
  assert cli.main(["eval", "--workdir", str(run)]) == 2
  assert "eval: it measures the built-in demo data" in capsys.readouterr().err


# -- TFDS ---------------------------------------------------------------------------------------------


def _tfds_builder(data_dir):
  """A real TFDS dataset (array_record, prepared in well under a second, no TensorFlow)."""
  import tensorflow_datasets as tfds

  class MmarTinyCaptions(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "picture": tfds.features.Image(shape=(None, None, 3)),
          "text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(12)}

    def _generate_examples(self, n):
      for i in range(n):
        yield i, {"picture": _png(i, (18 + i, 20)), "text": f"picture number {i}" if i != 3 else ""}

  builder = MmarTinyCaptions(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder.name


def test_tfds_array_record_feeds_training(tmp_path, bytes_tokenizer):
  name = _tfds_builder(tmp_path / "tfds")
  overrides = (("data.source", "tfds"), ("data.tfds.name", name),
               ("data.tfds.data_dir", str(tmp_path / "tfds")), ("data.image_key", "picture"),
               ("data.caption_key", "text"))
  source = sources.make_source(tiny_config(*overrides))
  assert len(source) == 12
  got, counters = _scan(source, bytes_tokenizer)
  assert len(got) == 11 and counters.skipped == 1  # the empty caption
  _tiny_run(tmp_path, *overrides)


# -- prepared latents ---------------------------------------------------------------------------------

VAE_OVERRIDES = (("model.image.kind", "vae"), ("model.image.patch_size", "2"),
                 ("model.image.vae.ch", "32"), ("model.image.vae.ch_mult", "(1, 2)"),
                 ("model.image.vae.embed_dim", "4"), ("data.random_flip", "true"))


def _tiny_vae(directory) -> str:
  """A `convert mar-vae`-style output holding a small random VAE."""
  from flax import nnx

  from mmar_jax.files import save_params, write_json
  from mmar_jax.models.vae import VAE, VAEConfig
  cfg = VAEConfig(ch=32, ch_mult=(1, 2), embed_dim=4)
  params = nnx.split(VAE(cfg, rngs=nnx.Rngs(1)))[1].to_pure_dict()
  save_params(str(directory), jax.tree.map(np.asarray, params))
  write_json(str(directory), "vae_config.json", cfg.to_dict())
  return str(directory)


def test_latent_shards_give_the_batches_of_encoding_on_the_fly(tmp_path, bytes_tokenizer):
  """prepare-data over the demo set with a VAE, then the same seed: every batch holds, bit for
  bit, the posterior that encoding that batch's (flipped or not) pixels gives, and posterior
  samples keyed per example (as the train step draws them) are the same."""
  from flax import nnx

  from mmar_jax.data.prepare import prepare
  from mmar_jax.models.image_tokenizer import make_image_tokenizer, sample_posterior
  config = tiny_config(*VAE_OVERRIDES, ("init.vae", _tiny_vae(tmp_path / "vae")))
  demo = sources.make_source(config)
  meta, _ = prepare(config, "demo", str(tmp_path / "latents"), records_per_shard=100,
                    batch_size=16, progress=False)
  assert meta["records"] == len(demo) and len(meta["shards"]) == -(-len(demo) // 100)
  assert meta["token_shape"] == [16, 16]
  latent_config = tiny_config(*VAE_OVERRIDES, ("data.source", f"latents:{tmp_path / 'latents'}"))
  latents = sources.make_source(latent_config)
  on_the_fly = _batcher(demo, bytes_tokenizer, random_flip=True)
  stored = _batcher(latents, bytes_tokenizer, random_flip=True)
  tokenizer = make_image_tokenizer(dict(config.model.image.to_dict(), path=str(tmp_path / "vae")))
  graphdef, state = nnx.split(tokenizer)
  encode = jax.jit(lambda s, x: nnx.merge(graphdef, s).encode(x))
  sample = jax.jit(jax.vmap(sample_posterior))
  for step in (0, 37):
    a, b = on_the_fly.local_batch(step), stored.local_batch(step)
    for k in ("text", "text_len", "kind", "index"):
      np.testing.assert_array_equal(a[k], b[k])
    mean, logvar = encode(state, a["image"])
    np.testing.assert_array_equal(b["latent_mean"], mean)
    np.testing.assert_array_equal(b["latent_logvar"], logvar)
    keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(step), a["index"])
    np.testing.assert_array_equal(sample(b["latent_mean"], b["latent_logvar"], keys),
                                  sample(mean, logvar, keys))
  # Latents from another image tokenizer are refused, naming what differs.
  from mmar_jax.errors import ConfigError
  with pytest.raises(ConfigError, match="embed_dim"):
    sources.make_source(tiny_config(*VAE_OVERRIDES, ("model.image.vae.embed_dim", "8"),
                                    ("data.source", f"latents:{tmp_path / 'latents'}")))


@pytest.mark.slow
def test_patchify_latents_train_like_pixels(tmp_path):
  """With the weightless tokenizer the stored posterior is a point mass (log-variance -inf): two
  steps on latent shards give the losses of two steps on the pixels, bit for bit."""
  from mmar_jax.data.prepare import prepare
  prepare(tiny_config(), "demo", str(tmp_path / "latents"), progress=False)
  pixels = _tiny_run(tmp_path / "a")
  latent = _tiny_run(tmp_path / "b", ("data.source", f"latents:{tmp_path / 'latents'}"))
  assert [r["loss"] for r in latent] == [r["loss"] for r in pixels]
