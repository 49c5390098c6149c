"""The system apps (supervisor, api_docs) and the phone app."""
from __future__ import annotations

import random

from loopjax.envs.miniworld import data
from loopjax.envs.miniworld.framework import App, B, I, Param, S, find, matches, require

# ---- supervisor ---------------------------------------------------------------------------
SUPERVISOR = App("supervisor", "The supervisor (the user you work for): profile, account "
                 "passwords, payment cards, addresses, and task completion.", needs_login=False)
PROFILE = {"first_name": "string", "last_name": "string", "name": "string", "email": "string",
           "phone_number": "string", "birthday": "string", "date": "string"}


@SUPERVISOR.api("show_profile", "Show the supervisor's profile.", returns=PROFILE)
def show_profile(ctx):
    return dict(ctx.user)


@SUPERVISOR.api("show_account_passwords", "Show the supervisor's app account passwords.",
                returns=[{"account_name": "string", "password": "string"}])
def show_account_passwords(ctx):
    return [dict(r) for r in ctx.db["passwords"].values()]


@SUPERVISOR.api("show_payment_cards", "Show the supervisor's payment cards.",
                returns=[{"payment_card_id": "integer", "card_name": "string",
                          "owner_name": "string", "card_number": "string",
                          "expiry_date": "string", "balance": "number"}])
def show_payment_cards(ctx):
    return [dict(r) for r in ctx.db["cards"].values()]


@SUPERVISOR.api("show_addresses", "Show the supervisor's saved addresses.",
                returns=[{"address_id": "integer", "name": "string", "street": "string",
                          "city": "string", "zip_code": "string"}])
def show_addresses(ctx):
    return [dict(r) for r in ctx.db["addresses"].values()]


@SUPERVISOR.api("complete_task", "Mark the task as complete. Pass the answer if the task asks "
                "a question; leave it out otherwise.",
                [Param("answer", "any", "The answer to the task's question (string, number or "
                       "list), if any.", False)],
                {"message": "string"}, method="POST")
def complete_task(ctx, answer=None):
    ctx.world.answer = answer
    return {"message": "Task marked as complete."}


# ---- api_docs ------------------------------------------------------------------------------
API_DOCS = App("api_docs", "Documentation of every app and API in this world.",
               needs_login=False)


@API_DOCS.api("show_app_descriptions", "List the apps with a short description of each.",
              returns=[{"name": "string", "description": "string"}])
def show_app_descriptions(ctx):
    return [{"name": a.name, "description": a.description} for a in ctx.world.apps.values()]


@API_DOCS.api("show_api_descriptions", "List the APIs of an app with a short description.",
              [S("app_name", "Name of the app.")],
              [{"name": "string", "description": "string"}])
def show_api_descriptions(ctx, app_name):
    app = find(ctx.world.apps, app_name, "app")
    return [{"name": a.name, "description": a.description} for a in app.apis.values()]


@API_DOCS.api("show_api_doc", "Show the full documentation of one API: parameters, types, "
              "defaults, constraints and response schemas.",
              [S("app_name", "Name of the app."), S("api_name", "Name of the API.")],
              {"app_name": "string", "api_name": "string", "path": "string",
               "method": "string", "description": "string", "parameters": "list",
               "response_schemas": "object"})
def show_api_doc(ctx, app_name, api_name):
    app = find(ctx.world.apps, app_name, "app")
    return find(app.apis, api_name, f"api of {app_name}").doc(ctx.world.auth)


def add_login(app: App) -> None:
    """Register the standard `login(username, password) -> access_token` API on app."""
    @app.api("login", f"Log in to {app.name} with the supervisor's email and the {app.name} "
             "password; returns an access token for the other APIs.",
             [S("username", "The supervisor's email."), S("password", "The account password.")],
             {"access_token": "string", "token_type": "string"}, method="POST",
             needs_token=False)
    def login(ctx, username, password):
        return ctx.world.login(app.name, username, password)


# ---- phone ---------------------------------------------------------------------------------
PHONE = App("phone", "Phone: contacts, text messages and alarms.")
add_login(PHONE)
CONTACT = {"contact_id": "integer", "first_name": "string", "last_name": "string",
           "name": "string", "phone_number": "string", "email": "string",
           "relationship": "string"}
MESSAGE = {"message_id": "integer", "sender_name": "string", "sender_number": "string",
           "receiver_name": "string", "receiver_number": "string", "message": "string",
           "sent_at": "string"}


@PHONE.api("search_contacts", "Search the supervisor's contacts by name, number or email.",
           [S("query", "Words to match.", False, ""),
            S("relationship", "Only contacts with this relationship.", False,
              choices=data.RELATIONS)], CONTACT, paginated=True)
def search_contacts(ctx, query, relationship):
    return [dict(c) for c in ctx.db["contacts"].values()
            if matches(query, c["name"], c["phone_number"], c["email"])
            and relationship in (None, c["relationship"])]


@PHONE.api("show_contact", "Show one contact.", [I("contact_id", "Contact id.")], CONTACT)
def show_contact(ctx, contact_id):
    return dict(find(ctx.db["contacts"], contact_id, "contact"))


@PHONE.api("add_contact", "Add a contact.",
           [S("first_name", "First name.", min_length=1),
            S("last_name", "Last name.", min_length=1),
            S("phone_number", "Phone number like 555-1234.", min_length=8),
            S("email", "Email address.", False, ""),
            S("relationship", "Relationship.", False, "friend", choices=data.RELATIONS)],
           {"contact_id": "integer"}, method="POST")
def add_contact(ctx, first_name, last_name, phone_number, email, relationship):
    name = f"{first_name} {last_name}"
    require(all(c["name"] != name for c in ctx.db["contacts"].values()),
            f"a contact named {name!r} already exists")
    cid = ctx.new_id("contacts")
    ctx.db["contacts"][cid] = {"contact_id": cid, "first_name": first_name,
                               "last_name": last_name, "name": name,
                               "phone_number": phone_number, "email": email,
                               "relationship": relationship}
    return {"contact_id": cid}


@PHONE.api("update_contact", "Update a contact's number, email or relationship.",
           [I("contact_id", "Contact id."), S("phone_number", "New number.", False),
            S("email", "New email.", False),
            S("relationship", "New relationship.", False, choices=data.RELATIONS)],
           {"message": "string"}, method="PATCH")
def update_contact(ctx, contact_id, phone_number, email, relationship):
    c = find(ctx.db["contacts"], contact_id, "contact")
    new = {"phone_number": phone_number, "email": email, "relationship": relationship}
    c.update({k: v for k, v in new.items() if v is not None})
    return {"message": "Contact updated."}


@PHONE.api("delete_contact", "Delete a contact.", [I("contact_id", "Contact id.")],
           {"message": "string"}, method="DELETE")
def delete_contact(ctx, contact_id):
    find(ctx.db["contacts"], contact_id, "contact")
    del ctx.db["contacts"][contact_id]
    return {"message": "Contact deleted."}


@PHONE.api("send_text_message", "Send a text message.",
           [S("to", "Recipient: a contact's full name or a phone number."),
            S("message", "The text.", min_length=1)],
           {"message_id": "integer"}, method="POST")
def send_text_message(ctx, to, message):
    p = ctx.person(to)
    mid = ctx.new_id("messages")
    ctx.db["messages"][mid] = {
        "message_id": mid, "sender_name": ctx.user["name"],
        "sender_number": ctx.user["phone_number"], "receiver_name": p["name"],
        "receiver_number": p["phone_number"], "message": message, "sent_at": ctx.now()}
    return {"message_id": mid}


@PHONE.api("search_text_messages", "Search text messages, newest first.",
           [S("query", "Words to match in the text.", False, ""),
            S("contact", "Only messages to or from this name or number.", False)],
           MESSAGE, paginated=True)
def search_text_messages(ctx, query, contact):
    who = ctx.person(contact) if contact else None
    rows = [dict(m) for m in ctx.db["messages"].values() if matches(query, m["message"])
            and (who is None or who["name"] in (m["sender_name"], m["receiver_name"]))]
    return sorted(rows, key=lambda m: m["sent_at"], reverse=True)


@PHONE.api("show_text_message", "Show one text message.", [I("message_id", "Message id.")],
           MESSAGE)
def show_text_message(ctx, message_id):
    return dict(find(ctx.db["messages"], message_id, "message"))


@PHONE.api("delete_text_message", "Delete a text message.", [I("message_id", "Message id.")],
           {"message": "string"}, method="DELETE")
def delete_text_message(ctx, message_id):
    find(ctx.db["messages"], message_id, "message")
    del ctx.db["messages"][message_id]
    return {"message": "Message deleted."}


@PHONE.api("show_alarms", "List alarms.", [], {"alarm_id": "integer", "time": "string",
           "label": "string", "enabled": "boolean"}, paginated=True)
def show_alarms(ctx):
    return [dict(a) for a in ctx.db["alarms"].values()]


@PHONE.api("create_alarm", "Create an alarm.",
           [S("time", "Time as HH:MM.", min_length=5), S("label", "Label.", False, "")],
           {"alarm_id": "integer"}, method="POST")
def create_alarm(ctx, time, label):
    require(len(time) == 5 and time[2] == ":" and time.replace(":", "").isdigit(),
            "time must look like HH:MM")
    aid = ctx.new_id("alarms")
    ctx.db["alarms"][aid] = {"alarm_id": aid, "time": time, "label": label, "enabled": True}
    return {"alarm_id": aid}


@PHONE.api("update_alarm", "Enable or disable an alarm.",
           [I("alarm_id", "Alarm id."), B("enabled", "On or off.")],
           {"message": "string"}, method="PATCH")
def update_alarm(ctx, alarm_id, enabled):
    find(ctx.db["alarms"], alarm_id, "alarm")["enabled"] = enabled
    return {"message": "Alarm updated."}


@PHONE.api("delete_alarm", "Delete an alarm.", [I("alarm_id", "Alarm id.")],
           {"message": "string"}, method="DELETE")
def delete_alarm(ctx, alarm_id):
    find(ctx.db["alarms"], alarm_id, "alarm")
    del ctx.db["alarms"][alarm_id]
    return {"message": "Alarm deleted."}


def phone_data(rng: random.Random, people: list[dict], n_contacts: int) -> dict:
    """Contacts = people[1..n_contacts]; a few messages from each; two alarms."""
    sup = people[0]
    contacts, messages = {}, {}
    for i, p in enumerate(people[1:n_contacts + 1], start=1):
        contacts[i] = {"contact_id": i, "first_name": p["first_name"], "last_name": p["last_name"],
                       "name": p["name"], "phone_number": p["phone_number"], "email": p["email"],
                       "relationship": data.RELATIONS[rng.randrange(len(data.RELATIONS))]}
        for k in range(2):
            mid = len(messages) + 1
            incoming = k == 0
            a, b = (p, sup) if incoming else (sup, p)
            messages[mid] = {"message_id": mid, "sender_name": a["name"],
                             "sender_number": a["phone_number"], "receiver_name": b["name"],
                             "receiver_number": b["phone_number"],
                             "message": rng.choice(data.PHRASES),
                             "sent_at": data.timestamp(rng.randrange(10), i * 7 + k)}
    alarms = {1: {"alarm_id": 1, "time": "06:30", "label": "Wake up", "enabled": True},
              2: {"alarm_id": 2, "time": "22:00", "label": "Sleep", "enabled": False}}
    return {"contacts": contacts, "messages": messages, "alarms": alarms}
