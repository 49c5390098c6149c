"""phone templates: text a contact an exact message, count one contact's texts to me (paging),
set an alarm from a time said the way people say it (the API wants 24-hour HH:MM)."""
from __future__ import annotations

import random
from datetime import timedelta

import people
from checks import added, no_answer_and_only
from notes import ANSWER_TESTS, evaluate_answer_only, login
from people import World
from suite import WRITE_TESTS, Instance, Template

DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")
# A cell that finds a person's phone number in the supervisor's contacts by exact name.
FIND_CONTACT = ("contact = [c for c in apis.phone.search_contacts(query={name!r}, page_limit=20, "
                "access_token=token)\n"
                "           if (c['first_name'], c['last_name']) == {pair!r}][0]")


def _find(person: people.Person) -> str:
    return FIND_CONTACT.format(name=person.name, pair=(person.first_name, person.last_name))


# -------------------------------------------------------------------- text a contact
def make_text(rng: random.Random, world: World) -> Instance:
    person = rng.choice(world.people)
    w1, w2 = rng.sample(people.WORDS, 2)
    message = rng.choice((f"Can you bring the {w1} map to the {w2} tonight?",
                          f"Running {rng.randint(5, 25)} minutes late, meet me by the {w1}.",
                          f"Booked the {w1} room for {rng.choice(DAYS).title()} at "
                          f"{rng.randint(2, 8)} pm."))
    instruction = (f"Send a text message from my phone to my {person.relation} {person.name} "
                   f"saying exactly: \"{message}\"")
    solution = (login("phone", world), _find(person) + "\n"
                "apis.phone.send_text_message(phone_number=contact['phone_number'], "
                f"message={message!r}, access_token=token)",
                "apis.supervisor.complete_task()")
    return Instance(instruction, solution,
                    {"phone_number": person.phone_number, "message": message})


def evaluate_text(test, public_data, private_data, main_user, models, ground_truth_answer):
    texts = added(models, "phone.GlobalTextMessage")
    with test("exactly one text message is sent"):
        test.case(len(texts), "==", 1)
    with test("it goes from the supervisor to the person asked for, with the exact message"):
        me = models.end.phone.User.find_one(phone_number=main_user.phone_number)
        them = models.end.phone.User.find_one(phone_number=private_data.phone_number)
        test.case(texts[0].sender_id, "==", me.id)
        test.case(texts[0].receiver_id, "==", them.id)
        test.case(texts[0].message.strip(), "==", private_data.message)
    with test("the app's two copies of it, one for each side, are all else that is added"):
        # send_text_message stores a UserTextMessage per side; any other copy is a second text.
        copies = added(models, "phone.UserTextMessage")
        test.case(sorted((c.global_text_message_id, c.user_id) for c in copies), "==",
                  sorted([(texts[0].id, me.id), (texts[0].id, them.id)]))
    no_answer_and_only(test, models, {"phone.GlobalTextMessage": {"add": True},
                                      "phone.UserTextMessage": {"add": True}})


PHONE_TEXT = Template(
    "phonetext", ("phone",), 1,
    (("exactly one text message is sent", "no_op_fail"),
     ("it goes from the supervisor to the person asked for, with the exact message", "no_op_fail"),
     ("the app's two copies of it, one for each side, are all else that is added", "no_op_fail"),
     *WRITE_TESTS),
    make_text, evaluate_text)


# -------------------------------------------------------------------- count a contact's texts
def make_count(rng: random.Random, world: World) -> Instance:
    person = rng.choice(world.people)
    # The base state may hold up to 3 texts from this person already: setup tops them up to
    # `total`, so the answer is the state's count and needs paging at the default limit (5).
    total = rng.randint(6, 15)

    def setup(models):
        me = people.user_id(models, "phone", world.supervisor)
        them = people.user_id(models, "phone", person)
        have = len(models.phone.GlobalTextMessage.find_all(sender_id=them, receiver_id=me))
        for _ in range(total - have):
            people.send_text(models, person, world.supervisor,
                             f"{rng.choice(people.WORDS)} at {rng.randint(1, 9)}?",
                             people.when(rng, 30))
        # Replies in the same conversation and texts from others: not sent by this person.
        for _ in range(rng.randint(2, 6)):
            people.send_text(models, world.supervisor, person, f"ok, {rng.choice(people.WORDS)}",
                             people.when(rng, 30))
        for other in rng.sample([p for p in world.people if p != person], 3):
            people.send_text(models, other, world.supervisor,
                             f"{person.first_name} says {rng.choice(people.WORDS)}",
                             people.when(rng, 30))

    instruction = f"How many text messages has {person.name} sent me on my phone?"
    solution = (login("phone", world), _find(person),
                "count, page = 0, 0\nwhile True:\n"
                "    texts = apis.phone.search_text_messages(phone_number=contact['phone_number'], "
                "page_index=page, page_limit=20, access_token=token)\n"
                "    if not texts:\n        break\n"
                "    count += sum(t['sender']['phone_number'] == contact['phone_number'] "
                "for t in texts)\n    page += 1",
                "apis.supervisor.complete_task(answer=count)")
    return Instance(instruction, solution, {"phone_number": person.phone_number}, answer=total,
                    setup=setup)


PHONE_COUNT = Template("phonecount", ("phone",), 2, ANSWER_TESTS, make_count,
                       evaluate_answer_only)


# -------------------------------------------------------------------- set an alarm
def make_alarm(rng: random.Random, world: World) -> Instance:
    hour, minute = rng.randint(1, 11), rng.choice((0, 5, 15, 20, 30, 40, 45, 50))
    pm = rng.random() < 0.5
    hhmm = f"{hour + 12 * pm:02d}:{minute:02d}"  # the stored form, which create_alarm requires
    said = f"{hour}:{minute:02d} {'pm' if pm else 'am'}"  # how a user says it
    label = rng.choice(("Gym", "Piano lesson", "Call mom", "Take pills", "Team standup"))
    days = sorted(rng.sample(DAYS, 2), key=DAYS.index)
    other = f"{(hour + 12 * pm + 3) % 24:02d}:{minute:02d}"  # never the asked-for time

    def setup(models):
        sid = people.user_id(models, "phone", world.supervisor)
        # An alarm with the same label at another time: the task asks for a new one beside it.
        for time, name, repeat in ((other, label, list(DAYS[:5])), ("07:00", "Wake up", None)):
            models.phone.Alarm.create_save(
                user_id=sid, time=time, label=name, repeat_days=repeat, enabled=True,
                snooze_minutes=10, vibration=True,
                created_at=people.BASE_TIME - timedelta(days=rng.randint(2, 90)))

    instruction = (f"Set a new alarm on my phone for {said} labeled \"{label}\" that repeats "
                   f"every {days[0].title()} and {days[1].title()}, with snooze turned off. "
                   "Leave my other alarms as they are.")
    solution = (login("phone", world),
                f"apis.phone.create_alarm(time={hhmm!r}, label={label!r}, repeat_days={days!r}, "
                "snooze_minutes=0, access_token=token)",
                "apis.supervisor.complete_task()")
    return Instance(instruction, solution, {"time": hhmm, "label": label, "days": days},
                    setup=setup)


def evaluate_alarm(test, public_data, private_data, main_user, models, ground_truth_answer):
    alarms = added(models, "phone.Alarm")
    with test("exactly one alarm is added"):
        test.case(len(alarms), "==", 1)
    with test("the alarm has the time, label, repeat days and snooze asked for, and is on"):
        alarm = alarms[0]
        test.case(alarm.time, "==", private_data.time)
        test.case((alarm.label or "").strip(), "==", private_data.label)
        test.case(sorted(alarm.repeat_days or []), "==", sorted(private_data.days))
        test.case(alarm.snooze_minutes, "==", 0)
        test.case(alarm.enabled, "==", True)
        owner = models.end.phone.User.find_one(phone_number=main_user.phone_number)
        test.case(alarm.user_id, "==", owner.id)
    no_answer_and_only(test, models, {"phone.Alarm": {"add": True}})


PHONE_ALARM = Template(
    "phonealarm", ("phone",), 2,
    (("exactly one alarm is added", "no_op_fail"),
     ("the alarm has the time, label, repeat days and snooze asked for, and is on", "no_op_fail"),
     *WRITE_TESTS),
    make_alarm, evaluate_alarm)

TEMPLATES = (PHONE_TEXT, PHONE_COUNT, PHONE_ALARM)
