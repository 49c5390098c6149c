#!/usr/bin/env python3
"""Create, set up, launch, watch, stop and delete a Cloud TPU VM (pod) for a loopjax run, with gcloud.

    tpu.py create --name N --zone Z --accelerator-type v5p-64 [--version V] [--spot] [--queued]
    tpu.py setup  --name N --zone Z [--repo-url URL --branch B | --src DIR] [--appworld]
    tpu.py launch --name N --zone Z [--session S] [--env K=V ...]
                  -- --preset appworld-qwen2.5-32b ...
    tpu.py logs   --name N --zone Z [--session S] [--worker 0] [--no-follow]
    tpu.py stop   --name N --zone Z [--session S]
    tpu.py delete --name N --zone Z [--queued]

Every subcommand takes --project P and --dry-run (print the exact commands, one per line, run
nothing). Everything after a bare `--` in `launch` is passed verbatim to
`python -m experiments.appworld_loop`. The job runs in a named tmux session on every worker, so
`stop` kills exactly that session (`tmux kill-session -t S`) rather than every python process on
the host, which would also kill unrelated jobs and leave no record of what was stopped.
"""  # noqa: E501 (its first line is the --help description, kept whole)

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB_MODULE = "experiments.appworld_loop"
# Runtime (software) version per TPU generation, from the Cloud TPU docs; --version overrides it.
RUNTIME_BY_GENERATION = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# PYTHONUNBUFFERED so the log file (and `logs`) shows progress as it happens, not in 8 KiB blocks.
DEFAULT_JOB_ENV = ("PYTHONUNBUFFERED=1",)


def remote_path(path: str) -> str:
    """A path quoted for the remote shell, keeping a leading `~/` unquoted so it still expands."""
    if path.startswith("~/"):
        return "~/" + shlex.quote(path[2:])
    return shlex.quote(path)


def remote_word(word: str) -> str:
    """One job argument for the remote shell: `~/x` and `NAME=~/x` / `--opt=~/x` get the worker's
    home.

    A shell expands `~` only at the start of a word, so `--opt=~/x` is rewritten to
    `--opt="$HOME"/x`.
    """
    key, eq, value = word.partition("=")
    if eq and value.startswith("~/") and not word.startswith("~/"):
        return f'{shlex.quote(key)}="$HOME"/{shlex.quote(value[2:])}'
    return remote_path(word)


# ----------------------------------------------------------------------------- commands


def tpu_flags(args) -> list[str]:
    return [f"--zone={args.zone}"] + ([f"--project={args.project}"] if args.project else [])


def ssh(args, remote_command: str, worker: str = "all") -> list[str]:
    return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.name, *tpu_flags(args),
            f"--worker={worker}", f"--command={remote_command}"]


def cmd_create(args) -> list[list[str]]:
    version = args.version or RUNTIME_BY_GENERATION.get(args.accelerator_type.split("-")[0])
    if not version:
        raise SystemExit(f"tpu.py create: no default runtime for --accelerator-type="
                         f"{args.accelerator_type}; pass --version (e.g. tpu-ubuntu2204-base)")
    spot = ["--spot"] if args.spot else []
    if args.queued:
        return [["gcloud", "compute", "tpus", "queued-resources", "create",
                 args.queued_id or args.name, f"--node-id={args.name}", *tpu_flags(args),
                 f"--accelerator-type={args.accelerator_type}", f"--runtime-version={version}",
                 *spot]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "create", args.name, *tpu_flags(args),
             f"--accelerator-type={args.accelerator_type}", f"--version={version}", *spot]]


def source_tarball(args) -> str:
    return os.path.join(tempfile.gettempdir(), f"loopjax-{args.name}.tar.gz")


def pack_source(src: str, out: str) -> None:
    """Tar the files git would ship (tracked + untracked-but-not-ignored): no .git, venvs or
    runs."""
    try:
        listed = subprocess.run(["git", "-C", src, "ls-files", "-co", "--exclude-standard", "-z"],
                                check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"tpu.py setup: --src {src} must be a git checkout ({e}); "
                         f"or pass --repo-url to clone on the workers instead") from None
    with tarfile.open(out, "w:gz") as tar:
        for rel in sorted(p for p in listed.decode().split("\0") if p):
            if os.path.isfile(os.path.join(src, rel)):
                tar.add(os.path.join(src, rel), arcname=rel)


def cmd_setup(args) -> list[list[str]]:
    repo = remote_path(args.remote_dir)
    commands = []
    if args.repo_url:
        url, branch = shlex.quote(args.repo_url), shlex.quote(args.branch)
        fetch = (f"if [ -d {repo}/.git ]; then git -C {repo} fetch --depth 1 origin {branch} && "
                 f"git -C {repo} checkout -f FETCH_HEAD; "
                 f"else git clone --depth 1 --branch {branch} {url} {repo}; fi")
    else:
        commands.append(["gcloud", "compute", "tpus", "tpu-vm", "scp", source_tarball(args),
                         f"{args.name}:loopjax-src.tar.gz", *tpu_flags(args), "--worker=all"])
        fetch = f"mkdir -p {repo} && tar -xzf loopjax-src.tar.gz -C {repo}"
    pip = "python3 -m pip install --user -q"
    steps = ["export PATH=$HOME/.local/bin:$PATH", fetch,
             "(command -v tmux >/dev/null || "
             "(sudo apt-get update -q && sudo apt-get install -y -q tmux))",
             f"cd {repo}", f"{pip} -e .", f"{pip} -U {shlex.quote(args.jax_spec)}"]
    if args.appworld:  # AppWorld's own installer: its package, its app servers, then its task data
        steps += [f"{pip} appworld", "appworld install", "appworld download data"]
    commands.append(ssh(args, " && ".join(steps)))
    return commands


def job_args(passthrough: list[str]) -> list[str]:
    """The job's CLI with --multihost added unless the caller set it (either way) already."""
    has = any(a.startswith("--") and a[2:].split("=")[0].replace("-", "_") == "multihost"
              for a in passthrough)
    return passthrough if has else [*passthrough, "--multihost"]


def log_file(args) -> str:
    return f"{args.log_dir.rstrip('/')}/{args.session}.log"


def cmd_launch(args) -> list[list[str]]:
    for kv in args.env:
        if "=" not in kv or not kv.split("=")[0].isidentifier():
            raise SystemExit(f"tpu.py launch: --env {kv!r} must look like NAME=VALUE")
    session, log = shlex.quote(args.session), remote_path(log_file(args))
    job = " ".join(map(remote_word, ["env", *DEFAULT_JOB_ENV, *args.env, "python3", "-m",
                                     JOB_MODULE, *job_args(args.job)]))
    # `tee -a` keeps the output of earlier launches of the same session name in one file.
    in_tmux = f"cd {remote_path(args.remote_dir)} && {job} 2>&1 | tee -a {log}"
    remote = (f"if tmux has-session -t {session} 2>/dev/null; then "
              f"echo \"tmux session {args.session} already runs on $(hostname); stop it first\" "
              ">&2; exit 1; fi; "
              f"mkdir -p {remote_path(args.log_dir)} && tmux new-session -d -s {session} "
              f"{shlex.quote(in_tmux)}")
    return [ssh(args, remote)]


def cmd_logs(args) -> list[list[str]]:
    follow = [] if args.no_follow else ["-F"]
    return [ssh(args, shlex.join(["tail", "-n", str(args.lines), *follow]) + " "
                      + remote_path(log_file(args)), worker=args.worker)]


def cmd_stop(args) -> list[list[str]]:
    session = shlex.quote(args.session)
    return [ssh(args, f"tmux kill-session -t {session} 2>/dev/null "
                      f"|| echo \"no tmux session {args.session} on $(hostname)\"")]


def cmd_delete(args) -> list[list[str]]:
    if args.queued:  # --force also deletes the TPU VM the queued resource created
        return [["gcloud", "compute", "tpus", "queued-resources", "delete",
                 args.queued_id or args.name, *tpu_flags(args), "--force", "--quiet"]]
    return [["gcloud", "compute", "tpus", "tpu-vm", "delete", args.name, *tpu_flags(args),
             "--quiet"]]


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--name", required=True, help="TPU VM (node) name")
    common.add_argument("--zone", required=True, help="e.g. us-east5-a (v5p), us-central2-b (v4)")
    common.add_argument("--project", default="",
                        help="GCP project (default: gcloud's configured one)")
    common.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    queued = argparse.ArgumentParser(add_help=False)
    queued.add_argument("--queued", action="store_true",
                        help="use a queued resource, not tpu-vm create")
    queued.add_argument("--queued-id", default="", help="queued resource id (default: --name)")
    session = argparse.ArgumentParser(add_help=False)
    session.add_argument("--session", default="loopjax", help="tmux session name of the job")
    session.add_argument("--log-dir", default="~/loopjax_logs", help="log folder on each worker")
    remote = argparse.ArgumentParser(add_help=False)
    remote.add_argument("--remote-dir", default="~/loopjax", help="the checkout on each worker")

    parser = argparse.ArgumentParser(prog="tpu.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("create", parents=[common, queued], help="create the TPU VM")
    p.add_argument("--accelerator-type", required=True, help="e.g. v5p-64, v4-8, v5litepod-8")
    p.add_argument("--version", default="", help="TPU runtime (default: by generation)")
    p.add_argument("--spot", action="store_true", help="Spot (preemptible) capacity")
    p.set_defaults(fn=cmd_create)
    p = sub.add_parser("setup", parents=[common, remote], help="install loopjax on every worker")
    p.add_argument("--repo-url", default="",
                   help="git clone this on the workers instead of copying --src")
    p.add_argument("--branch", default="main", help="branch to clone with --repo-url")
    p.add_argument("--src", default=REPO_ROOT, help="local checkout to copy (default: this repo)")
    p.add_argument("--jax-spec", default="jax[tpu]", help="pip requirement for JAX on TPU")
    p.add_argument("--appworld", action="store_true",
                   help="also install AppWorld and download its data")
    p.set_defaults(fn=cmd_setup)
    p = sub.add_parser("launch", parents=[common, session, remote],
                       help="run the job on --worker=all in a tmux session; job args after --")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="environment variable for the job (repeatable), e.g. LIBTPU_INIT_ARGS=...")
    p.set_defaults(fn=cmd_launch)
    p = sub.add_parser("logs", parents=[common, session], help="tail the job's log on one worker")
    p.add_argument("--worker", default="0", help="worker index (process 0 writes the run's files)")
    p.add_argument("--lines", type=int, default=100, help="lines of history to show")
    p.add_argument("--no-follow", action="store_true", help="print and exit instead of following")
    p.set_defaults(fn=cmd_logs)
    p = sub.add_parser("stop", parents=[common, session],
                       help="kill the job's tmux session on every worker")
    p.set_defaults(fn=cmd_stop)
    p = sub.add_parser("delete", parents=[common, queued],
                       help="delete the TPU VM (or queued resource)")
    p.set_defaults(fn=cmd_delete)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    job = []
    if "--" in argv:
        cut = argv.index("--")
        argv, job = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    if job and args.command != "launch":
        raise SystemExit(f"tpu.py {args.command}: arguments after -- are only for launch: {job}")
    args.job = job
    commands = args.fn(args)
    if args.dry_run:
        for command in commands:
            print(shlex.join(command))
        return 0
    if shutil.which("gcloud") is None:
        raise SystemExit("tpu.py: gcloud is not on PATH; install the Google Cloud CLI, or use "
                         "--dry-run")
    if args.command == "setup" and not args.repo_url:
        pack_source(args.src, source_tarball(args))
    for command in commands:
        print("+", shlex.join(command), file=sys.stderr, flush=True)
        code = subprocess.run(command).returncode
        if code:
            print(f"tpu.py {args.command}: `{' '.join(command[:5])}` exited with {code}",
                  file=sys.stderr)
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
