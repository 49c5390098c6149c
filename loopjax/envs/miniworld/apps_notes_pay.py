"""The notes and payments apps (with phone, the apps of the miniworld-tiny preset)."""
from __future__ import annotations

import random

from loopjax.envs.miniworld import data
from loopjax.envs.miniworld.apps_core import add_login
from loopjax.envs.miniworld.framework import App, B, I, L, N, S, find, matches, require

# ---- notes ---------------------------------------------------------------------------------
NOTES = App("notes", "Notes: titled text notes with tags.")
add_login(NOTES)
NOTE = {"note_id": "integer", "title": "string", "content": "string", "tags": "list[string]",
        "pinned": "boolean", "updated_at": "string"}


@NOTES.api("search_notes", "Search notes by words in the title or content.",
           [S("query", "Words to match.", False, ""), S("tag", "Only notes with this tag.", False),
            B("pinned", "Only pinned (true) or unpinned (false) notes.", False)],
           NOTE, paginated=True)
def search_notes(ctx, query, tag, pinned):
    return [dict(n) for n in ctx.db["notes"].values()
            if matches(query, n["title"], n["content"]) and (tag is None or tag in n["tags"])
            and pinned in (None, n["pinned"])]


@NOTES.api("show_note", "Show one note.", [I("note_id", "Note id.")], NOTE)
def show_note(ctx, note_id):
    return dict(find(ctx.db["notes"], note_id, "note"))


@NOTES.api("create_note", "Create a note.",
           [S("title", "Title.", min_length=1), S("content", "Text.", False, ""),
            L("tags", "Tags.", False, [])], {"note_id": "integer"}, method="POST")
def create_note(ctx, title, content, tags):
    nid = ctx.new_id("notes")
    ctx.db["notes"][nid] = {"note_id": nid, "title": title, "content": content,
                            "tags": list(tags or []), "pinned": False, "updated_at": ctx.now()}
    return {"note_id": nid}


@NOTES.api("update_note", "Replace a note's title and/or content.",
           [I("note_id", "Note id."), S("title", "New title.", False),
            S("content", "New text.", False)], {"message": "string"}, method="PATCH")
def update_note(ctx, note_id, title, content):
    n = find(ctx.db["notes"], note_id, "note")
    n.update({k: v for k, v in (("title", title), ("content", content)) if v is not None})
    n["updated_at"] = ctx.now()
    return {"message": "Note updated."}


@NOTES.api("append_to_note", "Append a line of text to a note.",
           [I("note_id", "Note id."), S("text", "Text to append.", min_length=1)],
           {"message": "string"}, method="PATCH")
def append_to_note(ctx, note_id, text):
    n = find(ctx.db["notes"], note_id, "note")
    n["content"] = (n["content"] + "\n" + text) if n["content"] else text
    n["updated_at"] = ctx.now()
    return {"message": "Note updated."}


@NOTES.api("set_note_pinned", "Pin or unpin a note.",
           [I("note_id", "Note id."), B("pinned", "True to pin.")], {"message": "string"},
           method="PATCH")
def set_note_pinned(ctx, note_id, pinned):
    find(ctx.db["notes"], note_id, "note")["pinned"] = pinned
    return {"message": "Note updated."}


@NOTES.api("delete_note", "Delete a note.", [I("note_id", "Note id.")], {"message": "string"},
           method="DELETE")
def delete_note(ctx, note_id):
    find(ctx.db["notes"], note_id, "note")
    del ctx.db["notes"][note_id]
    return {"message": "Note deleted."}


def notes_data(rng: random.Random) -> dict:
    notes = {}
    for i, topic in enumerate(data.TOPICS, start=1):
        words = rng.sample(data.WORDS, 3)
        notes[i] = {"note_id": i, "title": topic, "content": ", ".join(words),
                    "tags": [rng.choice(("home", "work", "ideas"))], "pinned": i % 5 == 0,
                    "updated_at": data.timestamp(i, i * 3)}
    return {"notes": notes}


# ---- payments ------------------------------------------------------------------------------
PAYMENTS = App("payments", "Payments: send money, request money, balance and transactions.")
add_login(PAYMENTS)
TRANSACTION = {"transaction_id": "integer", "sender_name": "string", "receiver_name": "string",
               "amount": "number", "description": "string", "created_at": "string"}
REQUEST = {"request_id": "integer", "requester_name": "string", "payer_name": "string",
           "amount": "number", "description": "string", "status": "string"}


def _debit(ctx, amount: float, payment_card_id) -> None:
    """Take amount from the payments balance, or from a supervisor card when one is named."""
    if payment_card_id is None:
        acct = ctx.db["account"][1]
        require(acct["balance"] >= amount, f"insufficient balance ({acct['balance']}); pass "
                "payment_card_id to pay by card")
        acct["balance"] = round(acct["balance"] - amount, 2)
    else:
        card = find(ctx.state["supervisor"]["cards"], payment_card_id, "payment card")
        require(card["balance"] >= amount, "insufficient card balance")
        card["balance"] = round(card["balance"] - amount, 2)


@PAYMENTS.api("show_balance", "Show the payments account balance.", [],
              {"balance": "number"})
def show_balance(ctx):
    return {"balance": ctx.db["account"][1]["balance"]}


@PAYMENTS.api("send_money", "Send money to a person (full name, email or phone number).",
              [S("to", "Recipient."), N("amount", "Amount in dollars.", ge=0.01, le=5000),
               S("description", "What it is for.", False, ""),
               I("payment_card_id", "Pay by this card instead of the balance.", False)],
              {"transaction_id": "integer"}, method="POST")
def send_money(ctx, to, amount, description, payment_card_id):
    p = ctx.person(to)
    require(p["name"] != ctx.user["name"], "cannot send money to yourself")
    _debit(ctx, amount, payment_card_id)
    tid = ctx.new_id("transactions")
    ctx.db["transactions"][tid] = {"transaction_id": tid, "sender_name": ctx.user["name"],
                                   "receiver_name": p["name"], "amount": amount,
                                   "description": description, "created_at": ctx.now()}
    return {"transaction_id": tid}


@PAYMENTS.api("search_transactions", "Search transactions, newest first.",
              [S("query", "Words to match in the description or names.", False, ""),
               S("direction", "sent or received.", False, choices=("sent", "received"))],
              TRANSACTION, paginated=True)
def search_transactions(ctx, query, direction):
    me = ctx.user["name"]
    rows = [dict(t) for t in ctx.db["transactions"].values()
            if matches(query, t["description"], t["sender_name"], t["receiver_name"])
            and direction in (None, "sent" if t["sender_name"] == me else "received")]
    return sorted(rows, key=lambda t: t["created_at"], reverse=True)


@PAYMENTS.api("show_transaction", "Show one transaction.", [I("transaction_id", "Id.")],
              TRANSACTION)
def show_transaction(ctx, transaction_id):
    return dict(find(ctx.db["transactions"], transaction_id, "transaction"))


@PAYMENTS.api("request_money", "Ask a person to pay you.",
              [S("payer", "Who should pay (full name, email or phone number)."),
               N("amount", "Amount in dollars.", ge=0.01, le=5000),
               S("description", "What it is for.", False, "")],
              {"request_id": "integer"}, method="POST")
def request_money(ctx, payer, amount, description):
    p = ctx.person(payer)
    rid = ctx.new_id("requests")
    ctx.db["requests"][rid] = {"request_id": rid, "requester_name": ctx.user["name"],
                               "payer_name": p["name"], "amount": amount,
                               "description": description, "status": "pending"}
    return {"request_id": rid}


@PAYMENTS.api("search_payment_requests", "Search payment requests.",
              [S("status", "pending, approved or declined.", False,
                 choices=("pending", "approved", "declined")),
               S("direction", "incoming (you pay) or outgoing (you asked).", False,
                 choices=("incoming", "outgoing"))], REQUEST, paginated=True)
def search_payment_requests(ctx, status, direction):
    me = ctx.user["name"]
    return [dict(r) for r in ctx.db["requests"].values() if status in (None, r["status"])
            and direction in (None, "incoming" if r["payer_name"] == me else "outgoing")]


@PAYMENTS.api("approve_payment_request", "Pay an incoming payment request.",
              [I("request_id", "Request id."),
               I("payment_card_id", "Pay by this card instead of the balance.", False)],
              {"transaction_id": "integer"}, method="POST")
def approve_payment_request(ctx, request_id, payment_card_id):
    r = find(ctx.db["requests"], request_id, "payment request")
    require(r["payer_name"] == ctx.user["name"] and r["status"] == "pending",
            "only pending incoming requests can be approved")
    r["status"] = "approved"
    return send_money(ctx, r["requester_name"], r["amount"], r["description"], payment_card_id)


@PAYMENTS.api("decline_payment_request", "Decline an incoming payment request.",
              [I("request_id", "Request id.")], {"message": "string"}, method="POST")
def decline_payment_request(ctx, request_id):
    r = find(ctx.db["requests"], request_id, "payment request")
    require(r["payer_name"] == ctx.user["name"] and r["status"] == "pending",
            "only pending incoming requests can be declined")
    r["status"] = "declined"
    return {"message": "Request declined."}


@PAYMENTS.api("add_money_to_balance", "Move money from a payment card to the balance.",
              [N("amount", "Amount.", ge=1, le=5000), I("payment_card_id", "Card id.")],
              {"balance": "number"}, method="POST")
def add_money_to_balance(ctx, amount, payment_card_id):
    _debit(ctx, amount, payment_card_id)
    acct = ctx.db["account"][1]
    acct["balance"] = round(acct["balance"] + amount, 2)
    return {"balance": acct["balance"]}


def payments_data(rng: random.Random, people: list[dict], n_contacts: int) -> dict:
    sup = people[0]["name"]
    transactions, requests = {}, {}
    for i, p in enumerate(people[1:n_contacts + 1], start=1):
        out = i % 2 == 0
        transactions[i] = {"transaction_id": i, "sender_name": sup if out else p["name"],
                           "receiver_name": p["name"] if out else sup,
                           "amount": rng.randrange(5, 120), "description": rng.choice(data.WORDS),
                           "created_at": data.timestamp(i, i * 5)}
        if i % 3 == 0:
            rid = len(requests) + 1
            requests[rid] = {"request_id": rid, "requester_name": p["name"], "payer_name": sup,
                             "amount": rng.randrange(5, 80), "description": rng.choice(data.WORDS),
                             "status": "pending"}
    return {"account": {1: {"balance": 500}}, "transactions": transactions,
            "requests": requests}
