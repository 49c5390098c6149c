"""Build an AppWorld-format data root from the installed appworld package: base DBs, API docs,
tasks and datasets. Runs in AppWorld's virtualenv:

    $APPWORLD_PYTHON loopjax/envs/appworld_suite/build.py --root DIR [--seed 0]

What it writes (AppWorld's own layout, read by its loaders):
    DIR/data/base_dbs/<app>.db, model_hashes.json    the world (people.py) through AppWorld's models
    DIR/data/api_docs/standard/<app>.json             AppWorld's docs of its 457 APIs
    DIR/data/tasks/<id>/specs.json                    instruction, supervisor, datetime, db_version
    DIR/data/tasks/<id>/dbs/<app>.jsonl               the task's SQL changes over the base DBs
    DIR/data/tasks/<id>/ground_truth/                 metadata, answer, test_data, evaluation.py,
                                                      public/private data, solution.py
    DIR/data/datasets/<split>.txt                     task ids per split
    DIR/suite.json                                    the suite's version, seed and counts (last)
Generated data derives from AppWorld's apps: it is built on the user's machine, never shipped.
The same --seed gives the same tasks and databases.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import random
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import people  # noqa: E402
import suite  # noqa: E402
from catalog import TEMPLATES  # noqa: E402


def suite_version() -> str:
    """A hash of this folder's sources: a changed template means a new version (a new build)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(HERE)):
        if name.endswith(".py") and name != "serve.py":  # the server is not the data
            with open(os.path.join(HERE, name), "rb") as f:
                h.update(name.encode() + b"\0" + f.read())
    return h.hexdigest()[:12]


def evaluation_source(template: suite.Template) -> str:
    with open(os.path.join(HERE, "checks.py")) as f:
        prelude = f.read()
    body = inspect.getsource(template.evaluate)
    name = template.evaluate.__name__
    return f"{prelude}\n\n{body}\n\nevaluate = {name}\n"


def solution_source(cells: tuple[str, ...]) -> str:
    """AppWorld's solution.py form: one function; cells apart by blank lines."""
    body = "\n\n".join("\n".join("    " + line for line in cell.splitlines()) for cell in cells)
    return f"def solution(apis, requester):\n{body}\n"


def write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def build_task(task_id: str, template: suite.Template, inst: suite.Instance, world, data: str):
    from appworld.apps import get_all_apps
    from appworld.collections.models import ModelCollection
    from appworld.common.constants import DB_VERSION

    task_dir = os.path.join(data, "tasks", task_id)
    shutil.rmtree(task_dir, ignore_errors=True)
    gt = os.path.join(task_dir, "ground_truth")
    os.makedirs(gt)
    apps = get_all_apps()
    models = ModelCollection.load(from_db_home_path=os.path.join(data, "base_dbs"),
                                  to_db_home_path=f":memory:task_input-{task_id}", load_apps=apps)
    sup = models.supervisor.Supervisor.find_one(email=world.supervisor.email)
    models.supervisor.Task.create_save(supervisor_id=sup.id, instruction=inst.instruction)
    if inst.setup is not None:
        inst.setup(models)
    models.save(db_home_path=os.path.join(task_dir, "dbs"), format="changes", app_names=apps,
                save_model_hashes=True)
    models.close()
    s = world.supervisor
    write_json(os.path.join(task_dir, "specs.json"), {
        "instruction": inst.instruction,
        "supervisor": {"first_name": s.first_name, "last_name": s.last_name, "email": s.email,
                       "phone_number": s.phone_number},
        "datetime": people.BASE_TIME.isoformat(), "db_version": DB_VERSION})
    write_json(os.path.join(gt, "metadata.json"), {
        "difficulty": template.difficulty, "num_apps": len(template.apps),
        "num_apis": len({c for cell in inst.solution for c in _apis(cell)}),
        "num_solution_code_lines": sum(len(c.splitlines()) for c in inst.solution),
        "mode": "minimal", "template": template.name})
    write_json(os.path.join(gt, "public_data.json"), {})
    write_json(os.path.join(gt, "private_data.json"), inst.private_data)
    write_json(os.path.join(gt, "answer.json"), inst.answer)
    write_json(os.path.join(gt, "test_data.json"),
               [{"requirement": r, "label": label} for r, label in template.tests])
    write_json(os.path.join(gt, "required_apps.json"), list(template.apps))
    with open(os.path.join(gt, "evaluation.py"), "w") as f:
        f.write(evaluation_source(template))
    with open(os.path.join(gt, "solution.py"), "w") as f:
        f.write(solution_source(inst.solution))


def add_api_docs(models) -> None:
    """The api_docs app's own records (what apis.api_docs.show_* read): AppWorld's docs of every
    app the agent sees."""
    from appworld.collections.api_docs import ApiDocCollection

    for app, docs in ApiDocCollection.build().items():
        if app == "admin":
            continue
        for name, doc in docs.items():
            models.api_docs.ApiDoc.create_save(
                app_name_=app, api_name=name, path=doc["path"], method=doc["method"],
                description=doc["description"], parameters=doc["parameters"],
                response_schemas=doc["response_schemas"])


def write_api_docs(data: str) -> None:
    """AppWorld's "standard" doc files, as ApiDocCollection.save writes them (its save also
    writes the openapi form, which needs a package AppWorld does not install)."""
    from appworld.collections.api_docs import ApiDocCollection
    from appworld.common.constants import CANARY_STRING

    folder = os.path.join(data, "api_docs", "standard")
    os.makedirs(folder)
    for app, docs in ApiDocCollection.build().items():
        write_json(os.path.join(folder, f"{app}.json"),
                   {name: dict(doc, canary_string=CANARY_STRING) for name, doc in docs.items()})


def _apis(code: str) -> set[str]:
    import re
    return set(re.findall(r"apis\.(\w+\.\w+)", code))


def build(root: str, seed: int = 0, progress=print) -> dict:
    """Build the whole root (replacing one of another version); returns suite.json's content."""
    os.environ["APPWORLD_ROOT"] = root
    from appworld.apps import get_all_apps
    from appworld.collections.models import ModelCollection

    suite.check_suite(list(TEMPLATES))
    t0 = time.time()
    data = os.path.join(root, "data")
    stamp = os.path.join(root, "suite.json")
    if os.path.exists(stamp):
        os.remove(stamp)  # written last: its presence means a complete build
    shutil.rmtree(data, ignore_errors=True)
    os.makedirs(data)
    progress(f"[suite] base databases ({people.NUM_PEOPLE + 1} people, {len(get_all_apps())} apps)")
    world = people.make_world(seed)
    base = ModelCollection.load(to_db_home_path=":memory:base", from_db_home_path=":memory:base",
                                load_apps=get_all_apps(), create_db=True)
    people.populate(base, world, seed)
    add_api_docs(base)
    base.save(db_home_path=os.path.join(data, "base_dbs"), format="full",
              app_names=get_all_apps(), save_model_hashes=True)
    base.close()
    progress("[suite] API docs")
    write_api_docs(data)
    splits: dict[str, list[str]] = {name: [] for name in suite.SPLITS}
    rng = random.Random(seed + 2)
    total = sum(len(suite.scenario_splits(t)) for t in TEMPLATES) * suite.TASKS_PER_SCENARIO
    done = 0
    for template in TEMPLATES:
        for k, split in enumerate(suite.scenario_splits(template)):
            for n in range(1, suite.TASKS_PER_SCENARIO + 1):
                task_id = f"{template.name}{k}_{n}"
                build_task(task_id, template, template.make(rng, world), world, data)
                splits[split].append(task_id)
                done += 1
        progress(f"[suite] {done}/{total} tasks ({template.name}, {time.time() - t0:.0f} s)")
    os.makedirs(os.path.join(data, "datasets"))
    for name, ids in splits.items():
        with open(os.path.join(data, "datasets", f"{name}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))
    info = {"version": suite_version(), "seed": seed, "tasks": done,
            "splits": {k: len(v) for k, v in splits.items()},
            "templates": {t.name: list(t.apps) for t in TEMPLATES}}
    write_json(stamp, info)
    progress(f"[suite] built {done} tasks in {root} ({time.time() - t0:.0f} s)")
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", help="the data root to build (DIR/data)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--version", action="store_true", help="print the suite version, exit")
    args = parser.parse_args(argv)
    if args.version:
        print(suite_version())
        return 0
    if not args.root:
        parser.error("--root is required")
    build(os.path.abspath(args.root), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
