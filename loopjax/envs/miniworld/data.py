"""Seeded, deterministic generator of miniworld's people and base app data.

`base_state(config)` builds the whole world state from `random.Random(config.seed)`; the same
config always gives the same state, byte for byte (see `canonical_json`). The state layout is
`state[app][table][record_id] = record` (plain dicts, lists, str, int, float, bool), so a diff of
two states is a diff of three-level dicts (see evaluator.py).
"""
from __future__ import annotations

import json
import random

FIRST = ("Alice Bruno Chloe Diego Elena Farid Grace Hiro Irene Jonas Kira Liam Maya Nadia Omar "
         "Priya Quinn Rosa Samir Tara Umar Vera Wade Xenia Yusuf Zoe Aaron Bianca Carlos Dana "
         "Emil Fiona Gavin Hana Ivan Julia Kofi Lena Marco Nina Oscar Paula Rahul Sofia Tomas "
         "Uma Victor Wendy").split()
LAST = ("Smith Garcia Chen Novak Okafor Silva Tanaka Moreau Rossi Kowalski Haddad Jensen Patel "
        "Ibrahim Larsen Costa Weber Nakamura Dubois Fischer Romero Ahmed Berg Quinn").split()
RELATIONS = ("friend", "coworker", "family", "neighbor")
WORDS = ("groceries rent dinner tickets concert pizza taxi books gift lunch coffee movie gym "
         "brunch fuel museum paint garden snacks").split()
PHRASES = ("running late", "see you at noon", "call me back", "dinner is at seven",
           "happy birthday", "thanks for the help", "meeting moved to friday", "on my way",
           "the keys are under the mat", "bring the charger", "good luck today",
           "lunch tomorrow", "the package arrived", "check your email", "movie starts at nine")
TOPICS = ("Groceries", "Trip plan", "Book list", "Gift ideas", "Recipes", "Budget", "Workout",
          "Garden", "Reading", "Chores", "Packing", "Projects", "Movies", "Passwords hint")
TODAY = "2024-05-15"


def person(i: int, first: str, last: str) -> dict:
    """A world person: unique name, email and phone number derived from the index."""
    return {"first_name": first, "last_name": last, "name": f"{first} {last}",
            "email": f"{first.lower()}.{last.lower()}@mail.com",
            "phone_number": f"555-{1000 + 37 * i:04d}"}


def people(rng: random.Random, n: int) -> list[dict]:
    """n people with distinct full names; people[0] is the supervisor."""
    pairs = [(f, last) for f in FIRST for last in LAST]
    rng.shuffle(pairs)
    return [person(i, f, last) for i, (f, last) in enumerate(pairs[:n])]


def timestamp(day_offset: int, minute: int) -> str:
    """A deterministic time before TODAY: day_offset days back, at minute past 08:00."""
    day = 14 - (day_offset % 14)
    return f"2024-05-{day:02d}T{8 + minute // 60:02d}:{minute % 60:02d}:00"


def canonical_json(obj) -> str:
    """The byte-stable serialization used by the determinism tests and state hashing."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def supervisor_tables(rng: random.Random, sup: dict, apps: tuple[str, ...]) -> dict:
    """Profile, one password per user app, payment cards and addresses."""
    profile = dict(sup, birthday="1990-03-21", date=TODAY)
    passwords = {i + 1: {"account_name": app, "password": f"{app[:3]}-{rng.randrange(10**6):06d}"}
                 for i, app in enumerate(apps)}
    cards = {i + 1: {"payment_card_id": i + 1, "card_name": name, "owner_name": sup["name"],
                     "card_number": f"4{rng.randrange(10**15):015d}", "expiry_date": exp,
                     "balance": bal}
             for i, (name, exp, bal) in enumerate((("Visa Everyday", "2027-08", 850),
                                                    ("Master Travel", "2026-02", 1200)))}
    addresses = {1: {"address_id": 1, "name": "Home", "street": "12 Elm Street",
                     "city": "Springfield", "zip_code": "40101"},
                 2: {"address_id": 2, "name": "Work", "street": "400 Market Ave",
                     "city": "Springfield", "zip_code": "40117"}}
    return {"profile": {1: profile}, "passwords": passwords, "cards": cards,
            "addresses": addresses}
