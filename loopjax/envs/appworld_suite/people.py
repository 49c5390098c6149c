"""The synthetic world's people and their base state, made through AppWorld's own models.

Runs in AppWorld's virtualenv (it imports `appworld`), never in loopjax's. A supervisor and
`NUM_PEOPLE` others, each with an account on every user app, the supervisor's phone contacts,
venmo friends, notes, to-do projects and files. Everything comes from one `random.Random(seed)`,
so the same seed gives byte-identical databases. Task templates add their own records on top.
"""
from __future__ import annotations

import dataclasses
import random
from datetime import datetime, timedelta

FIRST = ("Ava Liam Maya Noah Iris Owen Lena Ezra Nora Felix Ruby Jonah Clara Milo Hazel Theo "
         "Vera Silas Jade Hugo Leah Tobias Greta Reza Ines Dario Mina Kofi Anya Pavel Lucia "
         "Arjun Sofia Mateo Elif Tomas").split()
LAST = ("Brennan Okafor Lindqvist Moreau Tanaka Castillo Novak Haddad Fischer Quinn Delgado "
        "Sato Marsh Petrov Abara Whitfield Romano Kowalski Ibsen Farrow Nakamura Oyelaran "
        "Sorensen Vance Achebe Lopes Keller Duval Mensah Park").split()
USER_APPS = ("simple_note", "venmo", "phone", "todoist", "file_system")
NUM_PEOPLE = 30
BASE_TIME = datetime(2023, 5, 18, 10, 0, 0)  # every task's clock starts here (specs datetime)
RELATIONS = ("friend", "coworker", "sibling", "cousin", "neighbor", "roommate")
NOTE_TAGS = ("recipe", "travel", "work", "ideas", "books", "health", "finance", "garden")
WORDS = ("harbor lantern meadow copper willow ember summit orchard velvet glacier thistle "
         "cobalt prairie juniper falcon marble canyon saffron").split()


@dataclasses.dataclass(frozen=True)
class Person:
    first_name: str
    last_name: str
    email: str
    phone_number: str
    password: str  # the same on every app: only the supervisor's are looked up by tasks
    relation: str

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.last_name}"


@dataclasses.dataclass(frozen=True)
class World:
    supervisor: Person
    people: tuple[Person, ...]
    passwords: dict  # the supervisor's password per app (distinct, from supervisor.AccountPassword)


def _phone(rng: random.Random) -> str:
    return f"{rng.randint(201, 989)}{rng.randint(200, 999)}{rng.randint(1000, 9999)}"


def _password(rng: random.Random) -> str:
    chars = "abcdefghjkmnpqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789"
    return "".join(rng.choice(chars) for _ in range(12))


def make_world(seed: int) -> World:
    """The supervisor and NUM_PEOPLE distinct people (names, emails, phones, passwords)."""
    rng = random.Random(seed)
    names = [(f, last) for f in FIRST for last in LAST]
    rng.shuffle(names)
    firsts: set[str] = set()
    chosen = []
    for f, last in names:  # first names unique, so "my friend Maya" is never ambiguous
        if f not in firsts:
            firsts.add(f)
            chosen.append((f, last))
        if len(chosen) == NUM_PEOPLE + 1:
            break
    people = [Person(f, last, f"{f.lower()}.{last.lower()}@example.com", _phone(rng),
                     _password(rng), rng.choice(RELATIONS)) for f, last in chosen]
    passwords = {app: _password(rng) for app in USER_APPS}
    return World(people[0], tuple(people[1:]), passwords)


def when(rng: random.Random, days: int = 120) -> datetime:
    """A moment in the `days` before BASE_TIME, to the second."""
    return BASE_TIME - timedelta(seconds=rng.randint(3600, days * 86400))


def user_id(models, app: str, person: Person) -> int:
    """The id of `person`'s account on `app`."""
    key = {"phone_number": person.phone_number} if app == "phone" else {"email": person.email}
    return models[app].User.find_one(**key).id


def populate(models, world: World, seed: int) -> None:
    """Create the base state: accounts everywhere, then the supervisor's histories."""
    rng = random.Random(seed + 1)
    everyone = (world.supervisor, *world.people)
    for p in everyone:
        birthday = f"19{rng.randint(60, 99)}-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"
        models.admin.MainUser.create_save(first_name=p.first_name, last_name=p.last_name,
                                          email=p.email, phone_number=p.phone_number,
                                          birthday=birthday)
    s = world.supervisor
    sup = models.supervisor.Supervisor.create_save(first_name=s.first_name, last_name=s.last_name,
                                                   email=s.email, phone_number=s.phone_number,
                                                   birthday="1988-04-12")
    for app, password in world.passwords.items():
        models.supervisor.AccountPassword.create_save(supervisor_id=sup.id, account_name=app,
                                                      password=password)
    for app in USER_APPS:
        for p in everyone:
            password = world.passwords[app] if p is s else p.password
            fields = dict(first_name=p.first_name, last_name=p.last_name, password=password,
                          created_at=BASE_TIME - timedelta(days=400), last_logged_in=when(rng))
            if app == "phone":
                fields["phone_number"] = p.phone_number
            else:
                fields.update(email=p.email, verified=True)
            if app == "venmo":
                fields["venmo_balance"] = round(rng.uniform(50, 900), 2)
            models[app].User.create_save(**fields)
    _phone_book(models, world, rng)
    _venmo(models, world, rng)
    _notes(models, world, rng)
    _todoist(models, world, rng)
    _files(models, world, rng)


def _phone_book(models, world: World, rng: random.Random) -> None:
    sid = user_id(models, "phone", world.supervisor)
    for p in world.people:
        models.phone.Contact.create_save(user_id=sid, first_name=p.first_name,
                                         last_name=p.last_name, email=p.email,
                                         phone_number=p.phone_number, relationships=[p.relation],
                                         created_at=when(rng, 400))
    for p in rng.sample(world.people, 12):
        for _ in range(rng.randint(1, 3)):
            send_text(models, p, world.supervisor, f"see you at the {rng.choice(WORDS)}", when(rng))


def send_text(models, sender: Person, receiver: Person, message: str, at: datetime) -> None:
    """One text message as the phone app stores it: a global record and one copy per side."""
    g = models.phone.GlobalTextMessage.create_save(
        sender_id=user_id(models, "phone", sender), receiver_id=user_id(models, "phone", receiver),
        message=message, created_at=at)
    for p in (sender, receiver):
        models.phone.UserTextMessage.create_save(global_text_message_id=g.id,
                                                 user_id=user_id(models, "phone", p), created_at=at)


def _venmo(models, world: World, rng: random.Random) -> None:
    sid = user_id(models, "venmo", world.supervisor)
    for p in world.people[:20]:
        models.venmo.Friendship.create_save(user_id=sid, friend_id=user_id(models, "venmo", p),
                                            created_at=when(rng, 400))
    for _ in range(25):
        p = rng.choice(world.people)
        a, b = (p, world.supervisor) if rng.random() < 0.5 else (world.supervisor, p)
        venmo_payment(models, a, b, round(rng.uniform(5, 120), 2), rng.choice(WORDS), when(rng))


def venmo_payment(models, sender: Person, receiver: Person, amount: float, note: str,
                  at: datetime) -> None:
    models.venmo.Transaction.create_save(
        sender_id=user_id(models, "venmo", sender), receiver_id=user_id(models, "venmo", receiver),
        amount=amount, description=note, created_at=at, updated_at=at, private=False)


def _notes(models, world: World, rng: random.Random) -> None:
    sid = user_id(models, "simple_note", world.supervisor)
    for i in range(10):
        at = when(rng)
        models.simple_note.Note.create_save(
            user_id=sid, title=f"{rng.choice(WORDS).title()} notes {i + 1}",
            content=f"- {rng.choice(WORDS)}\n- {rng.choice(WORDS)}",
            tags=rng.sample(NOTE_TAGS, 2), created_at=at, updated_at=at)


def _todoist(models, world: World, rng: random.Random) -> None:
    sid = user_id(models, "todoist", world.supervisor)
    for name in ("Home", "Work", "Errands", "Garden"):
        at = when(rng, 300)
        project = models.todoist.Project.create_save(user_id=sid, name=name, color="blue",
                                                     created_at=at)
        # todoist shows a project only to its collaborators, its owner included
        models.todoist.ProjectCollaboratorLink.create_save(project_id=project.id, user_id=sid,
                                                           created_at=at)
        for i in range(rng.randint(2, 4)):
            models.todoist.Task.create_save(project_id=project.id, user_id=sid,
                                            title=f"{rng.choice(WORDS)} {name.lower()} chore "
                                                  f"{i + 1}",
                                            priority=rng.choice(("high", "medium", "low")),
                                            order_index=i, created_at=when(rng, 100))


def _files(models, world: World, rng: random.Random) -> None:
    sid = user_id(models, "file_system", world.supervisor)
    home = f"/home/{world.supervisor.first_name.lower()}"
    for d in ("documents", "photos", "backups"):
        at = when(rng, 400)
        models.file_system.Directory.create_save(path=f"{home}/{d}/", user_id=sid, created_at=at,
                                                 updated_at=at)
        for i in range(rng.randint(1, 3)):
            at = when(rng)
            models.file_system.File.create_save(path=f"{home}/{d}/{rng.choice(WORDS)}_{i}.txt",
                                                user_id=sid, content=rng.choice(WORDS),
                                                created_at=at, updated_at=at)
