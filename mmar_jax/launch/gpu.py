"""GPU clusters: one JAX process per node, each driving all of its GPUs, joined by
`jax.distributed` through MMAR_COORDINATOR / MMAR_NUM_PROCESSES / MMAR_PROCESS_ID
(read by `mmar_jax.parallel.distributed.maybe_initialize`).

    launch/slurm.sh --nodes 2 --gpus-per-node 8 --config configs/qwen2_7b.py \\
        --workdir /shared/runs/7b [--partition gpu] [--time 24:00:00] [--dry-run]
  submits launch/slurm.sbatch, which sets the coordinator (the job's first node), the process
  count (SLURM_NTASKS) and each task's id (SLURM_PROCID), then `srun`s mmar-jax train.

    launch/multinode.sh --hosts gpu-a,gpu-b --gpus-per-node 8 --config ... --workdir ... [--dry-run]
  starts the same over plain ssh: process i on host i, the coordinator on the first host.

Both check that the mesh (x mesh_dcn) covers nodes x GPUs per node exactly, and that the workdir
is one every node sees (an absolute path on a shared filesystem, or gs://).

Another job than training runs the same way with its command and flags after `--`
(`launch/slurm.sh --nodes 4 --gpus-per-node 8 -- prepare-data --config ... --src ... --out ...`):
every process runs `mmar-jax JOB...` and takes its share; the job's mesh is every GPU unless it
says `--mesh`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from pathlib import Path

from mmar_jax.launch import common
from mmar_jax.launch.common import LaunchError, q

HOST_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9._]*[A-Za-z0-9])?")
TIME_RE = re.compile(r"(\d+-)?\d+(:\d{2}){0,2}")


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m mmar_jax.launch.gpu", description=__doc__.splitlines()[0],
      epilog="Other --config.key=value arguments pass on to mmar-jax train. Another job: its "
             "command and flags after `--` (prepare-data, generate, caption, eval).")
  sub = p.add_subparsers(dest="kind", required=True)
  slurm = sub.add_parser("slurm", help="submit launch/slurm.sbatch with sbatch")
  slurm.add_argument("--nodes", type=int, required=True)
  slurm.add_argument("--partition", default=None)
  slurm.add_argument("--account", default=None)
  slurm.add_argument("--time", default=None, help="SLURM time limit, e.g. 24:00:00")
  slurm.add_argument("--job-name", default="mmar-jax")
  slurm.add_argument("--log-dir", default="logs", help="slurm output files, relative to the repo")
  multi = sub.add_parser("multinode", help="start one process per host over ssh")
  multi.add_argument("--hosts", required=True, help="comma-separated; the first coordinates")
  multi.add_argument("--remote-dir", default=str(common.REPO),
                     help="this repository's path on the hosts (default: the same as here)")
  multi.add_argument("--python", default="python3", help="Python on the hosts (with the deps)")
  multi.add_argument("--log-dir", default="logs", help="one log per host, here")
  for s in (slurm, multi):
    s.add_argument("--gpus-per-node", type=int, required=True)
    s.add_argument("--port", type=int, default=12355, help="the coordinator's port")
    s.add_argument("--config", default=None, help="config file[:variant]")
    s.add_argument("--workdir", default=None, help="absolute shared path, or gs://BUCKET/PATH")
    s.add_argument("--mesh", default=None, help="data,fsdp,tensor")
    s.add_argument("--mesh-dcn", default=None, help="data,fsdp,tensor across nodes")
    s.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
  return p


@dataclasses.dataclass
class Plan:
  nodes: int
  gpus_per_node: int
  command: list[str]  # `mmar-jax` arguments, as every process gets them (train or a job)
  mesh: tuple[int, ...] | None  # the training mesh; None for a job (it chooses its own)
  mesh_dcn: tuple[int, ...] | None


def validate(args, overrides, job: list[str] | None = None) -> Plan:
  common.check_job_flags(args, job)
  nodes = args.nodes if args.kind == "slurm" else len(_hosts(args.hosts))
  if nodes < 1 or args.gpus_per_node < 1:
    raise LaunchError("--nodes and --gpus-per-node must be at least 1")
  if args.kind == "slurm" and args.time and not TIME_RE.fullmatch(args.time):
    raise LaunchError(f"--time {args.time!r}: SLURM takes MINUTES, HH:MM:SS or DAYS-HH:MM:SS")
  if not 1024 <= args.port <= 65535:
    raise LaunchError(f"--port {args.port}: use a free port in 1024..65535")
  if job is not None:
    if overrides:
      raise LaunchError("--config.key=value with a job: give it after `--`")
    return Plan(nodes, args.gpus_per_node, job, None, None)
  _check_workdir(args.workdir)
  cfg = common.load_run_config(args.config, overrides, args.mesh, args.mesh_dcn)
  dcn = _dcn(cfg.mesh_dcn, nodes)
  groups = math.prod(dcn)
  where = f"{nodes} nodes x {args.gpus_per_node} GPUs" + (
      f" split into {groups} groups by mesh_dcn" if groups > 1 else "")
  ici = common.resolve_axes(cfg.mesh, nodes * args.gpus_per_node // groups, "mesh", where)
  common.check_batch(cfg, ici, dcn, nodes)
  train = ["--config", _config_arg(args.config), "--workdir", args.workdir]
  if args.mesh:
    train += ["--mesh", args.mesh]
  if args.mesh_dcn:
    train.append(f"--config.mesh_dcn={args.mesh_dcn}")
  return Plan(nodes, args.gpus_per_node, ["train", *train, *common.override_args(overrides)], ici,
              dcn)


def _config_arg(spec: str) -> str:
  """Repository-relative inside the repository (the processes run from its root), else absolute
  (then it must be on a filesystem every node mounts)."""
  try:
    return common.config_for_workers(spec)
  except LaunchError:
    path, sep, variant = spec.partition(":")
    if not Path(path).is_file():
      raise LaunchError(f"config file not found: {path}") from None
    return f"{Path(path).resolve()}{sep}{variant}"


def _dcn(text, nodes: int) -> tuple[int, ...]:
  """mesh_dcn groups whole nodes (over the slower network between them)."""
  shape = common.config_lib.parse_mesh(text)
  if any(s < 1 for s in shape):
    raise LaunchError(f"mesh_dcn {text}: give explicit positive sizes on GPU clusters")
  if nodes % math.prod(shape):
    raise LaunchError(f"mesh_dcn {text} splits the run into {math.prod(shape)} groups of whole "
                      f"nodes, but there are {nodes} nodes")
  return tuple(shape)


def _hosts(text: str) -> list[str]:
  hosts = [h.strip() for h in text.split(",") if h.strip()]
  bad = [h for h in hosts if not HOST_RE.fullmatch(h.split("@")[-1])]
  if not hosts or bad:
    raise LaunchError(f"--hosts {text!r}: expected comma-separated host names"
                      + (f"; bad: {', '.join(bad)}" if bad else ""))
  if len(set(hosts)) != len(hosts):
    raise LaunchError(f"--hosts {text!r}: a host is listed twice (one process per host)")
  return hosts


def _check_workdir(workdir: str):
  if workdir.startswith("gs://"):
    if not re.fullmatch(r"gs://[a-z0-9][-a-z0-9_.]{1,220}[a-z0-9](/.*)?", workdir):
      raise LaunchError(f"--workdir {workdir!r}: expected gs://BUCKET/PATH")
  elif not workdir.startswith("/"):
    raise LaunchError(f"--workdir {workdir!r}: every node must see the same workdir; give an "
                      f"absolute path on a shared filesystem, or gs://BUCKET/PATH")


def _meshes(plan: Plan) -> str:
  if plan.mesh is None:
    return f"mmar-jax {common.job_name(plan.command)}"
  return (f"mesh {','.join(map(str, plan.mesh))}, "
          f"mesh_dcn {','.join(map(str, plan.mesh_dcn))}")


def slurm_script(args, plan: Plan) -> common.Script:
  s = common.Script(f"mmar-jax on {plan.nodes} SLURM nodes x {plan.gpus_per_node} GPUs: "
                    + _meshes(plan))
  options = [f"--job-name={args.job_name}", f"--nodes={plan.nodes}", "--ntasks-per-node=1",
             f"--gpus-per-node={plan.gpus_per_node}", f"--chdir={common.REPO}",
             f"--output={common.REPO / args.log_dir}/%x-%j.out",
             f"--export=ALL,MMAR_PORT={args.port}"]
  for flag in ("partition", "account", "time"):
    if getattr(args, flag):
      options.append(f"--{flag}={getattr(args, flag)}")
  s.comment("One task per node; slurm.sbatch sets MMAR_COORDINATOR/NUM_PROCESSES/PROCESS_ID.")
  s.add(f"mkdir -p {q(common.REPO / args.log_dir)}",
        " ".join(["sbatch", *map(q, options), q(common.REPO / "launch" / "slurm.sbatch"),
                  *map(q, plan.command)]))
  return s


def multinode_script(args, plan: Plan) -> common.Script:
  hosts = _hosts(args.hosts)
  coordinator = f"{hosts[0].split('@')[-1]}:{args.port}"
  s = common.Script(f"mmar-jax on {plan.nodes} hosts x {plan.gpus_per_node} GPUs over ssh: "
                    + _meshes(plan))
  s.comment(f"Process i on host i; {hosts[0]} coordinates. Host 0's log streams here.")
  s.add(f"mkdir -p {q(args.log_dir)}", "rc=0", "pids=")
  for i, host in reversed(list(enumerate(hosts))):
    env = (f"MMAR_COORDINATOR={coordinator} MMAR_NUM_PROCESSES={len(hosts)} "
           f"MMAR_PROCESS_ID={i}")
    remote = " ".join([f"cd {q(args.remote_dir)} &&", env, q(args.python), "-m mmar_jax",
                       *map(q, plan.command)])
    log = q(f"{args.log_dir}/{host.split('@')[-1]}.log")
    if i:
      s.add(f"ssh {q(host)} {q(remote)} > {log} 2>&1 &", 'pids="$pids $!"')
    else:
      s.add(f"ssh {q(host)} {q(remote)} 2>&1 | tee {log} || rc=$?")
  s.add('for p in $pids; do wait "$p" || rc=$?; done', 'exit "$rc"')
  return s


def run(argv) -> int:
  argv, job = common.split_command(argv)
  rest, overrides = common.split_overrides(argv)
  args = build_parser().parse_args(rest)
  plan = validate(args, overrides, job)
  build = slurm_script if args.kind == "slurm" else multinode_script
  return common.finish(build(args, plan), args.dry_run)


def main(argv=None) -> int:
  return common.main_guard(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
  sys.exit(main())
