"""tpu_scripts/: every script under --dry-run and for real against a fake `gcloud` that records
its argv.

The two must agree: what --dry-run prints, split by shlex, is exactly the argv gcloud receives.
"""

import importlib.util
import os
import shlex
import subprocess
import tarfile
import tempfile

import pytest

SCRIPTS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tpu_scripts")
NODE = ["--name", "my-tpu", "--zone", "us-east5-a", "--project", "my-proj"]
JOB = ["--preset", "appworld-qwen2.5-32b", "--model", "/mnt/models/Qwen2.5-32B-Instruct",
       "--mesh", "1,-1,1", "--run_dir=gs://my-bucket/runs/loop-32b", "--update.learning_rate=5e-5"]


def _load_tpu():
    spec = importlib.util.spec_from_file_location("tpu_scripts_tpu",
                                                  os.path.join(SCRIPTS, "tpu.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tpu = _load_tpu()


@pytest.fixture
def fake_gcloud(tmp_path, monkeypatch):
    """A `gcloud` first on PATH that appends its argv to calls.log; returns read() -> argvs since
    last read.

    A sh script, not Python: interpreter start-up dominates this test's time on a loaded machine.
    One record per line, arguments NUL-separated (no argument here contains a newline).
    """
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!/bin/sh\n{{ printf '%s\\0' gcloud \"$@\"; echo; }} >> '{calls}'\n")
    gcloud.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where `setup` writes its tarball

    def read():
        lines = calls.read_text().splitlines() if calls.exists() else []
        calls.unlink(missing_ok=True)
        return [line.split("\0")[:-1] for line in lines]
    return read


@pytest.fixture
def src_repo(tmp_path):
    """A tiny git checkout to copy, so `setup` does not tar the whole working tree under test."""
    repo = tmp_path / "src"
    (repo / "loopjax").mkdir(parents=True)
    (repo / "loopjax" / "__init__.py").write_text("")
    (repo / "setup.cfg").write_text("[metadata]\nname = loopjax\n")
    (repo / ".gitignore").write_text("runs/\n")
    (repo / "runs").mkdir()
    (repo / "runs" / "big.bin").write_text("ignored")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    subprocess.run(["git", "-C", str(repo), "add", "setup.cfg", ".gitignore"], check=True)
    return str(repo)


def both_ways(command, args, read, capsys):
    """Run a subcommand with --dry-run and for real; check they agree and return the gcloud
    argvs."""
    # before any `--`: what follows goes to the job
    assert tpu.main([command, "--dry-run", *args]) == 0
    assert read() == [], "--dry-run must not call gcloud"
    printed = [shlex.split(line) for line in capsys.readouterr().out.splitlines()]
    assert printed
    assert tpu.main([command, *args]) == 0
    assert read() == printed
    return printed


def flags(argv):
    return {a.split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("--") and "=" in a}


def remote_command(argv):
    assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and argv[5] == "my-tpu"
    return flags(argv)["--command"]


def test_create_tpu_vm_and_queued(fake_gcloud, capsys):
    [cmd] = both_ways("create", [*NODE, "--accelerator-type", "v5p-64", "--spot"], fake_gcloud,
                      capsys)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu"]
    assert flags(cmd) == {"--zone": "us-east5-a", "--project": "my-proj",
                          "--accelerator-type": "v5p-64", "--version": "v2-alpha-tpuv5"}
    assert "--spot" in cmd
    [cmd] = both_ways("create", [*NODE, "--accelerator-type", "v4-8", "--queued", "--version",
                                 "my-rt"], fake_gcloud, capsys)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu"]
    assert flags(cmd) == {"--node-id": "my-tpu", "--zone": "us-east5-a", "--project": "my-proj",
                          "--accelerator-type": "v4-8", "--runtime-version": "my-rt"}
    assert "--spot" not in cmd


def test_setup_copies_checkout_and_installs_on_all_workers(fake_gcloud, src_repo, tmp_path, capsys):
    scp, ssh = both_ways("setup", [*NODE, "--src", src_repo], fake_gcloud, capsys)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert "--worker=all" in scp and "--zone=us-east5-a" in scp
    with tarfile.open(scp[5]) as tar:  # tracked + untracked-not-ignored files; not runs/ or .git
        assert sorted(tar.getnames()) == [".gitignore", "loopjax/__init__.py", "setup.cfg"]
    assert "--worker=all" in ssh
    remote = remote_command(ssh)
    assert "pip install --user -q -e ." in remote and "'jax[tpu]'" in remote
    assert "appworld" not in remote


def test_setup_git_clone(fake_gcloud, capsys):
    [ssh] = both_ways("setup", [*NODE, "--repo-url", "https://example.com/loopjax.git", "--branch",
                                "dev", "--appworld"], fake_gcloud, capsys)
    assert "--worker=all" in ssh
    remote = remote_command(ssh)
    assert "git clone --depth 1 --branch dev https://example.com/loopjax.git ~/loopjax" in remote
    assert "appworld install" in remote


def test_launch_runs_the_job_in_named_tmux_on_all_workers(fake_gcloud, capsys):
    env_var = "LIBTPU_INIT_ARGS=--xla_tpu_enable_async_collective_fusion=true --xla_foo='x y'"
    [ssh] = both_ways("launch", [*NODE, "--session", "loop32b", "--env", env_var, "--", *JOB],
                      fake_gcloud, capsys)
    assert "--worker=all" in ssh and "--zone=us-east5-a" in ssh
    remote = remote_command(ssh)
    assert "tmux has-session -t loop32b" in remote  # refuses to start a second copy
    tmux = shlex.split(remote.split("; ")[-1].split(" && ", 1)[1])
    assert tmux[:5] == ["tmux", "new-session", "-d", "-s", "loop32b"] and len(tmux) == 6
    cd, job = tmux[5].split(" && ", 1)
    assert cd == "cd ~/loopjax"
    job_argv = shlex.split(job.split(" 2>&1 | ")[0])
    assert job.endswith("2>&1 | tee -a ~/loopjax_logs/loop32b.log")
    i = job_argv.index("python3")
    assert job_argv[:i] == ["env", "PYTHONUNBUFFERED=1", env_var]
    assert job_argv[i:] == ["python3", "-m", "experiments.appworld_loop", *JOB, "--multihost"]
    assert "python -m experiments.appworld_loop" in remote.replace("python3", "python")


def test_launch_expands_home_on_the_worker(fake_gcloud, capsys):
    """`~/x` and `--opt=~/x` in job args and --env reach the job as the worker's $HOME/x."""
    [ssh] = both_ways("launch", [*NODE, "--env", "JAX_COMPILATION_CACHE_DIR=~/jax cache", "--",
                                 "--model", "~/models/Qwen 7B", "--run_dir=~/runs/a", "--x=y~/z"],
                      fake_gcloud, capsys)
    tmux = shlex.split(remote_command(ssh).split("; ")[-1].split(" && ", 1)[1])
    job = tmux[5].split(" && ", 1)[1].split(" 2>&1 | ")[0]
    words = subprocess.run(["bash", "-c", f"printf '%s\\n' {job}"], env=dict(os.environ, HOME="/h"),
                           capture_output=True, text=True, check=True).stdout.splitlines()
    assert words == ["env", "PYTHONUNBUFFERED=1", "JAX_COMPILATION_CACHE_DIR=/h/jax cache",
                     "python3", "-m", "experiments.appworld_loop", "--model", "/h/models/Qwen 7B",
                     "--run_dir=/h/runs/a", "--x=y~/z", "--multihost"]


def test_launch_keeps_an_explicit_multihost(fake_gcloud, capsys):
    [ssh] = both_ways("launch", [*NODE, "--", "--env", "appworld", "--multihost=false"],
                      fake_gcloud, capsys)
    assert remote_command(ssh).count("--multihost") == 1


def test_logs_tails_one_worker(fake_gcloud, capsys):
    [ssh] = both_ways("logs", [*NODE, "--session", "loop32b", "--worker", "3", "--no-follow"],
                      fake_gcloud, capsys)
    assert "--worker=3" in ssh
    assert remote_command(ssh) == "tail -n 100 ~/loopjax_logs/loop32b.log"


def test_stop_kills_only_the_tmux_session(fake_gcloud, capsys):
    [ssh] = both_ways("stop", [*NODE, "--session", "loop32b"], fake_gcloud, capsys)
    assert "--worker=all" in ssh and "--zone=us-east5-a" in ssh
    remote = remote_command(ssh)
    assert remote.startswith("tmux kill-session -t loop32b ")
    assert "pkill" not in " ".join(ssh) and "killall" not in " ".join(ssh)


def test_delete(fake_gcloud, capsys):
    [cmd] = both_ways("delete", NODE, fake_gcloud, capsys)
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu", "--zone=us-east5-a",
                   "--project=my-proj", "--quiet"]
    [cmd] = both_ways("delete", [*NODE, "--queued"], fake_gcloud, capsys)
    assert cmd[:6] == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu"]
    assert "--force" in cmd and "--quiet" in cmd


@pytest.mark.parametrize("command,args,message", [
    ("stop", ["--name", "my-tpu"], "required: --zone"),
    ("create", ["--name", "my-tpu", "--zone", "z"], "required: --accelerator-type"),
    ("create", ["--name", "my-tpu", "--zone", "z", "--accelerator-type", "v9-8"], "pass --version"),
    ("launch", [*NODE, "--env", "NOEQUALS"], "NAME=VALUE"),
    ("stop", [*NODE, "--", "--preset", "x"], "only for launch"),
])
def test_clear_errors(fake_gcloud, capsys, command, args, message):
    with pytest.raises(SystemExit) as e:
        tpu.main([command, *args])
    assert e.value.code != 0 and message in f"{e.value.code} {capsys.readouterr().err}"
    assert fake_gcloud() == []


def test_missing_gcloud_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SystemExit, match="gcloud is not on PATH"):
        tpu.main(["delete", *NODE])


def test_shell_wrappers_forward_to_tpu_py():
    """Each tpu_scripts/<command>.sh is `tpu.py <command>`; one subprocess each (start-up is
    slow)."""
    for command, extra in [("create", ["--accelerator-type", "v4-8"]), ("setup", []),
                           ("launch", []), ("logs", []), ("stop", []), ("delete", [])]:
        result = subprocess.run([os.path.join(SCRIPTS, f"{command}.sh"), "--dry-run", *NODE,
                                 *extra], capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("gcloud compute tpus ")
