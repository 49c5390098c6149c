"""Single-app scenario templates of the full preset: email, calendar, music, shopping, files."""
from __future__ import annotations

from loopjax.envs.miniworld.evaluator import Allow
from loopjax.envs.miniworld.scenario import Gen, Scenario, TaskSpec, added_where, field_is, only, q
from loopjax.envs.miniworld.scenarios_tiny import DONE


def answer(var: str, key: str) -> str:
    """complete_task with the answer read from a looked-up record: var["key"]."""
    return f'apis.supervisor.complete_task(answer={var}["{key}"])'


# ---- email ---------------------------------------------------------------------------------
def _latest_from(g: Gen) -> tuple[dict, dict]:
    """A contact and the newest email they sent the supervisor (every contact sent one)."""
    p = g.contact()
    mails = [m for m in g.state["email"]["emails"].values() if m["sender"] == p["email"]]
    return p, max(mails, key=lambda m: m["sent_at"])


def _find_mail(p: dict) -> str:
    return f"m = apis.email.search_emails(@email sender={q(p['name'])})[0]"


def email_contact(g: Gen) -> TaskSpec:
    p, subject, body = g.contact(), f"About the {g.word()}", g.phrase()
    return TaskSpec(
        f'Email {p["name"]} with the subject "{subject}" and the text "{body}".',
        [f"apis.email.send_email(@email recipients=[{q(p['name'])}], subject={q(subject)}, "
         f"body={q(body)})\n{DONE}"],
        [added_where("email", "emails", f"an email to {p['name']} was sent",
                     recipients=[p["email"]]),
         added_where("email", "emails", "with the subject", recipients=[p["email"]],
                     subject=subject),
         added_where("email", "emails", "with the text", recipients=[p["email"]], body=body)],
        [only("email", "emails", recipients=[p["email"]])])


def reply_email(g: Gen) -> TaskSpec:
    (p, m), body = _latest_from(g), g.phrase()
    return TaskSpec(
        f'Reply "{body}" to the latest email from {p["name"]}.',
        [f"{_find_mail(p)}\napis.email.reply_to_email(@email email_id=m[\"email_id\"], "
         f"body={q(body)})\n{DONE}"],
        [added_where("email", "emails", f"a reply to {p['name']} was sent",
                     recipients=[p["email"]], subject="Re: " + m["subject"]),
         added_where("email", "emails", "with the text", recipients=[p["email"]], body=body)],
        [only("email", "emails", recipients=[p["email"]])])


def email_subject_question(g: Gen) -> TaskSpec:
    p, m = _latest_from(g)
    return TaskSpec(f"What is the subject of the latest email from {p['name']}?",
                    [f"{_find_mail(p)}\n{answer('m', 'subject')}"], [], [],
                    answer=m["subject"])


def archive_email(g: Gen) -> TaskSpec:
    p, m = _latest_from(g)
    return TaskSpec(
        f"Archive the latest email from {p['name']}.",
        [f"{_find_mail(p)}\napis.email.move_email(@email email_id=m[\"email_id\"], "
         f'folder="archive")\n{DONE}'],
        [field_is("email", "emails", m["email_id"], "folder", "archive", "the email is archived")],
        [only("email", "emails", ("update",), email_id=m["email_id"], folder="archive")])


# ---- calendar ------------------------------------------------------------------------------
def _event(g: Gen) -> tuple[str, dict]:
    title = g.unique_title(lambda: f"{g.word().title()} with {g.contact()['first_name']}",
                           "calendar", "events")
    rec = {"title": title, "date": f"2024-05-{g.amount(16, 29)}", "start_time": "10:00",
           "end_time": "11:00", "location": g.pick(("Cafe Luna", "Park", "Museum", "Office")),
           "attendees": []}
    rec["event_id"] = g.add("calendar", "events", "event_id", **rec)
    return title, rec


def _find_event(title: str) -> str:
    return f"e = apis.calendar.search_events(@calendar query={q(title)})[0]"


def create_event(g: Gen) -> TaskSpec:
    title = f"{g.word().title()} planning"
    date, h = f"2024-05-{g.amount(16, 29)}", g.amount(9, 17)
    start, end = f"{h:02d}:00", f"{h + 1:02d}:00"
    return TaskSpec(
        f'Add a calendar event "{title}" on {date} from {start} to {end}.',
        [f"apis.calendar.create_event(@calendar title={q(title)}, date={q(date)}, "
         f"start_time={q(start)}, end_time={q(end)})\n{DONE}"],
        [added_where("calendar", "events", "the event exists", title=title),
         added_where("calendar", "events", "on the right date", title=title, date=date),
         added_where("calendar", "events", "at the right time", title=title,
                     start_time=start, end_time=end)],
        [only("calendar", "events", title=title)])


def event_location_question(g: Gen) -> TaskSpec:
    title, e = _event(g)
    return TaskSpec(f'Where is my event "{title}"?',
                    [f"{_find_event(title)}\n{answer('e', 'location')}"], [], [],
                    answer=e["location"])


def move_event(g: Gen) -> TaskSpec:
    title, e = _event(g)
    date = f"2024-06-{g.amount(10, 28)}"
    return TaskSpec(
        f'Move my event "{title}" to {date}.',
        [f"{_find_event(title)}\napis.calendar.update_event(@calendar event_id=e[\"event_id\"], "
         f"date={q(date)})\n{DONE}"],
        [field_is("calendar", "events", e["event_id"], "date", date, "the event is moved")],
        [only("calendar", "events", ("update",), event_id=e["event_id"])])


def invite_contact(g: Gen) -> TaskSpec:
    (title, e), p = _event(g), g.contact()
    return TaskSpec(
        f'Invite {p["name"]} to my event "{title}".',
        [f"{_find_event(title)}\napis.calendar.add_attendee(@calendar event_id=e[\"event_id\"], "
         f"person={q(p['name'])})\n{DONE}"],
        [field_is("calendar", "events", e["event_id"], "attendees", [p["email"]],
                  f"{p['name']} is invited")],
        [only("calendar", "events", ("update",), event_id=e["event_id"])])


# ---- music ---------------------------------------------------------------------------------
def _song(g: Gen, liked: bool | None = None) -> dict:
    likes = {r["song_id"] for r in g.state["music"]["likes"].values()}
    return g.record("music", "songs", lambda s: liked is None or (s["song_id"] in likes) == liked)


def _find_song(title: str) -> str:
    return f"s = apis.music.search_songs(@music query={q(title)})[0]"


def like_song(g: Gen) -> TaskSpec:
    s = _song(g, liked=False)
    return TaskSpec(
        f'Like the song "{s["title"]}".',
        [f"{_find_song(s['title'])}\napis.music.like_song(@music song_id=s[\"song_id\"])\n{DONE}"],
        [added_where("music", "likes", "the song is liked", song_id=s["song_id"])],
        [only("music", "likes", song_id=s["song_id"])])


def song_artist_question(g: Gen) -> TaskSpec:
    s = _song(g)
    return TaskSpec(f'Who is the artist of the song "{s["title"]}"?',
                    [f"{_find_song(s['title'])}\n{answer('s', 'artist')}"], [], [],
                    answer=s["artist"])


def add_song_to_playlist(g: Gen) -> TaskSpec:
    pl = g.pick(g.state["music"]["playlists"].values())
    s = _song(g, liked=None)
    while s["song_id"] in pl["song_ids"]:
        s = _song(g)
    return TaskSpec(
        f'Add the song "{s["title"]}" to my playlist "{pl["title"]}".',
        [f"{_find_song(s['title'])}\n"
         f"p = apis.music.search_playlists(@music query={q(pl['title'])})[0]\n"
         'apis.music.add_song_to_playlist(@music playlist_id=p["playlist_id"], '
         f'song_id=s["song_id"])\n{DONE}'],
        [field_is("music", "playlists", pl["playlist_id"], "song_ids",
                  pl["song_ids"] + [s["song_id"]], "the song is in the playlist")],
        [only("music", "playlists", ("update",), playlist_id=pl["playlist_id"])])


def create_playlist(g: Gen) -> TaskSpec:
    s, title = _song(g), f"{g.word().title()} mix"
    return TaskSpec(
        f'Create a playlist named "{title}" with the song "{s["title"]}".',
        [f"{_find_song(s['title'])}\n"
         f"p = apis.music.create_playlist(@music title={q(title)})\n"
         'apis.music.add_song_to_playlist(@music playlist_id=p["playlist_id"], '
         f'song_id=s["song_id"])\n{DONE}'],
        [added_where("music", "playlists", "the playlist exists", title=title),
         added_where("music", "playlists", "with the song", title=title,
                     song_ids=[s["song_id"]])],
        [only("music", "playlists", title=title)])


# ---- shopping ------------------------------------------------------------------------------
def _find_product(name: str) -> str:
    return f"p = apis.shopping.search_products(@shopping query={q(name)})[0]"


def product_price_question(g: Gen) -> TaskSpec:
    p = g.record("shopping", "products")
    return TaskSpec(f'How much does the "{p["name"]}" cost?',
                    [f"{_find_product(p['name'])}\n{answer('p', 'price')}"], [], [],
                    answer=p["price"])


def order_product(g: Gen) -> TaskSpec:
    p = g.record("shopping", "products")
    card = g.pick(g.state["supervisor"]["cards"].values())
    addr = g.pick(g.state["supervisor"]["addresses"].values())
    return TaskSpec(
        f'Order one "{p["name"]}" with my {card["card_name"]} card, shipped to my '
        f'{addr["name"]} address.',
        [f"{_find_product(p['name'])}\n"
         'apis.shopping.add_to_cart(@shopping product_id=p["product_id"])\n'
         "card = [c for c in apis.supervisor.show_payment_cards() "
         f"if c[\"card_name\"] == {q(card['card_name'])}][0]\n"
         f"addr = [a for a in apis.supervisor.show_addresses() if a[\"name\"] == "
         f"{q(addr['name'])}][0]\n"
         'apis.shopping.place_order(@shopping payment_card_id=card["payment_card_id"], '
         f'address_id=addr["address_id"])\n{DONE}'],
        [added_where("shopping", "orders", "the product was ordered",
                     items=[{"product_id": p["product_id"], "quantity": 1}]),
         added_where("shopping", "orders", "with the right card",
                     payment_card_id=card["payment_card_id"]),
         added_where("shopping", "orders", "to the right address",
                     address_id=addr["address_id"])],
        [Allow("shopping", "orders"),
         only("shopping", "products", ("update",), product_id=p["product_id"]),
         only("supervisor", "cards", ("update",), payment_card_id=card["payment_card_id"])])


def cancel_order(g: Gen) -> TaskSpec:
    p = g.record("shopping", "products")
    oid = g.add("shopping", "orders", "order_id", items=[{"product_id": p["product_id"],
                "quantity": 1}], total=p["price"], status="placed", payment_card_id=1,
                address_id=1)
    return TaskSpec(
        "Cancel my most recent order.",
        ['o = apis.shopping.search_orders(@shopping)[0]\n'
         f'apis.shopping.cancel_order(@shopping order_id=o["order_id"])\n{DONE}'],
        [field_is("shopping", "orders", oid, "status", "cancelled", "the order is cancelled")],
        [only("shopping", "orders", ("update",), order_id=oid),
         only("supervisor", "cards", ("update",), payment_card_id=1)])


# ---- file_system ---------------------------------------------------------------------------
def create_file(g: Gen) -> TaskSpec:
    path = g.unique_title(lambda: f"/documents/{g.word()}_{g.contact()['first_name'].lower()}"
                          ".txt", "file_system", "files", "path")
    text = g.phrase()
    return TaskSpec(
        f'Create a file at {path} containing "{text}".',
        [f"apis.file_system.create_file(@file_system path={q(path)}, content={q(text)})\n{DONE}"],
        [added_where("file_system", "files", "the file exists", path=path),
         added_where("file_system", "files", "with the text", path=path, content=text)],
        [only("file_system", "files", path=path)])


def file_question(g: Gen) -> TaskSpec:
    f = g.record("file_system", "files")
    return TaskSpec(f"What does the file {f['path']} say?",
                    [f"f = apis.file_system.show_file(@file_system path={q(f['path'])})\n"
                     f"{answer('f', 'content')}"], [], [], answer=f["content"])


def move_file(g: Gen) -> TaskSpec:
    f = g.record("file_system", "files")
    new = "/archive/" + f["path"].rsplit("/", 1)[1]
    return TaskSpec(
        f"Move the file {f['path']} to {new}.",
        [f"apis.file_system.move_file(@file_system path={q(f['path'])}, new_path={q(new)})\n"
         f"{DONE}"],
        [field_is("file_system", "files", f["file_id"], "path", new, "the file is moved")],
        [only("file_system", "files", ("update",), file_id=f["file_id"])])


FULL_SCENARIOS = tuple(Scenario(fn.__name__, apps, d, fn) for fn, apps, d in (
    (email_contact, ("email",), 1), (reply_email, ("email",), 2),
    (email_subject_question, ("email",), 1), (archive_email, ("email",), 2),
    (create_event, ("calendar",), 1), (event_location_question, ("calendar",), 1),
    (move_event, ("calendar",), 2), (invite_contact, ("calendar",), 2),
    (like_song, ("music",), 1), (song_artist_question, ("music",), 1),
    (add_song_to_playlist, ("music",), 2), (create_playlist, ("music",), 2),
    (product_price_question, ("shopping",), 1), (order_product, ("shopping",), 3),
    (cancel_order, ("shopping",), 2),
    (create_file, ("file_system",), 1), (file_question, ("file_system",), 1),
    (move_file, ("file_system",), 1)))
