"""What AppWorld caches across worlds in one process, made ready before the server forks.

    warm_up(root)    # in appworld_jail.py's server, before any episode

Runs in AppWorld's venv (standard library and appworld only).
"""
import os
import shutil
import sqlite3


def warm_up(root: str) -> None:
    """Builds and closes one world (no ground truth, outputs thrown away) so that what AppWorld
    caches across worlds in a process (the apps' modules and API routes, the base DBs, as
    in-memory copies) is in this server's memory, which every episode starts from: a start-up of
    about 3 s per episode becomes a fork. Nothing of a ground truth is read."""
    import appworld.apps.model_lib as model_lib
    from appworld.environment import AppWorld
    copies: dict = {}

    def base_db(path: str) -> sqlite3.Connection:
        """A base DB as an in-memory copy (AppWorld keeps the file open, read-write, for the
        life of the process: every fork would hold a writable descriptor of it)."""
        if path not in copies:
            source = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            copies[path] = sqlite3.connect(":memory:", check_same_thread=False)
            source.backup(copies[path])
            source.close()
        return copies[path]
    model_lib.get_direct_cached_sqlite3_connection = base_db
    tasks = sorted(os.listdir(os.path.join(root, "data", "tasks")))
    if not tasks:
        return
    task_id = tasks[0]
    experiment = f"loopjax-warm-up-{os.getpid()}"
    devnull = os.open(os.devnull, os.O_WRONLY)
    saved = os.dup(1)
    os.dup2(devnull, 1)  # AppWorld prints its safety warnings
    try:
        AppWorld(task_id=task_id, experiment_name=experiment, load_ground_truth=False).close()
    except Exception as e:  # noqa: BLE001 (a root it cannot load: each episode says why)
        os.dup2(saved, 1)
        print(f"warm-up skipped ({type(e).__name__}: {e}); episodes start cold", flush=True)
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
        shutil.rmtree(os.path.join(root, "experiments", "outputs", experiment), ignore_errors=True)
