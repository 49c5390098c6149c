"""venmo templates: pay a friend, total what one person sent me in a year (paging), request money.

The checks follow venmo's own APIs (apps/venmo/apis.py): create_transaction paid from the Venmo
balance moves the sender's venmo_balance down and the receiver's up by the amount and notifies
the receiver; create_payment_request adds a pending PaymentRequest and notifies its receiver.
"""
from __future__ import annotations

import random
from datetime import datetime, timedelta

import people
from checks import added, no_answer_and_only, updated
from notes import ANSWER_TESTS, evaluate_answer_only, login
from people import World
from suite import WRITE_TESTS, Instance, Template

PURPOSES = ("dinner at Luigi's", "concert tickets", "rent share", "groceries", "cab to the airport",
            "birthday gift", "utility bill", "book club snacks", "ski trip", "movie night")


def _note(rng: random.Random) -> str:
    # a date in the note makes two tasks' notes differ even when the purpose repeats
    return f"{rng.choice(PURPOSES)} {rng.randint(1, 12)}/{rng.randint(1, 28)}"


def _amount(rng: random.Random, low: float = 8, high: float = 150) -> float:
    return round(rng.uniform(low, high), 2)


def _to_friend(world: World, friend, call: str, amount: float, note: str):
    """The solution and private data of a money task: `call` ("api(email_parameter") gets the
    friend's email from venmo's friend search (the instruction gives only the name)."""
    name = friend.name
    solution = (login("venmo", world),
                f"friend = [f for f in apis.venmo.search_friends(query={name!r}, page_limit=20, "
                "access_token=token)\n"
                f"          if f['first_name'] + ' ' + f['last_name'] == {name!r}][0]\n"
                f"apis.venmo.{call}=friend['email'], amount={amount!r}, description={note!r}, "
                "access_token=token)",
                "apis.supervisor.complete_task()")
    return solution, {"email": friend.email, "amount": amount, "description": note}


# -------------------------------------------------------------------- pay a friend
def make_pay(rng: random.Random, world: World) -> Instance:
    friend = rng.choice(world.people[:20])  # the supervisor's venmo friends (people.py)
    amount, note = _amount(rng), _note(rng)
    # enough to pay twice: the task is the payment, and a doubled payment must show in the state
    balance = _amount(rng, 2 * amount + 50, 2 * amount + 600)

    def setup(models):
        me = models.venmo.User.find_one(email=world.supervisor.email)
        me.venmo_balance = balance
        me.save()

    instruction = (f"Send ${amount:.2f} from my venmo balance to my friend {friend.name} on venmo "
                   f"with the note \"{note}\".")
    solution, data = _to_friend(world, friend, "create_transaction(receiver_email", amount, note)
    return Instance(instruction, solution, data, setup=setup)


def evaluate_pay(test, public_data, private_data, main_user, models, ground_truth_answer):
    sent = added(models, "venmo.Transaction")
    me = models.end.venmo.User.find_one(email=main_user.email)
    friend = models.end.venmo.User.find_one(email=private_data.email)
    with test("exactly one transaction is added"):
        test.case(len(sent), "==", 1)
    with test("it pays the friend the amount asked for, with the note, from the balance"):
        test.case(sent[0].sender_id, "==", me.id)
        test.case(sent[0].receiver_id, "==", friend.id)
        test.case(round(sent[0].amount, 2), "==", private_data.amount)
        test.case(sent[0].description.strip(), "==", private_data.description)
        test.case(sent[0].payment_card_digits, "==", None)  # a card payment leaves balances
    with test("the two balances move by exactly that amount, no other balance moves"):
        start = models.start.venmo.User
        my_delta = me.venmo_balance - start.find_one(email=main_user.email).venmo_balance
        their_delta = friend.venmo_balance - start.find_one(email=private_data.email).venmo_balance
        test.case(round(my_delta, 2), "==", -private_data.amount)
        test.case(round(their_delta, 2), "==", private_data.amount)
        moved = {u.id for u in updated(models, "venmo.User")
                 if "venmo_balance" in (models.changed_field_names("venmo.User", u.id) or set())}
        test.case(sorted(moved - {me.id, friend.id}), "==", [])
    with test("only the friend is notified"):
        test.case([n.user_id for n in added(models, "venmo.Notification")], "==", [friend.id])
    no_answer_and_only(test, models, {"venmo.Transaction": {"add": True},
                                      "venmo.Notification": {"add": True},
                                      "venmo.User": {"venmo_balance"}})


VENMO_PAY = Template(
    "venmopay", ("venmo",), 1,
    (("exactly one transaction is added", "no_op_fail"),
     ("it pays the friend the amount asked for, with the note, from the balance", "no_op_fail"),
     ("the two balances move by exactly that amount, no other balance moves", "no_op_fail"),
     ("only the friend is notified", "no_op_fail"),
     *WRITE_TESTS),
    make_pay, evaluate_pay)


# -------------------------------------------------------------------- total received in 2022
YEAR = 2022  # the base state's payments all lie in the 120 days before BASE_TIME (2023)


def _in_year(rng: random.Random) -> datetime:
    # Feb..Nov only: no payment sits on a date-filter edge (max_created_at's day boundary)
    return datetime(YEAR, 2, 1, 9) + timedelta(seconds=rng.randint(0, 290 * 86400))


def make_total(rng: random.Random, world: World) -> Instance:
    sender = rng.choice(world.people)
    others = [p for p in world.people if p is not sender]
    # 6-12: more than a page (5) even with every filter show_transactions has
    amounts = [_amount(rng, 5, 120) for _ in range(rng.randint(6, 12))]
    total = round(sum(amounts), 2)
    me = world.supervisor

    def setup(models):
        def pay(a, b, amount, at):
            people.venmo_payment(models, a, b, amount, rng.choice(people.WORDS), at)

        for amount in amounts:
            pay(sender, me, amount, _in_year(rng))
        for _ in range(rng.randint(2, 4)):  # the other way: money I sent them
            pay(me, sender, _amount(rng, 5, 120), _in_year(rng))
        for _ in range(rng.randint(3, 6)):  # others paying me that year
            pay(rng.choice(others), me, _amount(rng, 5, 120), _in_year(rng))
        for _ in range(rng.randint(1, 3)):  # them paying me, but in the next year
            pay(sender, me, _amount(rng, 5, 120),
                people.BASE_TIME - timedelta(days=rng.randint(1, 60), hours=rng.randint(1, 9)))
        # the answer is fixed before the base state is seen: make sure the state agrees
        got = sum(t.amount for t in models.venmo.Transaction.find_all(
            sender_id=people.user_id(models, "venmo", sender),
            receiver_id=people.user_id(models, "venmo", me)) if t.created_at.year == YEAR)
        if round(got, 2) != total:
            raise RuntimeError(f"venmototal: state sums to {got:.2f}, answer is {total:.2f}")

    instruction = (f"How much money did {sender.name} send me on venmo in {YEAR}, in total? "
                   "Answer with the number of dollars, to the cent.")
    solution = (login("venmo", world),
                f"email = [u for u in apis.venmo.search_users(query={sender.name!r}, "
                "page_limit=20, access_token=token)\n"
                f"         if u['first_name'] + ' ' + u['last_name'] == {sender.name!r}]"
                "[0]['email']\n"
                "total, page = 0.0, 0\nwhile True:\n"
                "    batch = apis.venmo.show_transactions(user_email=email, direction='received', "
                f"min_created_at='{YEAR}-01-01', max_created_at='{YEAR}-12-31', "
                "page_index=page, page_limit=20, access_token=token)\n"
                "    if not batch:\n        break\n"
                "    total += sum(t['amount'] for t in batch if t['sender']['email'] == email)\n"
                "    page += 1",
                "apis.supervisor.complete_task(answer=round(total, 2))")
    return Instance(instruction, solution, {"email": sender.email, "year": YEAR}, answer=total,
                    setup=setup)


VENMO_TOTAL = Template("venmototal", ("venmo",), 2, ANSWER_TESTS, make_total,
                       evaluate_answer_only)


# -------------------------------------------------------------------- request money
def make_request(rng: random.Random, world: World) -> Instance:
    friend = rng.choice(world.people[:20])
    amount, note = _amount(rng), _note(rng)
    instruction = (f"Request ${amount:.2f} from my friend {friend.name} on venmo with the note "
                   f"\"{note}\".")
    solution, data = _to_friend(world, friend, "create_payment_request(user_email", amount, note)
    return Instance(instruction, solution, data)


def evaluate_request(test, public_data, private_data, main_user, models, ground_truth_answer):
    asked = added(models, "venmo.PaymentRequest")
    me = models.end.venmo.User.find_one(email=main_user.email)
    friend = models.end.venmo.User.find_one(email=private_data.email)
    with test("exactly one payment request is added"):
        test.case(len(asked), "==", 1)
    with test("it asks the friend for the amount, with the note, and is pending"):
        test.case(asked[0].sender_id, "==", me.id)  # the requester sends the request
        test.case(asked[0].receiver_id, "==", friend.id)
        test.case(round(asked[0].amount, 2), "==", private_data.amount)
        test.case(asked[0].description.strip(), "==", private_data.description)
        test.case((asked[0].approved_at, asked[0].denied_at), "==", (None, None))
    with test("only the friend is notified"):
        test.case([n.user_id for n in added(models, "venmo.Notification")], "==", [friend.id])
    no_answer_and_only(test, models, {"venmo.PaymentRequest": {"add": True},
                                      "venmo.Notification": {"add": True}})


VENMO_REQUEST = Template(
    "venmorequest", ("venmo",), 1,
    (("exactly one payment request is added", "no_op_fail"),
     ("it asks the friend for the amount, with the note, and is pending", "no_op_fail"),
     ("only the friend is notified", "no_op_fail"),
     *WRITE_TESTS),
    make_request, evaluate_request)

TEMPLATES = (VENMO_PAY, VENMO_TOTAL, VENMO_REQUEST)
