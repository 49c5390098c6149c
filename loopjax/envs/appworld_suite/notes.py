"""simple_note templates: create a note, count notes by tag (paging), append to a note."""
from __future__ import annotations

import random
from datetime import timedelta

import people
from checks import added, collateral, given_answer, no_answer_and_only, updated
from people import World
from suite import WRITE_TESTS, Instance, Template

LOGIN = ("passwords = {{p['account_name']: p['password'] for p in "
         "apis.supervisor.show_account_passwords()}}\n"
         "token = apis.{app}.login(username={user!r}, password=passwords[{app!r}])['access_token']")


def login(app: str, world: World) -> str:
    """A solution cell that logs the supervisor into `app` with the password on file."""
    s = world.supervisor
    return LOGIN.format(app=app, user=s.phone_number if app == "phone" else s.email)


def _sid(models, world):
    return people.user_id(models, "simple_note", world.supervisor)


# -------------------------------------------------------------------- create a note
def make_create(rng: random.Random, world: World) -> Instance:
    title = f"{rng.choice(people.WORDS).title()} {rng.choice(('plan', 'list', 'log', 'ideas'))}"
    items = rng.sample(people.WORDS, 3)
    content = "\n".join(f"- {w}" for w in items)
    shown = ", ".join(items)
    instruction = (f"Create a new note in my simple_note account titled \"{title}\" whose content "
                   f"is a bulleted list (one \"- item\" per line) of: {shown}.")
    solution = (login("simple_note", world),
                f"apis.simple_note.create_note(title={title!r}, content={content!r}, "
                "access_token=token)\napis.supervisor.complete_task()")
    return Instance(instruction, solution, {"title": title, "content": content})


def evaluate_create(test, public_data, private_data, main_user, models, ground_truth_answer):
    notes = added(models, "simple_note.Note")
    with test("exactly one note is added"):
        test.case(len(notes), "==", 1)
    with test("the note has the title and content asked for, for the supervisor"):
        note = notes[0]
        test.case(note.title.strip(), "==", private_data.title)
        test.case(note.content.strip(), "==", private_data.content)
        owner = models.end.simple_note.User.find_one(email=main_user.email)
        test.case(note.user_id, "==", owner.id)
    no_answer_and_only(test, models, {"simple_note.Note": {"add": True}})


NOTE_CREATE = Template(
    "notecreate", ("simple_note",), 1,
    (("exactly one note is added", "no_op_fail"),
     ("the note has the title and content asked for, for the supervisor", "no_op_fail"),
     *WRITE_TESTS),
    make_create, evaluate_create)


# -------------------------------------------------------------------- count notes by tag
def make_count(rng: random.Random, world: World) -> Instance:
    tag = rng.choice(("packing", "receipts", "meetings", "workouts"))
    n = rng.randint(3, 12)  # more than a page (5) in most tasks

    def setup(models):
        sid = _sid(models, world)
        for i in range(n + rng.randint(2, 6)):
            at = people.when(rng, 60)
            tags = [tag] if i < n else [rng.choice(people.NOTE_TAGS)]
            models.simple_note.Note.create_save(
                user_id=sid, title=f"{rng.choice(people.WORDS)} {i}",
                content=rng.choice(people.WORDS), tags=tags, created_at=at, updated_at=at)

    instruction = f"How many of my simple_note notes are tagged \"{tag}\"?"
    solution = (login("simple_note", world),
                "count, page = 0, 0\nwhile True:\n"
                f"    notes = apis.simple_note.search_notes(tags=[{tag!r}], page_index=page, "
                "page_limit=20, access_token=token)\n"
                "    if not notes:\n        break\n"
                f"    count += sum({tag!r} in note['tags'] for note in notes)\n    page += 1",
                "apis.supervisor.complete_task(answer=count)")
    return Instance(instruction, solution, {"tag": tag}, answer=n, setup=setup)


def evaluate_answer_only(test, public_data, private_data, main_user, models,
                         ground_truth_answer):
    with test("the answer is right"):
        test.answer(given_answer(models), ground_truth_answer)
    with test("nothing changes"):
        test.case(collateral(models, {}), "==", [])


ANSWER_TESTS = (("the answer is right", "no_op_fail"), ("nothing changes", "no_op_pass"))
NOTE_COUNT = Template("notecount", ("simple_note",), 2, ANSWER_TESTS, make_count,
                      evaluate_answer_only)


# -------------------------------------------------------------------- append to a note
def make_append(rng: random.Random, world: World) -> Instance:
    title = f"{rng.choice(('Shopping', 'Reading', 'Packing'))} list {rng.randint(10, 99)}"
    old = "\n".join(f"- {w}" for w in rng.sample(people.WORDS, 2))
    item = rng.choice(people.WORDS)

    def setup(models):
        at = people.BASE_TIME - timedelta(days=rng.randint(1, 30))
        models.simple_note.Note.create_save(user_id=_sid(models, world), title=title, content=old,
                                            tags=["lists"], created_at=at, updated_at=at)

    instruction = (f"Add \"{item}\" as a new last line \"- {item}\" to my simple_note note titled "
                   f"\"{title}\", keeping what it already says.")
    solution = (login("simple_note", world),
                f"note = [n for n in apis.simple_note.search_notes(query={title!r}, page_limit=20, "
                f"access_token=token) if n['title'] == {title!r}][0]\n"
                "apis.simple_note.add_content_to_note(note_id=note['note_id'], "
                f"append_or_prepend='append', added_content={'- ' + item!r}, access_token=token)",
                "apis.supervisor.complete_task()")
    return Instance(instruction, solution, {"title": title, "content": f"{old}\n- {item}"},
                    setup=setup)


def evaluate_append(test, public_data, private_data, main_user, models, ground_truth_answer):
    changed = updated(models, "simple_note.Note")
    with test("exactly one note is updated"):
        test.case(len(changed), "==", 1)
    with test("that note is the one asked for and now ends with the new line"):
        test.case(changed[0].title, "==", private_data.title)
        test.case(changed[0].content.strip(), "==", private_data.content)
    no_answer_and_only(test, models, {"simple_note.Note": {"content"}})


NOTE_APPEND = Template(
    "noteappend", ("simple_note",), 1,
    (("exactly one note is updated", "no_op_fail"),
     ("that note is the one asked for and now ends with the new line", "no_op_fail"),
     *WRITE_TESTS),
    make_append, evaluate_append)

TEMPLATES = (NOTE_CREATE, NOTE_COUNT, NOTE_APPEND)
