"""AppWorld's evaluation of an episode, apart from the process that ran the episode's code.

    outcome = evaluate(root, task_id, {"simple_note.jsonl": "...", "model_hashes.json": "..."})

Runs in AppWorld's venv, in a process of its own that `appworld_jail.py` forks for each
evaluation (never one where agent code ran). The files are what AppWorld wrote to the episode's
outputs after its last cell: per app, the SQL statements that changed its DB. They come from the
sandboxed episode, so they are data to check, not code to trust: only those names are taken,
written (no links followed) into a fresh folder of this process, and applied to the base DBs
under a SQLite authorizer that allows row inserts, updates and deletes in the main DB and
nothing else (no ATTACH, which would write host files; no schema change; no PRAGMA but the one
SQLite's full-text index reads). AppWorld's own `evaluate_task` then runs the task's checks with
its ground truth, which only this process reads. The outcome keeps the tests' requirements and
drops the traces of failed checks, which can hold the expected values.
"""
import os
import re
import shutil
import sqlite3

DB_FILE = re.compile(r"^(?:[a-z_]+\.jsonl|model_hashes\.json)$")
# SQLite authorizer actions: DELETE INSERT READ SELECT TRANSACTION UPDATE FUNCTION SAVEPOINT
ROW_ACTIONS = {9, 18, 20, 21, 22, 23, 31, 32}
PRAGMA, READ_PRAGMAS = 19, ("data_version",)  # the one FTS5 reads


class Refused(Exception):
    """The episode's changes are not row changes of its apps' DBs: the task fails."""


def authorize(action, arg1, arg2, db_name, trigger):
    """Row changes in the main DB (the base schema's own triggers and full-text indexes
    included); everything else denied."""
    if db_name not in (None, "main"):
        return sqlite3.SQLITE_DENY
    if action in ROW_ACTIONS or (action == PRAGMA and arg1 in READ_PRAGMAS and arg2 is None):
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


def _guard_loader() -> None:
    """AppWorld applies a changes file with `apply_db_changes`: under the authorizer from now on."""
    import appworld.apps.model_lib as model_lib
    if getattr(model_lib.apply_db_changes, "guarded", False):
        return
    apply = model_lib.apply_db_changes

    def guarded(connection, changes_file_path):
        connection.set_authorizer(authorize)
        try:
            return apply(connection, changes_file_path)
        finally:
            connection.set_authorizer(None)
    guarded.guarded = True
    model_lib.apply_db_changes = guarded


def evaluate(root: str, task_id: str, files: dict) -> dict:
    """{success, num_tests, difficulty, passes, failures} of the episode whose DB changes are
    `files`; raises Refused for files that are not an episode's changes."""
    from appworld.evaluator import evaluate_task
    _guard_loader()
    experiment = f"loopjax-evaluation-{os.getpid()}"
    top = os.path.join(root, "experiments", "outputs", experiment)
    folder = os.path.join(top, "tasks", task_id, "dbs")
    os.makedirs(folder)
    try:
        for name, text in files.items():
            if not DB_FILE.match(str(name)) or not isinstance(text, str):
                raise Refused(f"unexpected file in the episode's outputs: {str(name)[:80]!r}")
            fd = os.open(os.path.join(folder, name),
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(text)
        try:
            tracker = evaluate_task(task_id=task_id, experiment_name=experiment,
                                    suppress_errors=True,
                                    save_report=False).to_dict(stats_only=False)
        except (sqlite3.DatabaseError, ValueError, TypeError) as e:
            raise Refused(f"{type(e).__name__}: {e}") from None  # denied or malformed statements
    finally:
        shutil.rmtree(top, ignore_errors=True)
    return {"success": bool(tracker["success"]), "num_tests": int(tracker["num_tests"]),
            "difficulty": tracker.get("difficulty"),
            "passes": [{"requirement": p["requirement"]} for p in tracker["passes"]],
            "failures": [{"requirement": f["requirement"]} for f in tracker["failures"]]}
