"""Set up the real AppWorld engine offline: its own virtualenv and an AppWorld-format data root.

    python -m loopjax.envs.appworld_setup            # venv + `appworld install` + the task suite
    python -m loopjax.envs.appworld_setup --print    # where they are (for APPWORLD_* variables)

AppWorld pins its own dependencies (they clash with JAX's), so it lives in a virtualenv of its
own, with `appworld==APPWORLD_VERSION` from the package index and `appworld install`, which
unpacks the apps bundled in the wheel (no download). `appworld download data` needs the
internet; instead the suite builder (`loopjax/envs/appworld_suite/build.py`, run by that venv's
python) makes a data root from the package's own models. Both are cached under
`$LOOPJAX_APPWORLD_HOME` (default ~/.cache/loopjax/appworld): the venv once, the root once per
suite version (a hash of the builder's sources). A user with AppWorld's own data points
APPWORLD_ROOT at it instead; the adapter is the same.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import venv

APPWORLD_VERSION = "0.1.3.post1"
SUITE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "appworld_suite")
BUILD_SCRIPT = os.path.join(SUITE_DIR, "build.py")


class SetupError(RuntimeError):
    """A set-up step failed; the message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class Installation:
    home: str  # LOOPJAX_APPWORLD_HOME

    @property
    def python(self) -> str:  # AppWorld's venv's python (APPWORLD_PYTHON)
        return os.path.join(self.home, "venv", "bin", "python")

    @property
    def venv_stamp(self) -> str:
        return os.path.join(self.home, "venv", "loopjax-installed.json")

    def root(self, version: str) -> str:  # the suite's data root of that version (APPWORLD_ROOT)
        return os.path.join(self.home, f"suite-{version}")


def default_home() -> str:
    return os.path.abspath(os.path.expanduser(
        os.environ.get("LOOPJAX_APPWORLD_HOME", "~/.cache/loopjax/appworld")))


def _run(cmd: list[str], what: str, **kw) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        tail = (r.stdout + r.stderr)[-3000:]
        raise SetupError(f"{what} failed ({' '.join(cmd)}):\n{tail}")
    return r.stdout


def venv_ready(inst: Installation) -> bool:
    try:
        with open(inst.venv_stamp) as f:
            return (json.load(f).get("appworld") == APPWORLD_VERSION
                    and os.access(inst.python, os.X_OK))
    except (OSError, ValueError):
        return False


def ensure_venv(inst: Installation, log=print) -> None:
    """AppWorld's venv with the pinned appworld, its apps unpacked (`appworld install`)."""
    if venv_ready(inst):
        return
    log(f"[appworld] creating {os.path.dirname(inst.python)[:-4]} (appworld=={APPWORLD_VERSION})")
    venv.EnvBuilder(with_pip=True, clear=True).create(os.path.join(inst.home, "venv"))
    _run([inst.python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
          f"appworld=={APPWORLD_VERSION}"], "pip install appworld")
    log("[appworld] appworld install (unpacks the apps bundled in the wheel)")
    # `appworld install` writes under APPWORLD_ROOT's cwd too; run it in the venv's folder.
    _run([inst.python, "-m", "appworld.cli", "install"], "appworld install",
         cwd=os.path.join(inst.home, "venv"))
    with open(inst.venv_stamp, "w") as f:
        json.dump({"appworld": APPWORLD_VERSION}, f)


def suite_version(inst: Installation) -> str:
    return _run([inst.python, BUILD_SCRIPT, "--version"], "the suite's version").strip()


def suite_ready(root: str) -> bool:
    return os.path.isfile(os.path.join(root, "suite.json"))


def ensure_suite(inst: Installation, seed: int = 0, log=print) -> str:
    """The suite's data root for the current builder sources (built when missing)."""
    root = inst.root(suite_version(inst))
    if seed:
        root += f"-seed{seed}"
    if suite_ready(root):
        return root
    log(f"[appworld] building the AppWorld-format task suite in {root}")
    # Built aside and renamed into place: processes that start together (test workers, hosts
    # on one disk) never see half a root, and the first to finish wins.
    tmp = f"{root}.building-{os.getpid()}"
    proc = subprocess.run([inst.python, BUILD_SCRIPT, "--root", tmp, "--seed", str(seed)],
                          stdout=sys.stderr, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise SetupError(f"building the suite failed:\n{proc.stderr[-3000:]}")
    try:
        os.rename(tmp, root)
    except OSError:  # another process put its build there first
        shutil.rmtree(tmp, ignore_errors=True)
        if not suite_ready(root):
            raise
    return root


def setup(home: str | None = None, seed: int = 0, log=print) -> tuple[str, str]:
    """(python, root): AppWorld's venv python and the suite's data root, made when missing."""
    inst = Installation(home or default_home())
    os.makedirs(inst.home, exist_ok=True)
    ensure_venv(inst, log)
    return inst.python, ensure_suite(inst, seed, log)


def venv_python(home: str | None = None) -> str | None:
    """AppWorld's venv python of the set-up, or None when there is none (builds nothing)."""
    inst = Installation(home or default_home())
    return inst.python if venv_ready(inst) else None


def installed(home: str | None = None, build: bool = True) -> tuple[str, str] | None:
    """(python, root) of the set-up's venv and suite; None when there is no venv. A suite of an
    older version is rebuilt for the current sources (seconds) unless build=False."""
    inst = Installation(home or default_home())
    if not venv_ready(inst):
        return None
    if build:
        return inst.python, ensure_suite(inst, log=lambda m: print(m, file=sys.stderr))
    root = inst.root(suite_version(inst))
    return (inst.python, root) if suite_ready(root) else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", default=None, help="default $LOOPJAX_APPWORLD_HOME or "
                        "~/.cache/loopjax/appworld")
    parser.add_argument("--seed", type=int, default=0, help="the suite's seed (0: the default)")
    parser.add_argument("--print", action="store_true", help="print the paths of a finished "
                        "set-up and exit (status 1 when there is none)")
    args = parser.parse_args(argv)
    try:
        found = installed(args.home, build=False) if args.print else setup(args.home, args.seed)
    except SetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if found is None:
        print("AppWorld is not set up: run python -m loopjax.envs.appworld_setup", file=sys.stderr)
        return 1
    python, root = found
    print(f"export APPWORLD_PYTHON={python} APPWORLD_ROOT={root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
