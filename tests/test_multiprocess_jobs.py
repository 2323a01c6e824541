"""Many-item jobs across processes on 127.0.0.1 (real `jax.distributed`, several CPU devices per
process, real files): prepare-data, generate --prompts, caption --images, eval understanding and
eval fid give the bytes (records, statistics) of one process, resume on another process count
after a SIGKILL, and name and count an unreadable input without blocking the others (every run
has a timeout: a hang fails). The reference is always the one-process run of the same command.
The default run keeps one of them (prepare-data in 2 processes); the rest are slow."""

import json
import os
import signal
import time

import numpy as np
import pytest

from conftest import tiny_config
from helpers_procs import finish, start_cli

VAE = (("model.image.kind", "vae"), ("model.image.patch_size", "2"), ("model.image.vae.ch", "32"),
       ("model.image.vae.ch_mult", "(1, 2)"), ("model.image.vae.embed_dim", "4"))
BROKEN = "007b.png"  # sorts after 007.png: record 8, in shard 1 of 5-record shards


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
  """23 demo pictures with captions and one file that is not a picture, and a small random VAE
  (a `convert mar-vae`-style directory)."""
  import jax
  from flax import nnx
  from PIL import Image

  from mmar_jax.data.shapes import ShapesDataset, ShapesSpec
  from mmar_jax.files import save_params, write_json
  from mmar_jax.models.vae import VAE as VAEModule, VAEConfig
  root = tmp_path_factory.mktemp("pictures")
  pics = root / "pics"
  pics.mkdir()
  demo = ShapesDataset(ShapesSpec(image_size=16))
  for i in range(23):
    Image.fromarray(np.asarray(demo[i]["image"], np.uint8)).save(pics / f"{i:03d}.png")
    (pics / f"{i:03d}.txt").write_text(demo[i]["caption"])
  (pics / BROKEN).write_bytes(b"not a picture")
  cfg = VAEConfig(ch=32, ch_mult=(1, 2), embed_dim=4)
  params = nnx.split(VAEModule(cfg, rngs=nnx.Rngs(1)))[1].to_pure_dict()
  save_params(str(root / "vae"), jax.tree.map(np.asarray, params))
  write_json(str(root / "vae"), "vae_config.json", cfg.to_dict())
  return root


def _prepare_args(pictures, out, per_shard=5):
  overrides = [f"--config.{k}={v}" for k, v in VAE] + [f"--config.init.vae={pictures / 'vae'}"]
  return ["prepare-data", "--config", "configs/tiny.py", "--src", f"folder:{pictures / 'pics'}",
          "--out", out, "--records-per-shard", per_shard, "--batch-size", 2, *overrides]


@pytest.fixture(scope="module")
def one_process_latents(pictures):
  """The reference: prepare-data in this process (8 devices), 5-record shards."""
  from mmar_jax.data.prepare import prepare
  config = tiny_config(*VAE, ("init.vae", str(pictures / "vae")))
  out = pictures / "latents_1"
  prepare(config, f"folder:{pictures / 'pics'}", str(out), records_per_shard=5, batch_size=2,
          progress=False)
  return out


def _files(directory) -> dict:
  return {n: (directory / n).read_bytes() for n in sorted(os.listdir(directory))}


def test_prepare_data_in_two_processes_is_one_process_bytes(pictures, one_process_latents):
  """2 processes x 4 devices: every shard and latents.json byte for byte the one-process run's;
  the process whose share holds the unreadable picture names it and counts it, the other is
  not held up by it (both finish inside the timeout), and nothing temporary is left."""
  out = pictures / "latents_2"
  outs = finish(start_cli(_prepare_args(pictures, out), n=2, devices=4), timeout=240)
  assert _files(out) == _files(one_process_latents)
  meta = json.loads((out / "latents.json").read_text())
  assert meta["unreadable"] == 1 and meta["unreadable_records"][0][0] == 8
  assert BROKEN in meta["unreadable_records"][0][1]
  reports = [json.loads(next(l for l in o.splitlines() if l.startswith('{"process"'))) for o in outs]
  hit = [r["process"] for r in reports if r["unreadable"]]
  assert hit == [1] and BROKEN in outs[1] and BROKEN not in outs[0]  # shard 1 is process 1's
  assert sorted(r["shards_encoded"] for r in reports) == [2, 3]
  assert "24 records (1 unreadable)" in outs[0]


@pytest.mark.slow
def test_prepare_data_killed_then_resumed_on_another_process_count(pictures, one_process_latents):
  """3 processes x 2 devices on 1-record shards, one SIGKILLed after the first shards appear
  (then the rest torn down, as a scheduler does); re-run on 2 processes: it encodes exactly the
  missing shards, and the folder is the one-process run's (re-sharded the same way)."""
  from mmar_jax.data.prepare import prepare
  ref = pictures / "latents_1x1"
  prepare(tiny_config(*VAE, ("init.vae", str(pictures / "vae"))), f"folder:{pictures / 'pics'}",
          str(ref), records_per_shard=1, batch_size=2, progress=False)
  out = pictures / "latents_killed"
  procs = start_cli(_prepare_args(pictures, out, per_shard=1), n=3, devices=2)
  left = 24 - _kill_mid_run(procs, out, "latents-*", 3, wait_s=240, victim=1)
  assert 0 < left < 24 and not (out / "latents.json").exists()
  outs = finish(start_cli(_prepare_args(pictures, out, per_shard=1), n=2, devices=4), timeout=240)
  reports = [json.loads(next(l for l in o.splitlines() if l.startswith('{"process"'))) for o in outs]
  assert sum(r["shards_encoded"] for r in reports) == left
  assert _files(out) == _files(ref)  # also: no .progress/, no temporary file


# -- generate --prompts --------------------------------------------------------------------------

GEN = ["--ar-steps", 4, "--diffusion-steps", 3, "--seed", 5, "--num-per-prompt", 2]


@pytest.fixture(scope="module")
def sampling_run(tmp_path_factory):
  from mmar_jax.train.loop import train
  wd = tmp_path_factory.mktemp("sampling_run")
  train(tiny_config(("steps", "2"), ("train.checkpoint_every", "2"), ("eval.at_end", "false")),
        str(wd), progress=False)
  prompts = wd / "prompts.txt"
  prompts.write_text("a red square at the top left\n\na blue cross at the bottom right\n"
                     "red circle\ngreen square\n")
  return wd, prompts


@pytest.fixture(scope="module")
def one_process_images(sampling_run):
  """The reference: generate --prompts in this process (8 devices, batch 8)."""
  from mmar_jax import cli
  wd, prompts = sampling_run
  out = wd / "images_1"
  assert cli.main([str(a) for a in ["generate", "--workdir", wd, "--prompts", prompts, "--out-dir", out,
                                    "--batch-size", 8, *GEN]]) == 0
  return out


def _generate_args(sampling_run, out, batch):
  wd, prompts = sampling_run
  return ["generate", "--workdir", wd, "--prompts", prompts, "--out-dir", out, "--batch-size", batch,
          *GEN]


@pytest.mark.slow
def test_generate_in_two_processes_is_one_process_bytes(sampling_run, one_process_images):
  """2 processes x 4 devices, params FSDP-sharded over both, one global batch of 8: the same
  PNG bytes and index.jsonl as one process; both processes wrote some of the files."""
  out = sampling_run[0] / "images_2"
  outs = finish(start_cli(_generate_args(sampling_run, out, 8), n=2, devices=4), timeout=300)
  assert _files(out) == _files(one_process_images)
  reports = [json.loads(o.splitlines()[-1]) for o in outs]
  assert sorted(r["written_here"] for r in reports) == [4, 6]  # batch 2 is rows 0-1 of 8


@pytest.mark.slow
def test_generate_killed_then_resumed_on_another_process_count(sampling_run, one_process_images):
  """3 processes x 2 devices (batch 6), one SIGKILLed after the first images are written; re-run
  on 2 processes x 4 devices (batch 8): it draws exactly the missing images, the folder is the
  one-process run's, and no temporary file is left."""
  out = sampling_run[0] / "images_killed"
  procs = start_cli(_generate_args(sampling_run, out, 6), n=3, devices=2)
  # compiling on a loaded 2-core machine can take minutes
  left = 10 - _kill_mid_run(procs, out, "*.png", 2, wait_s=900, victim=2)
  assert 0 < left < 10
  outs = finish(start_cli(_generate_args(sampling_run, out, 8), n=2, devices=4), timeout=300)
  reports = [json.loads(o.splitlines()[-1]) for o in outs]
  assert all(r["drawn"] == left for r in reports) and sum(r["written_here"] for r in reports) == left
  assert _files(out) == _files(one_process_images)


def _kill_mid_run(procs, out, pattern: str, count: int, *, wait_s: float, victim: int) -> int:
  """Once `count` outputs matching `pattern` are in `out` (or after `wait_s`), SIGKILLs process
  `victim`, then the rest; returns how many outputs were left behind."""
  deadline = time.monotonic() + wait_s
  while time.monotonic() < deadline and len(list(out.glob(pattern))) < count:
    time.sleep(0.05)
  procs[victim].send_signal(signal.SIGKILL)
  for p in procs:
    p.kill()
  finish(procs, timeout=60, check=False)
  return len(list(out.glob(pattern)))


# -- caption --images, eval understanding, eval fid -------------------------------------------------

CAPTION = ["--max-tokens", 3, "--seed", 1]


def _caption_args(sampling_run, pictures, out, batch):
  return ["caption", "--workdir", sampling_run[0], "--images", pictures / "pics", "--out", out,
          "--batch-size", batch, *CAPTION]


@pytest.fixture(scope="module")
def one_process_captions(sampling_run, pictures):
  """The reference: caption --images in this process (8 devices, batch 8): 24 records, the
  unreadable picture's an error record."""
  from mmar_jax import cli
  out = pictures / "captions_1.jsonl"
  assert cli.main([str(a) for a in _caption_args(sampling_run, pictures, out, 8)]) == 0
  return out


def _reports(outs) -> list[dict]:
  return [json.loads(next(l for l in reversed(o.splitlines()) if l.startswith("{"))) for o in outs]


@pytest.mark.slow
@pytest.mark.parametrize("n, devices, batch", [(2, 4, 8), (3, 2, 6)])
def test_caption_in_several_processes_is_one_process_records(sampling_run, pictures,
                                                             one_process_captions, n, devices, batch):
  """2 x 4 and 3 x 2 devices (one picture per device, as the reference): the captions JSONL byte
  for byte the one-process file; the process that owns the unreadable picture's row names and
  counts it, the others finish (inside the timeout); every process wrote records; nothing is
  left beside the output."""
  out = pictures / f"captions_{n}.jsonl"
  outs = finish(start_cli(_caption_args(sampling_run, pictures, out, batch), n=n, devices=devices),
                timeout=400)
  assert out.read_bytes() == one_process_captions.read_bytes()
  records = [json.loads(l) for l in out.read_text().splitlines()]
  assert len(records) == 24 and [BROKEN in r["image"] for r in records if "error" in r] == [True]
  reports = _reports(outs)
  hit = [r["process"] for r in reports if r["unreadable_here"]]
  named = [i for i, o in enumerate(outs) if f"caption: skipping cannot read image {pictures / 'pics' / BROKEN}" in o]
  assert len(hit) == 1 and named == hit
  assert all(r["written_here"] > 0 for r in reports) and sum(r["written_here"] for r in reports) == 24
  assert reports[0]["unreadable"] == 1 and reports[0]["captioned"] == 23
  assert not [p for p in os.listdir(pictures) if p.startswith(".")]


@pytest.mark.slow
def test_caption_killed_then_resumed_on_another_process_count(sampling_run, pictures,
                                                              one_process_captions):
  """3 processes x 2 devices, one SIGKILLed once the first records are written; re-run on 2 x 4:
  it captions exactly the pictures without a record, the file is the one-process run's, and the
  records folder and every temporary file are gone. The output refuses to be replaced after."""
  out = pictures / "captions_killed.jsonl"
  parts = pictures / ".captions_killed.jsonl.parts"
  procs = start_cli(_caption_args(sampling_run, pictures, out, 6), n=3, devices=2)
  left = 24 - _kill_mid_run(procs, parts, "0*.json", 7, wait_s=900, victim=1)
  assert 0 < left < 24 and not out.exists()
  outs = finish(start_cli(_caption_args(sampling_run, pictures, out, 8), n=2, devices=4), timeout=400)
  reports = _reports(outs)
  assert all(r["captioned_now"] == left for r in reports)
  assert sum(r["written_here"] for r in reports) == left
  assert out.read_bytes() == one_process_captions.read_bytes()
  assert not [p for p in os.listdir(pictures) if p.startswith(".")]
  from mmar_jax import cli
  assert cli.main([str(a) for a in _caption_args(sampling_run, pictures, out, 8)]) == 2  # exists


def _benchmark(pictures) -> str:
  """Multiple-choice and open records over the demo pictures, one of them unreadable."""
  from mmar_jax.data.shapes import ShapesDataset, ShapesSpec
  demo = ShapesDataset(ShapesSpec(image_size=16))
  lines = []
  for i in range(9):
    name = f"pics/{i:03d}.png"
    if i % 3:
      lines.append(dict(image=name, choices=[demo[i]["caption"], demo[i + 1]["caption"], "x"],
                        answer=i % 2))
    else:
      lines.append(dict(image=name, question="what?", answer=demo[i]["caption"]))
  lines.append(dict(image=f"pics/{BROKEN}", choices=["a", "b"], answer="A"))
  path = pictures / "bench.jsonl"
  path.write_text("".join(json.dumps(l) + "\n" for l in lines))
  return str(path)


@pytest.mark.slow
def test_understanding_in_two_processes_is_one_process_report(sampling_run, pictures):
  """2 x 4 devices against one process (8 devices, the same batch of 8 rows): the report byte
  for byte, written by process 0 once every row is in; the unreadable picture named by the one
  process that owns its row and counted in the report."""
  from mmar_jax import cli
  data = _benchmark(pictures)
  args = lambda out: ["eval", "understanding", "--workdir", sampling_run[0], "--data", data,
                      "--out", out, "--batch-size", 8]
  one = pictures / "understanding_1.json"
  assert cli.main([str(a) for a in args(one)]) == 0
  two = pictures / "understanding_2.json"
  outs = finish(start_cli(args(two), n=2, devices=4), timeout=400)
  assert two.read_bytes() == one.read_bytes()
  report = json.loads(one.read_text())["summary"]
  assert (report["records"], report["scored"], report["unreadable"]) == (10, 9, 1)
  assert BROKEN in report["unreadable_files"][0]
  assert sum(f"skipping cannot read image {pictures / 'pics' / BROKEN}" in o for o in outs) == 1
  assert "multiple_choice" in _reports(outs)[0] and "multiple_choice" not in _reports(outs)[1]
  assert not [p for p in os.listdir(pictures) if p.startswith(".")]


@pytest.mark.slow
def test_understanding_killed_then_resumed_on_another_process_count(sampling_run, pictures):
  """4 processes x 2 devices, one SIGKILLed once the first rows' records are written; re-run on
  2 x 4: it scores exactly the rows without a record, and the report is byte for byte the
  one-process report. The same 8 devices throughout: the likelihoods are floats, and FSDP over
  another device count partitions the matmuls differently (the last bits may change)."""
  from mmar_jax import cli
  data = _benchmark(pictures)
  args = lambda out, batch: ["eval", "understanding", "--workdir", sampling_run[0], "--data", data,
                             "--out", out, "--batch-size", batch]
  one = pictures / "understanding_ref.json"
  assert cli.main([str(a) for a in args(one, 8)]) == 0
  rows = 6 * 3 + 3 + 2  # six 3-choice records, three open ones, the unreadable 2-choice one
  out = pictures / "understanding_killed.json"
  parts = pictures / ".understanding_killed.json.parts"
  procs = start_cli(args(out, 8), n=4, devices=2)
  left = rows - _kill_mid_run(procs, parts, "0*.json", 7, wait_s=900, victim=2)
  assert 0 < left < rows and not out.exists()
  outs = finish(start_cli(args(out, 8), n=2, devices=4), timeout=400)
  reports = _reports(outs)
  assert all(r["scored_now"] == left for r in reports)
  assert sum(r["written_here"] for r in reports) == left
  assert out.read_bytes() == one.read_bytes()
  assert not [p for p in os.listdir(pictures) if p.startswith(".")]


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
  from fid_reference import write_random_weights
  from mmar_jax.convert.inception import WEIGHTS_FILE
  path = tmp_path_factory.mktemp("inception") / WEIGHTS_FILE
  write_random_weights(path, seed=0)
  return path


def _stats(path):
  with np.load(path) as f:
    return f["mu"], f["sigma"]


@pytest.mark.slow  # three Inception compiles: about 40 s here, over the default run's share
def test_fid_features_in_two_processes_are_one_process_statistics(pictures, inception, tmp_path):
  """eval fid --images over 2 processes x 2 devices: mu and sigma exactly the one-process run's
  (8 devices, one image per device either way), the unreadable file named by the process whose
  share holds it (file k is process k % 2's) and counted by process 0. Five files keep it cheap."""
  import shutil

  from mmar_jax import cli
  folder = tmp_path / "five"
  folder.mkdir()
  for name in ("000.png", "001.png", "002.png", BROKEN, "010.png"):
    shutil.copy(pictures / "pics" / name, folder / name)
  fid_args = lambda stats: ["eval", "fid", "--images", folder, "--inception", inception,
                            "--batch-size", 1, "--save-stats", stats]
  assert cli.main([str(a) for a in fid_args(tmp_path / "one.npz")]) == 0
  outs = finish(start_cli(fid_args(tmp_path / "two.npz"), n=2, devices=2), timeout=300)
  for a, b in zip(_stats(tmp_path / "one.npz"), _stats(tmp_path / "two.npz")):
    np.testing.assert_array_equal(a, b)
  lead = _reports(outs)[0]
  assert (lead["num_images"], lead["num_skipped"], lead["skipped"]) == (4, 1, [BROKEN])
  owner = 3 % 2  # sorted, the broken file is the 4th
  assert f"skipping {folder / BROKEN}" in outs[owner]
  assert f"skipping {folder / BROKEN}" not in outs[1 - owner]


@pytest.mark.slow
def test_fid_of_drawings_in_one_command_equals_generate_then_fid(sampling_run, one_process_images,
                                                                 inception, pictures, tmp_path):
  """eval fid --workdir --prompts --num 10 --num-per-prompt 2 on 3 processes draws exactly
  generate --prompts's files (the one-process folder, byte for byte) and prints the FID that
  `eval fid --images` of those files prints in one process."""
  from mmar_jax import cli
  wd, prompts = sampling_run
  ref = tmp_path / "ref.npz"
  assert cli.main([str(a) for a in ["eval", "fid", "--images", pictures / "pics", "--inception",
                                    inception, "--batch-size", 2, "--save-stats", ref]]) == 0
  drawn = tmp_path / "drawn"
  args = ["eval", "fid", "--workdir", wd, "--prompts", prompts, "--num", 10, "--num-per-prompt", 2,
          "--images", drawn, "--draw-batch-size", 6, "--ar-steps", 4, "--diffusion-steps", 3,
          "--seed", 5, "--inception", inception, "--batch-size", 2, "--ref-stats", ref]
  outs = finish(start_cli(args, n=3, devices=2), timeout=600)
  assert _files(drawn) == _files(one_process_images)
  fused = _reports(outs)[0]
  import io
  from contextlib import redirect_stdout
  buf = io.StringIO()
  with redirect_stdout(buf):
    assert cli.main([str(a) for a in ["eval", "fid", "--images", one_process_images, "--inception",
                                      inception, "--batch-size", 2, "--ref-stats", ref]]) == 0
  separate = json.loads(buf.getvalue().splitlines()[-1])
  assert fused["drawn"] == 10 and fused["num_images"] == separate["num_images"] == 10
  assert fused["fid"] == separate["fid"] and np.isfinite(fused["fid"])
