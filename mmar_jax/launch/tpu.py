"""`launch/tpu.sh`: train on a Cloud TPU slice, or several slices over DCN, with one command;
or run another job on every host of a slice (prepare-data, generate --prompts, eval fid, ...).

    launch/tpu.sh --name mmar --zone us-east5-a --accelerator-type v5p-64 --spot \\
        --config configs/qwen2_7b.py --workdir gs://BUCKET/runs/7b [--mesh 1,32,1] [--dry-run]
    launch/tpu.sh --name mmar --zone us-east5-a --accelerator-type v5p-64 --keep [--dry-run] \\
        -- eval fid --workdir gs://BUCKET/runs/7b --prompts gs://BUCKET/coco_30k.txt ...

A job after `--` runs as `mmar-jax JOB...` on every worker (its own flags; its mesh is every chip
of the slice unless it says `--mesh`); the steps below are the same.

The launcher checks its arguments (accelerator type, zone, the config's mesh against the slice,
the workdir), then runs one bash script, which `--dry-run` prints instead:
  1. packs the working tree (tracked and untracked files that git does not ignore);
  2. gets the slice: reuses a READY one, replaces a preempted one, creates a missing one
     (`tpu-vm create`, or `queued-resources create` with --queued or several slices);
  3. copies the pack to every worker and installs it there from requirements-tpu.txt
     (`launch/tpu_worker.sh install`: jax[tpu] at the pinned version, gcsfs, no torch);
  4. starts the same `mmar-jax train` on every worker (in the background, so a dropped ssh
     connection does not stop training) and streams worker 0's log until training ends;
  5. deletes the slice (unless --keep).
Why this makes preemption cheap: the workdir is on gs://, training resumes from its latest
checkpoint, and step 2 replaces a preempted slice, so re-running the same command continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys

from mmar_jax.launch import common
from mmar_jax.launch.common import LaunchError, q
from mmar_jax.launch.tpu_names import Slice, parse_accelerator_type

WORKER = "~/mmar_jax/launch/tpu_worker.sh"
MAX_PACK_MB = 200
ZONE_RE = re.compile(r"[a-z]+-[a-z]+\d+-[a-z]")
NAME_RE = re.compile(r"[a-z]([-a-z0-9]{0,50}[a-z0-9])?")
GS_RE = re.compile(r"gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/.*)?")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="launch/tpu.sh", description=__doc__.splitlines()[0],
      epilog="Other --config.key=value arguments pass on to mmar-jax train. Another job: its "
             "command and flags after `--` (prepare-data, generate, caption, eval).")
  p.add_argument("--name", required=True, help="TPU (or queued resource) name")
  p.add_argument("--zone", required=True, help="e.g. us-east5-a")
  p.add_argument("--accelerator-type", required=True, help="e.g. v5p-64, v5litepod-256, v6e-16")
  p.add_argument("--num-slices", type=int, default=1, help="slices joined over DCN (queued)")
  tier = p.add_mutually_exclusive_group()
  tier.add_argument("--spot", action="store_true", help="spot capacity (may be preempted)")
  tier.add_argument("--preemptible", action="store_true", help="preemptible TPU VM (tpu-vm only)")
  p.add_argument("--queued", action="store_true", help="create through a queued resource")
  p.add_argument("--project", default=None)
  p.add_argument("--runtime-version", default=None, help="TPU VM software (default per generation)")
  p.add_argument("--config", default=None, help="config file[:variant] inside this repository")
  p.add_argument("--workdir", default=None, help="gs://BUCKET/PATH (needed with several hosts)")
  p.add_argument("--mesh", default=None, help="data,fsdp,tensor within a slice")
  p.add_argument("--mesh-dcn", default=None, help="data,fsdp,tensor across slices")
  p.add_argument("--python-version", default="3.11", help="Python on the workers (uv installs it)")
  p.add_argument("--keep", action="store_true", help="do not delete the slice at the end")
  p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  return p


@dataclasses.dataclass
class Plan:
  name: str
  zone: str
  project: str | None
  slice: Slice
  num_slices: int
  queued: bool
  tier: str | None  # spot | preemptible | None
  runtime_version: str
  command: list[str]  # `mmar-jax` arguments, as the workers get them (train or a job)
  ici: tuple[int, ...] | None  # the training mesh; None for a job (it chooses its own)
  dcn: tuple[int, ...] | None
  python_version: str
  keep: bool

  @property
  def hosts(self) -> int:
    return self.slice.hosts * self.num_slices

  @property
  def multislice(self) -> bool:
    return self.num_slices > 1


def validate(args, overrides, job: list[str] | None = None) -> Plan:
  """Every check that can fail before anything is created."""
  common.check_job_flags(args, job)
  if not NAME_RE.fullmatch(args.name):
    raise LaunchError(f"--name {args.name!r}: lower-case letters, digits and '-', starting with a "
                      f"letter, at most 52 characters")
  if not ZONE_RE.fullmatch(args.zone):
    raise LaunchError(f"--zone {args.zone!r}: expected a zone such as us-east5-a or "
                      f"europe-west4-b (a region such as us-east5 is not enough)")
  tpu = parse_accelerator_type(args.accelerator_type)
  if args.num_slices < 1:
    raise LaunchError(f"--num-slices {args.num_slices}: must be at least 1")
  queued = args.queued or args.num_slices > 1  # Cloud TPU makes multislice only as queued resources
  if args.preemptible and queued:
    raise LaunchError("--preemptible exists for `tpu-vm create` only; queued resources "
                      "(--queued, --num-slices > 1) take --spot")
  tier = "spot" if args.spot else "preemptible" if args.preemptible else None
  if not re.fullmatch(r"3\.(1[1-9]|[2-9]\d)", args.python_version):
    raise LaunchError(f"--python-version {args.python_version}: jax 0.10 needs 3.11 or newer")
  plan = dict(name=args.name, zone=args.zone, project=args.project, slice=tpu,
              num_slices=args.num_slices, queued=queued, tier=tier,
              runtime_version=args.runtime_version or tpu.generation.runtime_version,
              python_version=args.python_version, keep=args.keep)
  if job is not None:
    if overrides:
      raise LaunchError("--config.key=value with a job: give it after `--`")
    return Plan(command=job, ici=None, dcn=None, **plan)
  _check_workdir(args.workdir, tpu.hosts * args.num_slices, tier)
  train_args = _train_args(args, overrides)  # the config must be one the workers get
  cfg = common.load_run_config(args.config, overrides, args.mesh, args.mesh_dcn)
  ici = common.resolve_axes(cfg.mesh, tpu.chips, "mesh", f"a {tpu.describe()} slice")
  dcn = common.resolve_axes(cfg.mesh_dcn, args.num_slices, "mesh_dcn",
                            "the run (--num-slices)", unit="slices")
  common.check_batch(cfg, ici, dcn, tpu.hosts * args.num_slices)
  return Plan(command=["train", *train_args], ici=ici, dcn=dcn, **plan)


def _check_workdir(workdir: str, hosts: int, tier: str | None):
  if workdir.startswith("gs://"):
    if not GS_RE.fullmatch(workdir):
      raise LaunchError(f"--workdir {workdir!r}: expected gs://BUCKET/PATH")
    return
  if hosts > 1:
    raise LaunchError(f"--workdir {workdir!r}: {hosts} hosts must share the workdir; use "
                      f"gs://BUCKET/PATH")
  if tier:
    raise LaunchError(f"--workdir {workdir!r}: a {tier} TPU loses its disk when preempted, and "
                      f"with it the checkpoints to resume from; use gs://BUCKET/PATH")


def _train_args(args, overrides) -> list[str]:
  out = ["--config", common.config_for_workers(args.config), "--workdir", args.workdir]
  if args.mesh:
    out += ["--mesh", args.mesh]
  if args.mesh_dcn:
    out.append(f"--config.mesh_dcn={args.mesh_dcn}")
  return out + common.override_args(overrides)


# -- the script ------------------------------------------------------------------------------------

def _gcloud(plan: Plan, group: str, verb: str, *words: str) -> str:
  """`gcloud compute tpus GROUP VERB` with positionals first, then --zone (and --project)."""
  positional = [w for w in words if not w.startswith("--")]
  flags = [w for w in words if w.startswith("--")]
  project = [f"--project={plan.project}"] if plan.project else []
  return " ".join(["gcloud", "compute", "tpus", group, verb, *positional, f"--zone={plan.zone}",
                   *project, *flags])


def _node(plan: Plan, verb: str, *rest: str) -> str:
  """A command on the slice's TPU VMs: the node itself, or every node of a multislice."""
  return _gcloud(plan, "queued-resources" if plan.multislice else "tpu-vm", verb, *rest)


def _on_workers(plan: Plan, remote: str, worker: str = "all") -> str:
  nodes = [f"--node={'all' if worker == 'all' else '0'}"] if plan.multislice else []
  return _node(plan, "ssh", plan.name, *nodes, f"--worker={worker}", f"--command={q(remote)}")


def _bundle_path(plan: Plan) -> str:
  return f"/tmp/mmar_jax-{plan.name}.tgz"


def _pack(plan: Plan, s: common.Script):
  s.comment("Pack the working tree as it is (tracked and untracked files git does not ignore).")
  s.add(f"cd {q(common.REPO)}",
        "git ls-files -z -co --exclude-standard | "
        f"tar --null --ignore-failed-read -T - -czf {_bundle_path(plan)}")
  s.comment("Every worker gets a copy: checkpoints and data belong on gs://, not in the pack.")
  s.add(f'if [ "$(stat -c %s {_bundle_path(plan)})" -gt {MAX_PACK_MB * 2**20} ]; then',
        f'  echo "the pack is over {MAX_PACK_MB} MB: move large untracked files out of the '
        f'repository or into .gitignore" >&2; exit 1',
        "fi")


def _acquire_vm(plan: Plan, s: common.Script):
  describe = _gcloud(plan, "tpu-vm", "describe", plan.name, "--format='value(state)'")
  tier = [f"--{plan.tier}"] if plan.tier else []
  create = _gcloud(plan, "tpu-vm", "create", plan.name,
                   f"--accelerator-type={plan.slice.accelerator_type}",
                   f"--version={plan.runtime_version}", *tier)
  probe = _gcloud(plan, "tpu-vm", "describe", plan.name, "--format='value(state,acceleratorType)'")
  want = plan.slice.accelerator_type
  s.comment("Reuse a READY TPU, replace a preempted or stopped one, create a missing one.")
  s.add(f'read -r state type <<< "$({probe} 2>/dev/null || true)"',
        f'if [ -n "$type" ] && [ "$type" != {want} ]; then',
        f'  echo "TPU {plan.name} exists as $type, not {want}: delete it or pick another '
        f'--name" >&2',
        "  exit 1",
        "fi",
        'if [ -n "$state" ] && [ "$state" != READY ] && [ "$state" != CREATING ]; then',
        f"  {_gcloud(plan, 'tpu-vm', 'delete', plan.name, '--quiet')}",
        "  state=",
        "fi",
        'if [ -z "$state" ]; then',
        f"  {create}",
        "fi",
        f'until [ "$({describe})" = READY ]; do sleep 30; done')


def _acquire_queued(plan: Plan, s: common.Script):
  describe = _gcloud(plan, "queued-resources", "describe", plan.name,
                     "--format='value(state.state)'")
  if plan.multislice:
    nodes = [f"--node-count={plan.num_slices}", f"--node-prefix={plan.name}"]
  else:
    nodes = [f"--node-id={plan.name}"]
  tier = ["--spot"] if plan.tier == "spot" else []
  create = _gcloud(plan, "queued-resources", "create", plan.name,
                   f"--accelerator-type={plan.slice.accelerator_type}",
                   f"--runtime-version={plan.runtime_version}", *nodes, *tier)
  s.comment("Reuse an ACTIVE queued resource, replace a preempted (SUSPENDED) or FAILED one,")
  s.comment("create a missing one, then wait in the queue until it is ACTIVE.")
  s.add(f"state=$({describe} 2>/dev/null || true)",
        'if [ "$state" = SUSPENDED ] || [ "$state" = FAILED ]; then',
        f"  {_gcloud(plan, 'queued-resources', 'delete', plan.name, '--force', '--quiet')}",
        "  state=",
        "fi",
        'if [ -z "$state" ]; then',
        f"  {create}",
        "fi",
        f'until state=$({describe}); [ "$state" = ACTIVE ]; do',
        '  case "$state" in FAILED|SUSPENDED) echo "queued resource is $state" >&2; exit 1;; esac',
        "  sleep 60",
        "done")


def _install(plan: Plan, s: common.Script):
  nodes = ["--node=all"] if plan.multislice else []
  remote = ("rm -rf ~/mmar_jax_new && mkdir ~/mmar_jax_new && "
            "tar -xzf ~/mmar_jax.tgz -C ~/mmar_jax_new && "
            f"bash ~/mmar_jax_new/launch/tpu_worker.sh install {plan.python_version}")
  s.comment(f"Install on all {plan.hosts} workers: requirements-tpu.txt "
            f"(jax[tpu], gcsfs, no torch).")
  s.add(_node(plan, "scp", _bundle_path(plan), f"{plan.name}:mmar_jax.tgz", *nodes, "--worker=all"),
        _on_workers(plan, remote))


def _run(plan: Plan, s: common.Script):
  start = " ".join([f"bash {WORKER} start", *map(q, plan.command)])
  name = common.job_name(plan.command)
  s.comment(f"The same mmar-jax {name} on every worker, in the background (MMAR_DISTRIBUTED=auto);")
  s.comment(f"worker 0's log streams here until {'training' if name == 'train' else 'it'} ends.")
  s.add(_on_workers(plan, start),
        _on_workers(plan, f"bash {WORKER} stream", worker="0"),
        f"rc=$({_on_workers(plan, f'bash {WORKER} status', worker='0')} | tail -n 1)",
        f'echo "mmar-jax {name} exited with status $rc"')


def _release(plan: Plan, s: common.Script):
  if plan.keep:
    s.comment("--keep: the slice stays up; delete it yourself when done.")
  else:
    what = "queued-resources" if plan.queued else "tpu-vm"
    force = ["--force"] if plan.queued else []
    s.comment("Delete the slice (the workdir on gs:// keeps checkpoints and metrics).")
    s.add(_gcloud(plan, what, "delete", plan.name, *force, "--quiet"))
  s.add('[ "$rc" = 0 ]')


def script(plan: Plan) -> common.Script:
  if plan.ici is None:
    title = f"mmar-jax {common.job_name(plan.command)} on {plan.num_slices} x {plan.slice.describe()}"
  else:
    title = (f"mmar-jax on {plan.num_slices} x {plan.slice.describe()}: mesh "
             f"{','.join(map(str, plan.ici))}, mesh_dcn {','.join(map(str, plan.dcn))}")
  s = common.Script(title)
  _pack(plan, s)
  (_acquire_queued if plan.queued else _acquire_vm)(plan, s)
  _install(plan, s)
  _run(plan, s)
  _release(plan, s)
  return s


def run(argv) -> int:
  argv, job = common.split_command(argv)
  rest, overrides = common.split_overrides(argv)
  args = build_parser().parse_args(rest)
  plan = validate(args, overrides, job)
  return common.finish(script(plan), args.dry_run)


def main(argv=None) -> int:
  return common.main_guard(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
