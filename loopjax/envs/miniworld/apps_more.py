"""The full preset's email, calendar and file_system apps; REGISTRY lists every extra app."""
from __future__ import annotations

import random

from loopjax.envs.miniworld import data
from loopjax.envs.miniworld.apps_core import add_login
from loopjax.envs.miniworld.framework import ApiError, App, I, L, S, find, matches, require

# ---- email ---------------------------------------------------------------------------------
EMAIL = App("email", "Email: inbox, sent mail, archive; send, reply, forward.")
add_login(EMAIL)
MAIL = {"email_id": "integer", "sender": "string", "recipients": "list[string]",
        "subject": "string", "body": "string", "folder": "string", "read": "boolean",
        "sent_at": "string"}
FOLDERS = ("inbox", "sent", "archive")


@EMAIL.api("search_emails", "Search emails, newest first.",
           [S("query", "Words to match in subject or body.", False, ""),
            S("folder", "inbox, sent or archive.", False, choices=FOLDERS),
            S("sender", "Only emails from this person (email or full name).", False)],
           MAIL, paginated=True)
def search_emails(ctx, query, folder, sender):
    sender = sender and ctx.person(sender)["email"]
    rows = [dict(m) for m in ctx.db["emails"].values()
            if matches(query, m["subject"], m["body"]) and folder in (None, m["folder"])
            and sender in (None, m["sender"])]
    return sorted(rows, key=lambda m: m["sent_at"], reverse=True)


@EMAIL.api("show_email", "Show one email.", [I("email_id", "Email id.")], MAIL)
def show_email(ctx, email_id):
    return dict(find(ctx.db["emails"], email_id, "email"))


def _deliver(ctx, recipients, subject, body) -> int:
    require(len(recipients) > 0, "recipients must not be empty")
    recipients = [ctx.person(r)["email"] for r in recipients]
    eid = ctx.new_id("emails")
    ctx.db["emails"][eid] = {"email_id": eid, "sender": ctx.user["email"],
                             "recipients": list(recipients), "subject": subject, "body": body,
                             "folder": "sent", "read": True, "sent_at": ctx.now()}
    return eid


@EMAIL.api("send_email", "Send an email.",
           [L("recipients", "Email addresses or full names."),
            S("subject", "Subject.", min_length=1),
            S("body", "Body text.", False, "")], {"email_id": "integer"}, method="POST")
def send_email(ctx, recipients, subject, body):
    return {"email_id": _deliver(ctx, recipients, subject, body)}


@EMAIL.api("reply_to_email", "Reply to the sender of an email.",
           [I("email_id", "Email to reply to."), S("body", "Reply text.", min_length=1)],
           {"email_id": "integer"}, method="POST")
def reply_to_email(ctx, email_id, body):
    m = find(ctx.db["emails"], email_id, "email")
    return {"email_id": _deliver(ctx, [m["sender"]], "Re: " + m["subject"], body)}


@EMAIL.api("forward_email", "Forward an email.",
           [I("email_id", "Email to forward."), L("recipients", "Emails or full names.")],
           {"email_id": "integer"}, method="POST")
def forward_email(ctx, email_id, recipients):
    m = find(ctx.db["emails"], email_id, "email")
    return {"email_id": _deliver(ctx, recipients, "Fwd: " + m["subject"], m["body"])}


@EMAIL.api("mark_email", "Mark an email read or unread.",
           [I("email_id", "Email id."), S("status", "read or unread.", choices=("read", "unread"))],
           {"message": "string"}, method="PATCH")
def mark_email(ctx, email_id, status):
    find(ctx.db["emails"], email_id, "email")["read"] = status == "read"
    return {"message": "Email updated."}


@EMAIL.api("move_email", "Move an email to another folder.",
           [I("email_id", "Email id."), S("folder", "Target folder.", choices=FOLDERS)],
           {"message": "string"}, method="PATCH")
def move_email(ctx, email_id, folder):
    find(ctx.db["emails"], email_id, "email")["folder"] = folder
    return {"message": "Email moved."}


@EMAIL.api("delete_email", "Delete an email.", [I("email_id", "Email id.")],
           {"message": "string"}, method="DELETE")
def delete_email(ctx, email_id):
    find(ctx.db["emails"], email_id, "email")
    del ctx.db["emails"][email_id]
    return {"message": "Email deleted."}


def email_data(rng: random.Random, people: list[dict], n_contacts: int) -> dict:
    emails = {}
    for i, p in enumerate(people[1:n_contacts + 1], start=1):
        topic = rng.choice(data.WORDS)
        emails[i] = {"email_id": i, "sender": p["email"], "recipients": [people[0]["email"]],
                     "subject": f"About the {topic}", "body": f"Hi, {rng.choice(data.PHRASES)}.",
                     "folder": "inbox", "read": i % 3 == 0,
                     "sent_at": data.timestamp(i, i * 4)}
    return {"emails": emails}


# ---- calendar ------------------------------------------------------------------------------
CALENDAR = App("calendar", "Calendar: events with dates, times, locations and attendees.")
add_login(CALENDAR)
EVENT = {"event_id": "integer", "title": "string", "date": "string", "start_time": "string",
         "end_time": "string", "location": "string", "attendees": "list[string]"}


@CALENDAR.api("search_events", "Search events, soonest first.",
              [S("query", "Words to match in the title or location.", False, ""),
               S("date", "Only events on this date (YYYY-MM-DD).", False)],
              EVENT, paginated=True)
def search_events(ctx, query, date):
    rows = [dict(e) for e in ctx.db["events"].values()
            if matches(query, e["title"], e["location"]) and date in (None, e["date"])]
    return sorted(rows, key=lambda e: (e["date"], e["start_time"]))


@CALENDAR.api("show_event", "Show one event.", [I("event_id", "Event id.")], EVENT)
def show_event(ctx, event_id):
    return dict(find(ctx.db["events"], event_id, "event"))


def _check_times(start, end):
    for t in (start, end):
        require(len(t) == 5 and t[2] == ":", f"time {t!r} must look like HH:MM")
    require(start < end, "start_time must be before end_time")


@CALENDAR.api("create_event", "Create an event.",
              [S("title", "Title.", min_length=1), S("date", "YYYY-MM-DD.", min_length=10),
               S("start_time", "HH:MM."), S("end_time", "HH:MM."),
               S("location", "Where.", False, ""), L("attendees", "Attendee emails.", False, [])],
              {"event_id": "integer"}, method="POST")
def create_event(ctx, title, date, start_time, end_time, location, attendees):
    _check_times(start_time, end_time)
    eid = ctx.new_id("events")
    ctx.db["events"][eid] = {"event_id": eid, "title": title, "date": date,
                             "start_time": start_time, "end_time": end_time,
                             "location": location, "attendees": list(attendees or [])}
    return {"event_id": eid}


@CALENDAR.api("update_event", "Change an event's date, times or location.",
              [I("event_id", "Event id."), S("date", "New date.", False),
               S("start_time", "New start.", False), S("end_time", "New end.", False),
               S("location", "New location.", False)], {"message": "string"}, method="PATCH")
def update_event(ctx, event_id, date, start_time, end_time, location):
    e = find(ctx.db["events"], event_id, "event")
    new = {"date": date, "start_time": start_time, "end_time": end_time, "location": location}
    merged = {**e, **{k: v for k, v in new.items() if v is not None}}
    _check_times(merged["start_time"], merged["end_time"])
    e.update(merged)
    return {"message": "Event updated."}


@CALENDAR.api("add_attendee", "Invite someone to an event.",
              [I("event_id", "Event id."), S("person", "Full name or email.")],
              {"message": "string"}, method="POST")
def add_attendee(ctx, event_id, person):
    e = find(ctx.db["events"], event_id, "event")
    email = ctx.person(person)["email"]
    require(email not in e["attendees"], f"{email} is already invited")
    e["attendees"] = e["attendees"] + [email]
    return {"message": "Attendee added."}


@CALENDAR.api("delete_event", "Delete an event.", [I("event_id", "Event id.")],
              {"message": "string"}, method="DELETE")
def delete_event(ctx, event_id):
    find(ctx.db["events"], event_id, "event")
    del ctx.db["events"][event_id]
    return {"message": "Event deleted."}


def calendar_data(rng: random.Random, people: list[dict], n_contacts: int) -> dict:
    events = {}
    for i in range(1, 13):
        p = people[1 + rng.randrange(n_contacts)]
        h = 8 + rng.randrange(9)
        events[i] = {"event_id": i, "title": f"{rng.choice(data.WORDS).title()} with "
                     f"{p['first_name']}", "date": f"2024-05-{15 + i % 10:02d}",
                     "start_time": f"{h:02d}:00", "end_time": f"{h + 1:02d}:00",
                     "location": rng.choice(("Cafe Luna", "Office", "Park", "Library")),
                     "attendees": [p["email"]]}
    return {"events": events}


# ---- file_system ---------------------------------------------------------------------------
FILES = App("file_system", "File system: text files in folders.")
add_login(FILES)
FILE = {"file_id": "integer", "path": "string", "content": "string", "created_at": "string"}


def _by_path(ctx, path) -> dict:
    for f in ctx.db["files"].values():
        if f["path"] == path:
            return f
    raise ApiError(f"file {path!r} not found", 404)


@FILES.api("list_directory", "List the files under a folder.",
           [S("path", "Folder path like /documents.", False, "/")],
           {"file_id": "integer", "path": "string"}, paginated=True)
def list_directory(ctx, path):
    prefix = path.rstrip("/") + "/"
    return [{"file_id": f["file_id"], "path": f["path"]} for f in ctx.db["files"].values()
            if f["path"].startswith(prefix)]


@FILES.api("show_file", "Show a file by path.", [S("path", "File path.")], FILE)
def show_file(ctx, path):
    return dict(_by_path(ctx, path))


@FILES.api("create_file", "Create a text file.",
           [S("path", "File path.", min_length=2), S("content", "Text.", False, "")],
           {"file_id": "integer"}, method="POST")
def create_file(ctx, path, content):
    require(path.startswith("/") and not path.endswith("/"), "path must look like /dir/name.txt")
    require(all(f["path"] != path for f in ctx.db["files"].values()), f"{path} already exists")
    fid = ctx.new_id("files")
    ctx.db["files"][fid] = {"file_id": fid, "path": path, "content": content,
                            "created_at": ctx.now()}
    return {"file_id": fid}


@FILES.api("update_file", "Replace a file's content.",
           [S("path", "File path."), S("content", "New text.")], {"message": "string"},
           method="PATCH")
def update_file(ctx, path, content):
    _by_path(ctx, path)["content"] = content
    return {"message": "File updated."}


@FILES.api("move_file", "Move or rename a file.",
           [S("path", "File path."), S("new_path", "New path.", min_length=2)],
           {"message": "string"}, method="PATCH")
def move_file(ctx, path, new_path):
    require(all(f["path"] != new_path for f in ctx.db["files"].values()),
            f"{new_path} already exists")
    _by_path(ctx, path)["path"] = new_path
    return {"message": "File moved."}


@FILES.api("delete_file", "Delete a file.", [S("path", "File path.")], {"message": "string"},
           method="DELETE")
def delete_file(ctx, path):
    del ctx.db["files"][_by_path(ctx, path)["file_id"]]
    return {"message": "File deleted."}


def files_data(rng: random.Random) -> dict:
    files = {}
    for i, (folder, name) in enumerate([(d, w) for d in ("documents", "photos", "work")
                                        for w in rng.sample(data.WORDS, 4)], start=1):
        files[i] = {"file_id": i, "path": f"/{folder}/{name}.txt",
                    "content": f"{name}: {rng.choice(data.PHRASES)}",
                    "created_at": data.timestamp(i, i * 2)}
    return {"files": files}


def _registry() -> dict:
    from loopjax.envs.miniworld import apps_media  # noqa: PLC0415
    return {"email": (EMAIL, lambda rng, ppl, pre: email_data(rng, ppl, pre.n_contacts)),
            "calendar": (CALENDAR, lambda rng, ppl, pre: calendar_data(rng, ppl, pre.n_contacts)),
            "file_system": (FILES, lambda rng, ppl, pre: files_data(rng)),
            **apps_media.REGISTRY}


REGISTRY = _registry()
