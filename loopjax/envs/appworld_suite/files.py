"""file_system templates (no train task touches the app: these make test_challenge): create a
file at an exact path, count the files directly in a folder that also has sub-folders."""
from __future__ import annotations

import random
from datetime import timedelta

import people
from checks import added, no_answer_and_only
from notes import ANSWER_TESTS, evaluate_answer_only, login
from people import World
from suite import WRITE_TESTS, Instance, Template

EXTENSIONS = ("txt", "md", "csv", "jpg", "pdf")


def _home(world: World) -> str:
    return f"/home/{world.supervisor.first_name.lower()}/"


def _folder(models, world: World, path: str, rng: random.Random) -> None:
    """A directory of the supervisor's, dated so that builds are byte-identical."""
    at = people.BASE_TIME - timedelta(days=rng.randint(30, 200))
    models.file_system.Directory.create_save(
        path=path, user_id=people.user_id(models, "file_system", world.supervisor),
        created_at=at, updated_at=at)


def _file(models, world: World, path: str, rng: random.Random) -> None:
    at = people.when(rng, 90)
    models.file_system.File.create_save(
        path=path, user_id=people.user_id(models, "file_system", world.supervisor),
        content=f"{rng.choice(people.WORDS)} {rng.choice(people.WORDS)}", created_at=at,
        updated_at=at)


# -------------------------------------------------------------------- create a file
def make_create(rng: random.Random, world: World) -> Instance:
    folder = f"documents/{rng.choice(('trips', 'taxes', 'recipes', 'school'))}/"
    year = rng.randint(2019, 2023)
    stem = rng.choice(people.WORDS)
    name = f"{stem}_{year}.txt"
    w1, w2, w3 = rng.sample(people.WORDS, 3)
    content = f"{w1.title()} list for {year}: {w2}, {w3}."

    def setup(models):
        _folder(models, world, _home(world) + folder, rng)
        # Last year's file of the same stem sits beside it: the new file must not replace it.
        for old in (f"{stem}_{year - 1}.txt", f"{rng.choice(people.WORDS)}_notes.md"):
            _file(models, world, _home(world) + folder + old, rng)

    instruction = (f"In my file_system account, create a new file at ~/{folder}{name} whose "
                   f"content is exactly: \"{content}\"")
    solution = (login("file_system", world),
                f"apis.file_system.create_file(file_path={'~/' + folder + name!r}, "
                f"content={content!r}, access_token=token)",
                "apis.supervisor.complete_task()")
    return Instance(instruction, solution, {"path": _home(world) + folder + name,
                                            "content": content}, setup=setup)


def evaluate_create(test, public_data, private_data, main_user, models, ground_truth_answer):
    files = added(models, "file_system.File")
    with test("exactly one file is added"):
        test.case(len(files), "==", 1)
    with test("the file has the path and content asked for, for the supervisor"):
        test.case(files[0].path, "==", private_data.path)
        test.case(files[0].content.strip(), "==", private_data.content)
        owner = models.end.file_system.User.find_one(email=main_user.email)
        test.case(files[0].user_id, "==", owner.id)
    # create_file stamps its folders' updated_at: bookkeeping, which collateral ignores.
    no_answer_and_only(test, models, {"file_system.File": {"add": True}})


FILE_CREATE = Template(
    "filecreate", ("file_system",), 1,
    (("exactly one file is added", "no_op_fail"),
     ("the file has the path and content asked for, for the supervisor", "no_op_fail"),
     *WRITE_TESTS),
    make_create, evaluate_create, challenge=True)


# -------------------------------------------------------------------- count a folder's files
def make_count(rng: random.Random, world: World) -> Instance:
    folder = f"photos/{rng.choice(people.WORDS)}_trip/"
    n = rng.randint(3, 12)
    # show_directory lists recursively and mixes in sub-folders by default, so a plain len()
    # of it counts the sub-folder and its files too; a sibling folder shares the name's start.
    sub, sibling = f"{folder}{rng.choice(('edited', 'raw', 'shared'))}/", folder[:-1] + "_old/"

    def setup(models):
        home = _home(world)
        for path in (folder, sub, sibling):
            _folder(models, world, home + path, rng)
        names = rng.sample([f"{w}_{i}" for w in people.WORDS for i in range(1, 4)], n + 7)
        for i, stem in enumerate(names):
            where = folder if i < n else (sub if i < n + 4 else sibling)
            _file(models, world, f"{home}{where}{stem}.{rng.choice(EXTENSIONS)}", rng)

    instruction = (f"How many files are directly in my file_system folder ~/{folder}, not "
                   "counting sub-folders or the files inside them?")
    solution = (login("file_system", world),
                f"paths = apis.file_system.show_directory(directory_path={'~/' + folder!r}, "
                "entry_type='files', recursive=False, access_token=token)",
                "apis.supervisor.complete_task(answer=len(paths))")
    return Instance(instruction, solution, {"folder": _home(world) + folder}, answer=n,
                    setup=setup)


FILE_COUNT = Template("filecount", ("file_system",), 2, ANSWER_TESTS, make_count,
                      evaluate_answer_only, challenge=True)

TEMPLATES = (FILE_CREATE, FILE_COUNT)
