"""todoist templates: add a task to a project, count unfinished tasks by project colour (paging).

todoist's APIs (apps/todoist/apis.py) reach a project only through the supervisor's
ProjectCollaboratorLink to it, create_task renumbers the order_index of the tasks it is inserted
among, and project id 0 (the inbox) creates an Inbox project on first use.
"""
from __future__ import annotations

import random
from datetime import timedelta

import people
from checks import added, no_answer_and_only, updated
from notes import ANSWER_TESTS, evaluate_answer_only, login
from people import World
from suite import WRITE_TESTS, Instance, Template

PROJECTS = ("Kitchen remodel", "Trip to Lisbon", "Tax prep", "Wedding planning", "Moving house",
            "Reading list", "Fitness plan", "Garage sale", "Birthday party", "Job search",
            "Car service", "Spring cleaning")
VERBS = ("Buy", "Call about", "Book", "Fix", "Email about", "Pack", "Return", "Renew")
THINGS = ("order", "tickets", "receipt", "parts", "forms", "keys", "permit", "samples")
COLORS = ("red", "green", "orange", "yellow")  # not blue: people.py's base projects are blue


def _title(rng: random.Random) -> str:
    return f"{rng.choice(VERBS)} the {rng.choice(people.WORDS)} {rng.choice(THINGS)}"


def _at(rng: random.Random):
    return people.BASE_TIME - timedelta(seconds=rng.randint(86400, 90 * 86400))


def _sid(models, world: World) -> int:
    return people.user_id(models, "todoist", world.supervisor)


def _open_todoist(models, sid: int) -> None:
    """Give every project of the supervisor the collaborator link the APIs check, and an inbox.

    The base state's projects have no link (so the APIs would hide them), and without an inbox
    the first call with project id 0 would add one: an agent's harmless look would change state.
    """
    todoist, long_ago = models.todoist, people.BASE_TIME - timedelta(days=400)
    if todoist.Project.find_one(user_id=sid, is_inbox=True) is None:
        todoist.Project.create_save(user_id=sid, name="Inbox", is_inbox=True, created_at=long_ago)
    for project in todoist.Project.find_all(user_id=sid):
        if not todoist.ProjectCollaboratorLink.exists(user_id=sid, project_id=project.id):
            # a fixed time: the base projects' own created_at is the build's wall clock
            todoist.ProjectCollaboratorLink.create_save(project_id=project.id, user_id=sid,
                                                        created_at=long_ago)


def _project(models, sid: int, rng: random.Random, name: str, color: str, tasks: list) -> None:
    """A project with its link and `tasks` [(title, is_completed)], all timestamps set here
    (the models' defaults are the wall clock: two builds would differ)."""
    at = _at(rng)
    todoist = models.todoist
    project = todoist.Project.create_save(user_id=sid, name=name, color=color, created_at=at)
    todoist.ProjectCollaboratorLink.create_save(project_id=project.id, user_id=sid, created_at=at)
    for i, (title, done) in enumerate(tasks):
        todoist.Task.create_save(project_id=project.id, user_id=sid, title=title,
                                 priority=rng.choice(("high", "medium", "low")), order_index=i,
                                 is_completed=done, created_at=at + timedelta(hours=i + 1))


# -------------------------------------------------------------------- add a task
def make_add(rng: random.Random, world: World) -> Instance:
    name, decoy = rng.sample(PROJECTS, 2)
    title = _title(rng)

    def setup(models):
        sid = _sid(models, world)
        _open_todoist(models, sid)
        _project(models, sid, rng, name, rng.choice(COLORS),
                 [(_title(rng), rng.random() < 0.3) for _ in range(rng.randint(2, 5))])
        _project(models, sid, rng, decoy, rng.choice(COLORS),
                 [(_title(rng), False) for _ in range(rng.randint(1, 4))])

    instruction = f"Add a task titled \"{title}\" to my todoist project \"{name}\"."
    solution = (login("todoist", world),
                f"project = [p for p in apis.todoist.show_projects(query={name!r}, page_limit=20, "
                f"access_token=token) if p['name'] == {name!r}][0]\n"
                "apis.todoist.create_task(project_id=project['project_id'], "
                f"title={title!r}, access_token=token)",
                "apis.supervisor.complete_task()")
    return Instance(instruction, solution, {"project": name, "title": title}, setup=setup)


def evaluate_add(test, public_data, private_data, main_user, models, ground_truth_answer):
    new = added(models, "todoist.Task")
    me = models.end.todoist.User.find_one(email=main_user.email)
    project = models.end.todoist.Project.find_one(user_id=me.id, name=private_data.project)
    with test("exactly one task is added"):
        test.case(len(new), "==", 1)
    with test("the task has the title asked for, in that project, for the supervisor"):
        test.case(new[0].title.strip(), "==", private_data.title)
        test.case(new[0].project_id, "==", project.id)
        test.case(new[0].user_id, "==", me.id)
    with test("only that project's tasks are reordered"):  # create_task renumbers its siblings
        moved = {t.project_id for t in updated(models, "todoist.Task")}
        test.case(sorted(moved - {project.id}), "==", [])
    no_answer_and_only(test, models, {"todoist.Task": {"add": True, "fields": {"order_index"}}})


TODO_ADD = Template(
    "todoadd", ("todoist",), 1,
    (("exactly one task is added", "no_op_fail"),
     ("the task has the title asked for, in that project, for the supervisor", "no_op_fail"),
     ("only that project's tasks are reordered", "no_op_pass"),
     *WRITE_TESTS),
    make_add, evaluate_add)


# -------------------------------------------------------------------- count unfinished by colour
def make_count(rng: random.Random, world: World) -> Instance:
    color = rng.choice(COLORS)
    names = rng.sample(PROJECTS, rng.randint(8, 11))
    n_match = rng.randint(6, len(names) - 2)  # more matching projects than a page (5)
    plans = []  # (name, colour, [(title, done)])
    for i, name in enumerate(names):
        if i < n_match:  # each has an unfinished task: a missed page always shows in the answer
            done = [False] * rng.randint(1, 3) + [True] * rng.randint(0, 2)
            rng.shuffle(done)
            plans.append((name, color, [(_title(rng), d) for d in done]))
        else:
            plans.append((name, rng.choice([x for x in COLORS if x != color]),
                          [(_title(rng), rng.random() < 0.35) for _ in range(rng.randint(0, 4))]))
    rng.shuffle(plans)  # matching projects interleave with the others in the listing
    answer = sum(not done for _, c, tasks in plans if c == color for _, done in tasks)

    def setup(models):
        sid = _sid(models, world)
        _open_todoist(models, sid)
        for name, c, tasks in plans:
            _project(models, sid, rng, name, c, tasks)
        todoist = models.todoist  # the answer was fixed before the base state: check it holds
        got = sum(not t.is_completed for p in todoist.Project.find_all(user_id=sid, color=color)
                  for t in todoist.Task.find_all(project_id=p.id))
        if got != answer:
            raise RuntimeError(f"todocount: state counts {got}, answer is {answer}")

    instruction = (f"How many unfinished (not completed) tasks are there in total across all my "
                   f"todoist projects whose colour is {color}?")
    solution = (login("todoist", world),
                "count, page = 0, 0\nwhile True:\n"
                f"    projects = apis.todoist.show_projects(color={color!r}, page_index=page, "
                "page_limit=5, access_token=token)\n"
                "    if not projects:\n        break\n"
                "    for p in projects:\n"
                "        tasks = apis.todoist.show_tasks(project_id=p['project_id'], "
                "is_completed=False, access_token=token)\n"
                "        count += len(tasks['no_section_tasks'])\n"
                "        count += sum(len(s['tasks']) for s in tasks['sections'])\n"
                "    page += 1",
                "apis.supervisor.complete_task(answer=count)")
    return Instance(instruction, solution, {"color": color}, answer=answer, setup=setup)


TODO_COUNT = Template("todocount", ("todoist",), 2, ANSWER_TESTS, make_count,
                      evaluate_answer_only)

TEMPLATES = (TODO_ADD, TODO_COUNT)
