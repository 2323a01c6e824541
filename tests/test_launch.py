"""Launchers: the exact commands --dry-run prints, the refusals, and the shell pieces that run on
the machines (tpu_worker.sh, slurm.sbatch) exercised with stand-ins for gcloud/SLURM tools."""

import os
import subprocess
import sys
import textwrap

import pytest

from mmar_jax.launch import common, gpu, tpu
from mmar_jax.launch.tpu_names import LaunchError, parse_accelerator_type, topology_name
from mmar_jax.parallel import distributed

REPO = str(common.REPO)
LAUNCH = os.path.join(REPO, "launch")


def _dry_run(main, argv, capsys):
  rc = main([*argv, "--dry-run"])
  out, err = capsys.readouterr()
  return rc, out, err


# -- TPU names -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, chips, hosts, topo", [
    ("v5p-64", 32, 8, "v5p:2x4x4"),  # cores, 2 per chip; 4 chips per host
    ("v5p-8", 4, 1, "v5p:2x2x1"),
    ("v4-32", 16, 4, "v4:2x2x4"),
    ("v5litepod-8", 8, 1, "v5e:2x4"),  # chips; up to 8 on one host
    ("v5litepod-256", 256, 64, "v5e:16x16"),
    ("v5litepod-1", 1, 1, "v5e:1x1"),
    ("v6e-16", 16, 4, "v6e:4x4"),
])
def test_accelerator_types(name, chips, hosts, topo):
  s = parse_accelerator_type(name)
  assert (s.chips, s.hosts, topology_name(s)) == (chips, hosts, topo)


@pytest.mark.parametrize("name, says", [
    ("v5e-8", "spells it v5litepod-8"),
    ("v5p-63", "two per chip"),
    ("v5p-12", "whole hosts of 4 chips"),
    ("v5litepod-2", "1, 4, 8, 16"),
    ("v7x-8", "unknown generation"),
    ("tpu", "GENERATION-SIZE"),
])
def test_bad_accelerator_types(name, says):
  with pytest.raises(LaunchError, match=says):
    parse_accelerator_type(name)


# -- TPU launcher ----------------------------------------------------------------------------------

V5P_64 = """\
# mmar-jax on 1 x v5p-64 (32 chips on 8 hosts): mesh 1,32,1, mesh_dcn 1,1,1
set -euo pipefail
# Pack the working tree as it is (tracked and untracked files git does not ignore).
cd {repo}
git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -czf /tmp/mmar_jax-mmar.tgz
# Every worker gets a copy: checkpoints and data belong on gs://, not in the pack.
if [ "$(stat -c %s /tmp/mmar_jax-mmar.tgz)" -gt 209715200 ]; then
  echo "the pack is over 200 MB: move large untracked files out of the repository or into .gitignore" >&2; exit 1
fi
# Reuse a READY TPU, replace a preempted or stopped one, create a missing one.
read -r state type <<< "$(gcloud compute tpus tpu-vm describe mmar --zone=us-east5-a --format='value(state,acceleratorType)' 2>/dev/null || true)"
if [ -n "$type" ] && [ "$type" != v5p-64 ]; then
  echo "TPU mmar exists as $type, not v5p-64: delete it or pick another --name" >&2
  exit 1
fi
if [ -n "$state" ] && [ "$state" != READY ] && [ "$state" != CREATING ]; then
  gcloud compute tpus tpu-vm delete mmar --zone=us-east5-a --quiet
  state=
fi
if [ -z "$state" ]; then
  gcloud compute tpus tpu-vm create mmar --zone=us-east5-a --accelerator-type=v5p-64 --version=v2-alpha-tpuv5 --spot
fi
until [ "$(gcloud compute tpus tpu-vm describe mmar --zone=us-east5-a --format='value(state)')" = READY ]; do sleep 30; done
# Install on all 8 workers: requirements-tpu.txt (jax[tpu], gcsfs, no torch).
gcloud compute tpus tpu-vm scp /tmp/mmar_jax-mmar.tgz mmar:mmar_jax.tgz --zone=us-east5-a --worker=all
gcloud compute tpus tpu-vm ssh mmar --zone=us-east5-a --worker=all --command='rm -rf ~/mmar_jax_new && mkdir ~/mmar_jax_new && tar -xzf ~/mmar_jax.tgz -C ~/mmar_jax_new && bash ~/mmar_jax_new/launch/tpu_worker.sh install 3.11'
# The same mmar-jax train on every worker, in the background (MMAR_DISTRIBUTED=auto);
# worker 0's log streams here until training ends.
gcloud compute tpus tpu-vm ssh mmar --zone=us-east5-a --worker=all --command='bash ~/mmar_jax/launch/tpu_worker.sh start train --config configs/qwen2_7b.py --workdir gs://my-bucket/runs/7b --mesh 1,32,1'
gcloud compute tpus tpu-vm ssh mmar --zone=us-east5-a --worker=0 --command='bash ~/mmar_jax/launch/tpu_worker.sh stream'
rc=$(gcloud compute tpus tpu-vm ssh mmar --zone=us-east5-a --worker=0 --command='bash ~/mmar_jax/launch/tpu_worker.sh status' | tail -n 1)
echo "mmar-jax train exited with status $rc"
# Delete the slice (the workdir on gs:// keeps checkpoints and metrics).
gcloud compute tpus tpu-vm delete mmar --zone=us-east5-a --quiet
[ "$rc" = 0 ]
"""

V5P_ARGS = ["--name", "mmar", "--zone", "us-east5-a", "--accelerator-type", "v5p-64", "--spot",
            "--config", "configs/qwen2_7b.py", "--workdir", "gs://my-bucket/runs/7b",
            "--mesh", "1,32,1"]


@pytest.fixture(autouse=True)
def _at_repo_root(monkeypatch):
  monkeypatch.chdir(REPO)  # config paths as a user at the repository root types them


def test_tpu_v5p_64_single_slice(capsys):
  rc, out, err = _dry_run(tpu.main, V5P_ARGS, capsys)
  assert (rc, err) == (0, "")
  assert out == V5P_64.format(repo=REPO)


V5E_256_X2 = """\
# mmar-jax on 2 x v5litepod-256 (256 chips on 64 hosts): mesh 1,256,1, mesh_dcn 2,1,1
set -euo pipefail
# Pack the working tree as it is (tracked and untracked files git does not ignore).
cd {repo}
git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -czf /tmp/mmar_jax-mmar.tgz
# Every worker gets a copy: checkpoints and data belong on gs://, not in the pack.
if [ "$(stat -c %s /tmp/mmar_jax-mmar.tgz)" -gt 209715200 ]; then
  echo "the pack is over 200 MB: move large untracked files out of the repository or into .gitignore" >&2; exit 1
fi
# Reuse an ACTIVE queued resource, replace a preempted (SUSPENDED) or FAILED one,
# create a missing one, then wait in the queue until it is ACTIVE.
state=$(gcloud compute tpus queued-resources describe mmar --zone=us-east5-a --project=my-proj --format='value(state.state)' 2>/dev/null || true)
if [ "$state" = SUSPENDED ] || [ "$state" = FAILED ]; then
  gcloud compute tpus queued-resources delete mmar --zone=us-east5-a --project=my-proj --force --quiet
  state=
fi
if [ -z "$state" ]; then
  gcloud compute tpus queued-resources create mmar --zone=us-east5-a --project=my-proj --accelerator-type=v5litepod-256 --runtime-version=v2-alpha-tpuv5-lite --node-count=2 --node-prefix=mmar --spot
fi
until state=$(gcloud compute tpus queued-resources describe mmar --zone=us-east5-a --project=my-proj --format='value(state.state)'); [ "$state" = ACTIVE ]; do
  case "$state" in FAILED|SUSPENDED) echo "queued resource is $state" >&2; exit 1;; esac
  sleep 60
done
# Install on all 128 workers: requirements-tpu.txt (jax[tpu], gcsfs, no torch).
gcloud compute tpus queued-resources scp /tmp/mmar_jax-mmar.tgz mmar:mmar_jax.tgz --zone=us-east5-a --project=my-proj --node=all --worker=all
gcloud compute tpus queued-resources ssh mmar --zone=us-east5-a --project=my-proj --node=all --worker=all --command='rm -rf ~/mmar_jax_new && mkdir ~/mmar_jax_new && tar -xzf ~/mmar_jax.tgz -C ~/mmar_jax_new && bash ~/mmar_jax_new/launch/tpu_worker.sh install 3.11'
# The same mmar-jax train on every worker, in the background (MMAR_DISTRIBUTED=auto);
# worker 0's log streams here until training ends.
gcloud compute tpus queued-resources ssh mmar --zone=us-east5-a --project=my-proj --node=all --worker=all --command='bash ~/mmar_jax/launch/tpu_worker.sh start train --config configs/qwen2_0_5b.py:stage2 --workdir gs://my-bucket/runs/05b --mesh 1,256,1 --config.mesh_dcn=2,1,1 --config.train.batch_size=512'
gcloud compute tpus queued-resources ssh mmar --zone=us-east5-a --project=my-proj --node=0 --worker=0 --command='bash ~/mmar_jax/launch/tpu_worker.sh stream'
rc=$(gcloud compute tpus queued-resources ssh mmar --zone=us-east5-a --project=my-proj --node=0 --worker=0 --command='bash ~/mmar_jax/launch/tpu_worker.sh status' | tail -n 1)
echo "mmar-jax train exited with status $rc"
# Delete the slice (the workdir on gs:// keeps checkpoints and metrics).
gcloud compute tpus queued-resources delete mmar --zone=us-east5-a --project=my-proj --force --quiet
[ "$rc" = 0 ]
"""

V5E_ARGS = ["--name", "mmar", "--zone", "us-east5-a", "--accelerator-type", "v5litepod-256",
            "--num-slices", "2", "--spot", "--project", "my-proj",
            "--config", "configs/qwen2_0_5b.py:stage2", "--workdir", "gs://my-bucket/runs/05b",
            "--mesh", "1,256,1", "--mesh-dcn", "2,1,1", "--config.train.batch_size=512"]


def test_tpu_two_slices_of_v5litepod_256(capsys):
  rc, out, err = _dry_run(tpu.main, V5E_ARGS, capsys)
  assert (rc, err) == (0, "")
  assert out == V5E_256_X2.format(repo=REPO)


def test_tpu_keep_and_queued_single_slice(capsys):
  args = [a for a in V5P_ARGS if a != "--spot"] + ["--queued", "--keep",
                                                   "--runtime-version", "v2-alpha-tpuv5"]
  rc, out, _ = _dry_run(tpu.main, args, capsys)
  assert rc == 0
  assert ("gcloud compute tpus queued-resources create mmar --zone=us-east5-a "
          "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --node-id=mmar\n") in out
  assert "queued-resources delete mmar --zone=us-east5-a --force" not in out.split("# --keep")[1]


def test_tpu_pack_holds_the_working_tree(tmp_path, capsys):
  """The script's packing lines, run for real: code and requirements in, the venv out."""
  rc, out, _ = _dry_run(tpu.main, V5P_ARGS, capsys)
  lines = out.replace("/tmp/mmar_jax-mmar.tgz", str(tmp_path / "pack.tgz")).splitlines()
  pack = "\n".join(lines[1:lines.index("fi") + 1])
  subprocess.run(["bash", "-c", pack], check=True, timeout=60)
  names = subprocess.run(["tar", "-tzf", str(tmp_path / "pack.tgz")], capture_output=True,
                         text=True, check=True).stdout.split()
  assert {"launch/tpu_worker.sh", "requirements-tpu.txt", "mmar_jax/cli.py",
          "configs/qwen2_7b.py"} <= set(names)
  assert not any(n.startswith((".venv/", ".git/")) for n in names)


FAKE_GCLOUD = """\
echo "$*" >> "$GCLOUD_LOG"
case "$*" in
  *"tpu-vm describe"*acceleratorType*) [ -n "$STATE" ] || exit 1; printf '%s\\tv5p-64\\n' "$STATE" ;;
  *"tpu-vm describe"*) echo READY ;;
  *"tpu_worker.sh status"*) echo "$TRAIN_STATUS" ;;
esac
"""


@pytest.mark.parametrize("state, status, calls", [
    ("", "0", ["create", "scp", "ssh", "ssh", "ssh", "ssh", "delete"]),  # first launch
    ("PREEMPTED", "0", ["delete", "create", "scp", "ssh", "ssh", "ssh", "ssh", "delete"]),
    ("READY", "1", ["scp", "ssh", "ssh", "ssh", "ssh", "delete"]),  # --keep'd earlier, or re-run
])
def test_tpu_script_replaces_a_preempted_slice(tmp_path, capsys, state, status, calls):
  """The printed script run against a stand-in gcloud: a preempted TPU is deleted and made
  again (so re-running the launch resumes), a READY one reused; training's status is the exit
  status, and the slice is deleted either way."""
  rc, out, _ = _dry_run(tpu.main, V5P_ARGS, capsys)
  env = _fake_tools(tmp_path, {"gcloud": FAKE_GCLOUD})
  env.update(GCLOUD_LOG=str(tmp_path / "calls"), STATE=state, TRAIN_STATUS=status)
  text = out.replace("/tmp/mmar_jax-mmar.tgz", str(tmp_path / "pack.tgz"))
  proc = subprocess.run(["bash", "-c", text], env=env, capture_output=True, text=True, timeout=60)
  assert proc.returncode == int(status), proc.stderr
  verbs = [line.split()[3] for line in open(tmp_path / "calls") if "describe" not in line]
  assert verbs == calls


@pytest.mark.parametrize("change, says", [
    ({"--mesh": "1,16,1"}, "mesh 1,16,1 needs 16 devices, but a v5p-64 (32 chips on 8 hosts) "
                           "slice has 32"),
    ({"--mesh": "2,-1,3"}, "32 devices are not a multiple of 6"),
    ({"--num-slices": "2", "--mesh-dcn": "1,1,1"}, "mesh_dcn 1,1,1 needs 1 slices, but the run "
                                                   "(--num-slices) has 2"),
    ({"--zone": "us-east5"}, "a region such as us-east5 is not enough"),
    ({"--accelerator-type": "v5e-64"}, "spells it v5litepod-64"),
    ({"--workdir": "/tmp/run"}, "8 hosts must share the workdir"),
    ({"--workdir": "gs://x"}, "expected gs://BUCKET/PATH"),
    ({"--config": "/tmp/elsewhere.py"}, "config file not found"),
    ({"--name": "My_TPU"}, "--name 'My_TPU'"),
    ({"--mesh": "1,32,1", "--config.train.batch_size=48": None}, "batch_size 48 does not split"),
    ({"--config.no_such_key=1": None}, "unknown config key: 'no_such_key'"),
])
def test_tpu_refusals(change, says, capsys):
  args = list(V5P_ARGS)
  for flag, value in change.items():
    if flag in args:
      args[args.index(flag) + 1] = value
    else:
      args += [flag] if value is None else [flag, value]
  rc, out, err = _dry_run(tpu.main, args, capsys)
  assert rc == 2 and out == ""
  assert err.startswith("error: ") and says in err, err


def test_tpu_preemptible_is_for_tpu_vm_only(capsys):
  args = [a for a in V5P_ARGS if a != "--spot"] + ["--preemptible", "--queued"]
  rc, _, err = _dry_run(tpu.main, args, capsys)
  assert rc == 2 and "queued resources" in err and "take --spot" in err


def test_tpu_config_outside_repo_is_refused(tmp_path, capsys):
  outside = tmp_path / "cfg.py"
  outside.write_text(open(os.path.join(REPO, "configs", "tiny.py")).read())
  args = list(V5P_ARGS)
  args[args.index("--config") + 1] = str(outside)
  rc, _, err = _dry_run(tpu.main, args, capsys)
  assert rc == 2 and "outside the repository" in err


# -- GPU launchers ---------------------------------------------------------------------------------

SLURM_ARGS = ["--nodes", "2", "--gpus-per-node", "8", "--config", "configs/qwen2_7b.py",
              "--workdir", "/shared/runs/7b", "--mesh", "1,16,1", "--partition", "gpu",
              "--time", "24:00:00"]


def test_slurm_two_nodes(capsys):
  rc, out, err = _dry_run(gpu.main, ["slurm", *SLURM_ARGS], capsys)
  assert (rc, err) == (0, "")
  assert out == textwrap.dedent(f"""\
      # mmar-jax on 2 SLURM nodes x 8 GPUs: mesh 1,16,1, mesh_dcn 1,1,1
      set -euo pipefail
      # One task per node; slurm.sbatch sets MMAR_COORDINATOR/NUM_PROCESSES/PROCESS_ID.
      mkdir -p {REPO}/logs
      sbatch --job-name=mmar-jax --nodes=2 --ntasks-per-node=1 --gpus-per-node=8 --chdir={REPO} \
--output={REPO}/logs/%x-%j.out --export=ALL,MMAR_PORT=12355 --partition=gpu --time=24:00:00 \
{REPO}/launch/slurm.sbatch train --config configs/qwen2_7b.py --workdir /shared/runs/7b --mesh 1,16,1
      """)


def test_multinode_two_hosts(capsys):
  rc, out, _ = _dry_run(gpu.main, ["multinode", "--hosts", "gpu-a,gpu-b", "--gpus-per-node", "8",
                                   "--config", "configs/qwen2_7b.py", "--workdir", "gs://bkt/7b"],
                        capsys)
  assert rc == 0
  train = "python3 -m mmar_jax train --config configs/qwen2_7b.py --workdir gs://bkt/7b"
  env = "MMAR_COORDINATOR=gpu-a:12355 MMAR_NUM_PROCESSES=2"
  assert (f"ssh gpu-b 'cd {REPO} && {env} MMAR_PROCESS_ID=1 {train}' > logs/gpu-b.log 2>&1 &\n"
          in out)
  assert (f"ssh gpu-a 'cd {REPO} && {env} MMAR_PROCESS_ID=0 {train}' 2>&1 | tee logs/gpu-a.log"
          in out)


@pytest.mark.parametrize("argv, says", [
    (["slurm", *SLURM_ARGS[:9], "1,8,1"],
     "mesh 1,8,1 needs 8 devices, but 2 nodes x 8 GPUs has 16"),
    (["slurm", *SLURM_ARGS[:7], "runs/7b"], "absolute path on a shared filesystem"),
    (["slurm", *SLURM_ARGS, "--mesh-dcn", "4,1,1"], "4 groups of whole nodes, but there are 2"),
    (["slurm", *SLURM_ARGS[:-1], "1 day"], "--time '1 day'"),
    (["multinode", "--hosts", "a,a", "--gpus-per-node", "8", "--config", "configs/tiny.py",
      "--workdir", "/w"], "listed twice"),
])
def test_gpu_refusals(argv, says, capsys):
  rc, out, err = _dry_run(gpu.main, argv, capsys)
  assert rc == 2 and out == "" and says in err, err


def _fake_tools(tmp_path, tools: dict) -> dict:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, body in tools.items():
    (bin_dir / name).write_text("#!/usr/bin/env bash\n" + body)
    (bin_dir / name).chmod(0o755)
  return dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}")


def test_slurm_sbatch_sets_coordinator_count_and_ids(tmp_path):
  """The job script under stand-ins for scontrol/srun: every task gets the first node as
  coordinator, the node count, its own SLURM_PROCID as id, and the train arguments."""
  env = _fake_tools(tmp_path, {
      "scontrol": 'printf "node-7\\nnode-8\\n"\n',
      "srun": 'for i in 0 1; do SLURM_PROCID=$i "${@:4}"; done\n',  # drops srun's 3 options
      "fakepython": 'echo "$MMAR_COORDINATOR $MMAR_NUM_PROCESSES $MMAR_PROCESS_ID $*"\n',
  })
  env.update(SLURM_JOB_NODELIST="node-[7-8]", SLURM_NNODES="2", MMAR_PYTHON="fakepython")
  out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "--config", "c.py",
                        "--workdir", "/w"], env=env, capture_output=True, text=True, check=True)
  assert out.stdout.splitlines()[1:] == [
      "node-7:12355 2 0 -m mmar_jax train --config c.py --workdir /w",
      "node-7:12355 2 1 -m mmar_jax train --config c.py --workdir /w"]


def test_tpu_worker_start_status_stream(tmp_path):
  """The worker side with a stand-in mmar-jax: training runs detached with MMAR_DISTRIBUTED=auto,
  its exit status is kept, the log streams, and a second start attaches instead of starting (the
  stand-in runs 3 s, so a loaded machine still finds it running at the second start)."""
  home = tmp_path / "home"
  (home / "mmar_venv" / "bin").mkdir(parents=True)
  (home / "mmar_jax").mkdir()
  fake = home / "mmar_venv" / "bin" / "mmar-jax"
  fake.write_text('#!/usr/bin/env bash\necho "train:$MMAR_DISTRIBUTED:$*"\nsleep 3\nexit 3\n')
  fake.chmod(0o755)
  env = dict(os.environ, HOME=str(home))
  worker = lambda *a: subprocess.run(["bash", os.path.join(LAUNCH, "tpu_worker.sh"), *a], env=env,
                                     capture_output=True, text=True, timeout=20, check=True).stdout
  assert "started mmar-jax train" in worker("start", "train", "--config", "c.py", "--mesh", "1,8,1")
  assert "already running" in worker("start", "train", "--config", "c.py")
  assert worker("stream") == "train:auto:train --config c.py --mesh 1,8,1\n"
  assert worker("status") == "3\n"


@pytest.mark.parametrize("script", ["tpu.sh", "slurm.sh", "multinode.sh", "slurm.sbatch",
                                    "tpu_worker.sh"])
def test_scripts_parse(script):
  subprocess.run(["bash", "-n", os.path.join(LAUNCH, script)], check=True)


@pytest.mark.parametrize("wrapper, argv, says", [
    ("tpu.sh", ["--zone", "us-east5"], "a region such as us-east5 is not enough"),
    ("slurm.sh", ["--workdir", "runs/x"], "absolute path on a shared filesystem"),
    ("multinode.sh", ["--hosts", "a,a"], "listed twice"),
])
def test_wrappers_reach_their_launcher(wrapper, argv, says):
  """Each shell wrapper runs its Python launcher (a refusal that comes before any config is
  loaded keeps this cheap)."""
  base = {"tpu.sh": V5P_ARGS, "slurm.sh": SLURM_ARGS,
          "multinode.sh": ["--hosts", "h", "--gpus-per-node", "8", "--config", "c.py",
                           "--workdir", "/w"]}[wrapper]
  args = list(base)
  for flag, value in zip(argv[::2], argv[1::2]):
    args[args.index(flag) + 1] = value
  out = subprocess.run([os.path.join(LAUNCH, wrapper), *args, "--dry-run"], capture_output=True,
                       env=dict(os.environ, PYTHON=sys.executable), text=True, timeout=60)
  assert out.returncode == 2 and says in out.stderr, out.stderr


def test_requirements_tpu():
  """Same pins as requirements.txt, torch out, jax[tpu] at jax's pin, gcsfs in."""
  read = lambda f: [l.strip() for l in open(os.path.join(REPO, f))
                    if l.strip() and not l.startswith("#")]
  cpu, tpu_reqs = read("requirements.txt"), read("requirements-tpu.txt")
  jax_pin = next(l for l in cpu if l.startswith("jax=="))
  assert f"jax[tpu]=={jax_pin.split('==')[1]}" in tpu_reqs
  assert not any(l.startswith("torch") for l in tpu_reqs)
  assert any(l.startswith("gcsfs") for l in tpu_reqs)
  assert set(cpu) - {jax_pin} - {l for l in cpu if l.startswith("torch")} <= set(tpu_reqs)


# -- jax.distributed from the environment ----------------------------------------------------------

@pytest.mark.parametrize("env, expected", [
    ({}, None),
    ({"MMAR_COORDINATOR": "10.0.0.1:1234", "MMAR_NUM_PROCESSES": "4", "MMAR_PROCESS_ID": "3"},
     dict(coordinator_address="10.0.0.1:1234", num_processes=4, process_id=3)),
    ({"MMAR_COORDINATOR": "h:1", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"},
     dict(coordinator_address="h:1", num_processes=2, process_id=1)),
    ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}, {}),  # JAX reads SLURM itself
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),
    ({"MMAR_DISTRIBUTED": "auto"}, {}),  # Cloud TPU: JAX reads the TPU VM's metadata
    ({"MMAR_DISTRIBUTED": "0", "MMAR_COORDINATOR": "h:1"}, None),
])
def test_distributed_plan(env, expected):
  assert distributed.plan(env) == expected


@pytest.mark.parametrize("env, says", [
    ({"MMAR_COORDINATOR": "nohost"}, "host:port"),
    ({"MMAR_COORDINATOR": "h:1", "MMAR_NUM_PROCESSES": "2"}, "MMAR_PROCESS_ID"),
    ({"MMAR_COORDINATOR": "h:1", "MMAR_NUM_PROCESSES": "2", "MMAR_PROCESS_ID": "2"}, "not in"),
    ({"MMAR_COORDINATOR": "h:1", "MMAR_NUM_PROCESSES": "two", "MMAR_PROCESS_ID": "0"}, "integer"),
    ({"MMAR_DISTRIBUTED": "yes-please"}, "use auto or 0"),
])
def test_distributed_plan_errors(env, says):
  from mmar_jax.errors import ConfigError
  with pytest.raises(ConfigError, match=says):
    distributed.plan(env)


CHILD = """\
import sys
from mmar_jax.parallel.distributed import maybe_initialize
import jax
jax.config.update("jax_num_cpu_devices", 4)
maybe_initialize()
print(jax.process_index(), jax.process_count(), jax.device_count(), flush=True)
"""


@pytest.mark.slow
def test_maybe_initialize_joins_two_processes(tmp_path):
  """Two CPU processes of 4 devices each, joined through MMAR_* variables: one 8-device run."""
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(MMAR_COORDINATOR=f"127.0.0.1:{port}", MMAR_NUM_PROCESSES="2",
             PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", CHILD], env=dict(env, MMAR_PROCESS_ID=str(i)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=120) for p in procs]
  assert [p.returncode for p in procs] == [0, 0], outs
  assert sorted(o.strip() for o, _ in outs) == ["0 2 8", "1 2 8"]


# -- other jobs than training: the command after `--` -----------------------------------------------

def _dry_job(main, launcher: list, job: list, capsys):
  """`main(LAUNCHER --dry-run -- JOB)`: the job's flags come last."""
  rc = main([*launcher, "--dry-run", "--", *job])
  out, err = capsys.readouterr()
  return rc, out, err


FID_JOB = ["eval", "fid", "--workdir", "gs://b/runs/7b", "--prompts", "gs://b/coco_30k.txt",
           "--num", "30000", "--images", "gs://b/fid/images", "--ref-stats", "fid/coco.npz",
           "--inception", "fid/inception.safetensors"]


def test_tpu_runs_a_job_on_every_worker(capsys):
  """The same slice steps as training, the job's own command on every worker, no mesh checks
  (the job's mesh is every chip unless it says --mesh)."""
  args = ["--name", "mmar", "--zone", "us-east5-a", "--accelerator-type", "v5p-64", "--keep"]
  rc, out, err = _dry_job(tpu.main, args, FID_JOB, capsys)
  assert (rc, err) == (0, "")
  lines = out.splitlines()
  assert lines[0] == "# mmar-jax eval fid on 1 x v5p-64 (32 chips on 8 hosts)"
  start = ("gcloud compute tpus tpu-vm ssh mmar --zone=us-east5-a --worker=all --command='bash "
           "~/mmar_jax/launch/tpu_worker.sh start " + " ".join(FID_JOB) + "'")
  assert start in lines and 'echo "mmar-jax eval fid exited with status $rc"' in lines
  train = _dry_run(tpu.main, V5P_ARGS, capsys)[1].splitlines()
  steps = lambda ls: [l for l in ls if "tpu-vm scp" in l or "install 3.11" in l]
  assert len(steps(lines)) == 2 and steps(lines) == steps(train)  # the same copy and install


def test_slurm_and_multinode_run_a_job(capsys):
  prep = ["prepare-data", "--config", "configs/qwen2_7b.py:stage1", "--src", "wds:/s/{0..9}.tar",
          "--out", "/s/latents"]
  rc, out, err = _dry_job(gpu.main, ["slurm", "--nodes", "4", "--gpus-per-node", "8"], prep, capsys)
  assert (rc, err) == (0, "")
  assert out.splitlines()[0] == "# mmar-jax on 4 SLURM nodes x 8 GPUs: mmar-jax prepare-data"
  assert out.rstrip().endswith("launch/slurm.sbatch prepare-data --config configs/qwen2_7b.py:stage1 "
                               "--src 'wds:/s/{0..9}.tar' --out /s/latents")
  rc, out, _ = _dry_job(gpu.main, ["multinode", "--hosts", "a,b", "--gpus-per-node", "8"], prep,
                        capsys)
  assert rc == 0 and "MMAR_PROCESS_ID=1 python3 -m mmar_jax prepare-data --config" in out


@pytest.mark.parametrize("main, argv, says", [
    (tpu.main, ["--config", "configs/tiny.py", "--", "generate"], "--config: with a job after `--`"),
    (tpu.main, ["--", "train", "--config", "c.py"], "train takes the launcher's own"),
    (tpu.main, [], "training needs --config and --workdir"),
    (gpu.main, ["--mesh", "1,8,1", "--", "eval", "fid"], "--mesh: with a job after `--`"),
])
def test_job_refusals(main, argv, says, capsys):
  base = (["--name", "mmar", "--zone", "us-east5-a", "--accelerator-type", "v5p-8"]
          if main is tpu.main else ["slurm", "--nodes", "1", "--gpus-per-node", "8"])
  cut = argv.index("--") if "--" in argv else len(argv)
  rc, out, err = _dry_job(main, base + argv[:cut], argv[cut + 1:], capsys) if "--" in argv else \
      _dry_run(main, base + argv, capsys)
  assert rc == 2 and out == "" and says in err, err


def test_slurm_sbatch_runs_a_job(tmp_path):
  """A command first: the job script runs it instead of train."""
  env = _fake_tools(tmp_path, {
      "scontrol": 'printf "node-7\\n"\n',
      "srun": 'SLURM_PROCID=0 "${@:4}"\n',
      "fakepython": 'echo "$MMAR_PROCESS_ID $*"\n',
  })
  env.update(SLURM_JOB_NODELIST="node-7", SLURM_NNODES="1", MMAR_PYTHON="fakepython")
  out = subprocess.run(["bash", os.path.join(LAUNCH, "slurm.sbatch"), "eval", "fid", "--images", "d"],
                       env=env, capture_output=True, text=True, check=True)
  assert out.stdout.splitlines()[1:] == ["0 -m mmar_jax eval fid --images d"]
