"""The basic scenario templates (phone, notes, payments): miniworld-tiny's, and the full preset's.

Each one-sentence instruction names the values the code must copy, quoted as the code quotes
them (so a small model sees the same tokens in both places); solutions are a docs lookup, then
1-2 turns of at most four short lines. miniworld-tiny keeps the templates whose success hinges on
behaviour (read the docs, walk every page) rather than on copying several values into code,
which a from-scratch model learns too slowly for a CPU demo (TINY_SCENARIOS); the full preset
has them all (BASIC_SCENARIOS). The two challenge templates combine phone and payments, a pairing
no train template uses.
"""
from __future__ import annotations

from loopjax.envs.miniworld import data
from loopjax.envs.miniworld.evaluator import Allow
from loopjax.envs.miniworld.framework import matches
from loopjax.envs.miniworld.scenario import (
    PAGED,
    Gen,
    Scenario,
    TaskSpec,
    added_where,
    deleted_id,
    only,
    q,
)

DONE = "apis.supervisor.complete_task()"


def text_contact(g: Gen) -> TaskSpec:
    p, msg = g.contact(), g.phrase()
    return TaskSpec(
        f'Send a text message to "{p["name"]}" saying "{msg}".',
        [f"apis.phone.send_text_message(@phone to={q(p['name'])}, message={q(msg)})\n{DONE}"],
        [added_where("phone", "messages", f"a text to {p['name']} was sent",
                     receiver_name=p["name"]),
         added_where("phone", "messages", "the text has the requested words",
                     receiver_name=p["name"], message=msg)],
        [only("phone", "messages", receiver_name=p["name"])])


def contact_phone(g: Gen) -> TaskSpec:
    p = g.contact()
    # The contact's number differs from task to task (it "changed"): the answer is in the state,
    # never in what a policy could remember from another task.
    number = f"555-{g.rng.randrange(1000, 10000)}"
    for c in g.state["phone"]["contacts"].values():
        if c["name"] == p["name"]:
            c["phone_number"] = number
    return TaskSpec(
        f'What is the phone number of "{p["name"]}"?',
        [f"c = apis.phone.search_contacts(@phone query={q(p['name'])})[0]\n"
         'apis.supervisor.complete_task(answer=c["phone_number"])'],
        [], [], answer=number)


def last_text(g: Gen) -> TaskSpec:
    p, text = g.contact(), g.phrase()
    g.text_from(p, text)
    return TaskSpec(
        f'What did "{p["name"]}" say in their last text message?',
        [f"m = apis.phone.search_text_messages(@phone contact={q(p['name'])})[0]\n"
         'apis.supervisor.complete_task(answer=m["message"])'],
        [], [], answer=text)


def contact_email(g: Gen) -> TaskSpec:
    p = g.contact()
    return TaskSpec(
        f'What is the email address of "{p["name"]}"?',
        [f"c = apis.phone.search_contacts(@phone query={q(p['name'])})[0]\n"
         'apis.supervisor.complete_task(answer=c["email"])'],
        [], [], answer=p["email"])


def add_contact(g: Gen) -> TaskSpec:
    p = g.stranger()
    return TaskSpec(
        f'Add "{p["name"]}" to my contacts with phone number "{p["phone_number"]}".',
        [f"apis.phone.add_contact(@phone first_name={q(p['first_name'])}, "
         f"last_name={q(p['last_name'])}, phone_number={q(p['phone_number'])})\n{DONE}"],
        [added_where("phone", "contacts", f"{p['name']} is a contact", name=p["name"]),
         added_where("phone", "contacts", "with the right number", name=p["name"],
                     phone_number=p["phone_number"])],
        [only("phone", "contacts", name=p["name"])])


def create_note(g: Gen) -> TaskSpec:
    title = g.unique_title(lambda: f"{g.word().title()} {g.word()}")
    text = g.phrase()
    return TaskSpec(
        f'Create a note titled "{title}" with the text "{text}".',
        [f"apis.notes.create_note(@notes title={q(title)}, content={q(text)})\n{DONE}"],
        [added_where("notes", "notes", f"a note titled {title!r} exists", title=title),
         added_where("notes", "notes", "with the requested text", title=title, content=text)],
        [only("notes", "notes", title=title)])


def _setup_note(g: Gen, content: str, title: str = "") -> tuple[str, int]:
    """Add a note (titled like "Pizza Nadia" unless given a title) to the initial state."""
    title = title or g.unique_title(lambda: f"{g.word().title()} {g.contact()['first_name']}")
    return title, g.note(title, content)


def _find_note(title: str, var: str = "n") -> str:
    return f"{var} = apis.notes.search_notes(@notes query={q(title)})[0]"


def delete_note(g: Gen) -> TaskSpec:
    title, nid = _setup_note(g, g.phrase())
    return TaskSpec(
        f'Delete my note titled "{title}".',
        [f'{_find_note(title)}\napis.notes.delete_note(@notes note_id=n["note_id"])\n{DONE}'],
        [deleted_id("notes", "notes", nid, f"the note {title!r} is deleted")],
        [only("notes", "notes", ("delete",), note_id=nid)])


def note_question(g: Gen) -> TaskSpec:
    text = g.phrase()
    title, _ = _setup_note(g, text)
    return TaskSpec(
        f'What does my note titled "{title}" say?',
        [f'{_find_note(title)}\napis.supervisor.complete_task(answer=n["content"])'],
        [], [], answer=text)


def _paid_checks(name: str, amt: int) -> list:
    """A transaction to `name` was added, and it has the amount."""
    return [added_where("payments", "transactions", f"{name} was paid", receiver_name=name),
            added_where("payments", "transactions", f"the amount is {amt}", receiver_name=name,
                        amount=amt)]


def _payment_allow(name: str) -> list[Allow]:
    return [only("payments", "transactions", receiver_name=name),
            Allow("payments", "account", ("update",))]


def pay_contact(g: Gen) -> TaskSpec:
    p, amt, what = g.contact(), g.amount(), g.word()
    return TaskSpec(
        f'Send ${amt} to "{p["name"]}" for "{what}".',
        [f"apis.payments.send_money(@payments to={q(p['name'])}, amount={amt}, "
         f"description={q(what)})\n{DONE}"],
        _paid_checks(p["name"], amt) + [
         added_where("payments", "transactions", f"the description is {what!r}",
                     receiver_name=p["name"], description=what)],
        _payment_allow(p["name"]))


def request_money(g: Gen) -> TaskSpec:
    p, amt, what = g.contact(), g.amount(), g.word()
    return TaskSpec(
        f'Request ${amt} from "{p["name"]}" for "{what}".',
        [f"apis.payments.request_money(@payments payer={q(p['name'])}, amount={amt}, "
         f"description={q(what)})\n{DONE}"],
        [added_where("payments", "requests", f"{p['name']} was asked", payer_name=p["name"]),
         added_where("payments", "requests", f"the amount is {amt}", payer_name=p["name"],
                     amount=amt),
         added_where("payments", "requests", f"the description is {what!r}",
                     payer_name=p["name"], description=what)],
        [only("payments", "requests", payer_name=p["name"])])


def _set_balance(g: Gen) -> int:
    balance = g.amount(100, 900)
    g.state["payments"]["account"][1]["balance"] = balance
    return balance


def balance_question(g: Gen) -> TaskSpec:
    balance = _set_balance(g)
    return TaskSpec(
        "What is my payments balance?",
        ['b = apis.payments.show_balance(@payments)\n'
         'apis.supervisor.complete_task(answer=b["balance"])'],
        [], [], answer=balance)


def pay_note_amount(g: Gen) -> TaskSpec:
    p, amt, what = g.contact(), g.amount(), g.word()
    title, _ = _setup_note(g, f"{amt} dollars for {what}", f"Owe {p['first_name']}")
    return TaskSpec(
        f'Pay "{p["name"]}" the amount in my note titled "{title}".',
        [f"print(apis.notes.search_notes(@notes query={q(title)}))",
         f"apis.payments.send_money(@payments to={q(p['name'])}, amount={amt})\n{DONE}"],
        _paid_checks(p["name"], amt),
        _payment_allow(p["name"]))


def text_note_content(g: Gen) -> TaskSpec:
    p, text = g.contact(), g.phrase()
    title, _ = _setup_note(g, text)
    return TaskSpec(
        f'Text "{p["name"]}" the content of my note titled "{title}".',
        [f"{_find_note(title)}\n"
         f'apis.phone.send_text_message(@phone to={q(p["name"])}, message=n["content"])\n{DONE}'],
        [added_where("phone", "messages", f"a text to {p['name']} was sent",
                     receiver_name=p["name"]),
         added_where("phone", "messages", "it has the note's text", receiver_name=p["name"],
                     message=text)],
        [only("phone", "messages", receiver_name=p["name"])])


def text_balance(g: Gen) -> TaskSpec:
    p, balance = g.contact(), _set_balance(g)
    return TaskSpec(
        f'Text "{p["name"]}" my payments balance.',
        ["b = apis.payments.show_balance(@payments)\n"
         f'apis.phone.send_text_message(@phone to={q(p["name"])}, message=str(b["balance"]))\n'
         f"{DONE}"],
        [added_where("phone", "messages", f"a text to {p['name']} was sent",
                     receiver_name=p["name"]),
         # the whole text is the balance (a number: "512", "$512.00" and "512" are one)
         added_where("phone", "messages", "it says the balance", receiver_name=p["name"],
                     message=balance)],
        [only("phone", "messages", receiver_name=p["name"])])


def pay_text_amount(g: Gen) -> TaskSpec:
    p, amt, what = g.contact(), g.amount(), g.word()
    g.text_from(p, f"hey, you owe me {amt} dollars for the {what}")
    return TaskSpec(
        f'Send "{p["name"]}" the amount they asked for in their last text message.',
        [f"print(apis.phone.search_text_messages(@phone contact={q(p['name'])}, page_limit=1))",
         f"apis.payments.send_money(@payments to={q(p['name'])}, amount={amt})\n{DONE}"],
        _paid_checks(p["name"], amt),
        _payment_allow(p["name"]))


def _many(g: Gen) -> int:
    """How many records a counting task adds: 1-12, so the answer is past the first page (5
    results) in 7 of 12 tasks and only walking every page is always right."""
    return g.rng.randint(1, 12)


def count_texts(g: Gen) -> TaskSpec:
    p = g.contact()
    for _ in range(_many(g)):
        g.text_from(p, g.phrase())
    n = sum(p["name"] in (m["sender_name"], m["receiver_name"])
            for m in g.state["phone"]["messages"].values())
    return TaskSpec(
        f'How many text messages have I exchanged with "{p["name"]}"?',
        [f"{PAGED}ms = apis.phone.search_text_messages(@phone contact={q(p['name'])})\n"
         "apis.supervisor.complete_task(answer=len(ms))"],
        [], [], answer=n)


def count_notes(g: Gen) -> TaskSpec:
    word = g.word()
    for _ in range(_many(g)):
        g.note(g.unique_title(lambda: f"{g.pick(data.TOPICS)} {g.rng.randrange(100)}"),
               f"{g.phrase()}, {word}")
    n = sum(matches(word, r["title"], r["content"]) for r in g.state["notes"]["notes"].values())
    return TaskSpec(
        f'How many of my notes mention "{word}"?',
        [f"{PAGED}ns = apis.notes.search_notes(@notes query={q(word)})\n"
         "apis.supervisor.complete_task(answer=len(ns))"],
        [], [], answer=n)


def total_received(g: Gen) -> TaskSpec:
    p, db = g.contact(), g.state["payments"]["transactions"]
    for _ in range(_many(g)):
        g.add("payments", "transactions", "transaction_id", sender_name=p["name"],
              receiver_name=g.sup["name"], amount=g.amount(), description=g.word(),
              created_at="2024-05-14T12:00:00")
    total = sum(t["amount"] for t in db.values() if t["receiver_name"] == g.sup["name"]
                and matches(p["name"], t["description"], t["sender_name"], t["receiver_name"]))
    return TaskSpec(
        f'How much money has "{p["name"]}" sent me in total?',
        [f"{PAGED}ts = apis.payments.search_transactions(@payments query={q(p['name'])}, "
         'direction="received")\n'
         'apis.supervisor.complete_task(answer=sum(t["amount"] for t in ts))'],
        [], [], answer=total)


TINY_SCENARIOS = (
    Scenario("balance_question", ("payments",), 1, balance_question),
    Scenario("contact_phone", ("phone",), 1, contact_phone),
    Scenario("last_text", ("phone",), 1, last_text),
    Scenario("count_texts", ("phone",), 2, count_texts),
    Scenario("count_notes", ("notes",), 2, count_notes),
    Scenario("total_received", ("payments",), 2, total_received),
    Scenario("text_balance", ("payments", "phone"), 2, text_balance, challenge=True),
    Scenario("pay_text_amount", ("payments", "phone"), 3, pay_text_amount, challenge=True),
)
BASIC_SCENARIOS = TINY_SCENARIOS + (
    Scenario("contact_email", ("phone",), 1, contact_email),
    Scenario("note_question", ("notes",), 1, note_question),
    Scenario("pay_contact", ("payments",), 1, pay_contact),
    Scenario("text_contact", ("phone",), 1, text_contact),
    Scenario("add_contact", ("phone",), 1, add_contact),
    Scenario("create_note", ("notes",), 1, create_note),
    Scenario("delete_note", ("notes",), 1, delete_note),
    Scenario("request_money", ("payments",), 1, request_money),
    Scenario("pay_note_amount", ("notes", "payments"), 2, pay_note_amount),
    Scenario("text_note_content", ("notes", "phone"), 2, text_note_content),
)
