"""Cross-app scenario templates of the full preset, and its challenge templates.

Train uses the pairs notes+email, calendar+phone and file_system+notes (plus the tiny ones); the
challenge templates use music+email, shopping+notes and music+file_system, which no train
template combines.
"""
from __future__ import annotations

from loopjax.envs.miniworld.evaluator import same
from loopjax.envs.miniworld.scenario import Gen, Scenario, TaskSpec, added_where, only, q
from loopjax.envs.miniworld.scenarios_full import _event, _find_event, _find_song, _song
from loopjax.envs.miniworld.scenarios_tiny import DONE, _find_note, _setup_note


def email_note(g: Gen) -> TaskSpec:
    p, text = g.contact(), g.phrase()
    title, _ = _setup_note(g, text)
    return TaskSpec(
        f'Email {p["name"]} the content of my note titled "{title}", with the note\'s title as '
        "the subject.",
        [f"{_find_note(title)}\napis.email.send_email(@email recipients=[{q(p['name'])}], "
         f'subject=n["title"], body=n["content"])\n{DONE}'],
        [added_where("email", "emails", f"an email to {p['name']} was sent",
                     recipients=[p["email"]]),
         added_where("email", "emails", "with the note's title", recipients=[p["email"]],
                     subject=title),
         added_where("email", "emails", "with the note's text", recipients=[p["email"]],
                     body=text)],
        [only("email", "emails", recipients=[p["email"]])])


def text_event_location(g: Gen) -> TaskSpec:
    (title, e), p = _event(g), g.contact()
    return TaskSpec(
        f'Text {p["name"]} the location of my event "{title}".',
        [f"{_find_event(title)}\napis.phone.send_text_message(@phone to={q(p['name'])}, "
         f'message=e["location"])\n{DONE}'],
        [added_where("phone", "messages", f"a text to {p['name']} was sent",
                     receiver_name=p["name"]),
         added_where("phone", "messages", "it says the location", receiver_name=p["name"],
                     message=e["location"])],
        [only("phone", "messages", receiver_name=p["name"])])


def note_from_file(g: Gen) -> TaskSpec:
    f = g.record("file_system", "files")
    title = g.unique_title(lambda: f"Copy of {f['path'].rsplit('/', 1)[1]}")
    return TaskSpec(
        f'Create a note titled "{title}" with the content of the file {f["path"]}.',
        [f"f = apis.file_system.show_file(@file_system path={q(f['path'])})\n"
         f'apis.notes.create_note(@notes title={q(title)}, content=f["content"])\n{DONE}'],
        [added_where("notes", "notes", "the note exists", title=title),
         added_where("notes", "notes", "with the file's text", title=title,
                     content=f["content"])],
        [only("notes", "notes", title=title)])


def email_playlist(g: Gen) -> TaskSpec:
    pl, p = g.record("music", "playlists"), g.contact()
    titles = [g.state["music"]["songs"][s]["title"] for s in pl["song_ids"]]
    return TaskSpec(
        f'Email {p["name"]} the song titles of my playlist "{pl["title"]}", one per line, with '
        "the playlist's title as the subject.",
        [f"pl = apis.music.search_playlists(@music query={q(pl['title'])})[0]\n"
         'songs = apis.music.show_playlist(@music playlist_id=pl["playlist_id"])["songs"]\n'
         f"apis.email.send_email(@email recipients=[{q(p['name'])}], subject={q(pl['title'])}, "
         'body="\\n".join(s["title"] for s in songs))\n' + DONE],
        [added_where("email", "emails", f"an email to {p['name']} was sent",
                     recipients=[p["email"]]),
         added_where("email", "emails", "with the playlist's title", recipients=[p["email"]],
                     subject=pl["title"]),
         ("it lists every song", lambda o: any(
             same([t for t in m["body"].splitlines() if t.strip()], titles)
             for m in o.added("email", "emails") if m["recipients"] == [p["email"]]))],
        [only("email", "emails", recipients=[p["email"]])])


def note_order_total(g: Gen) -> TaskSpec:
    o = max(g.state["shopping"]["orders"].values(), key=lambda o: o["order_id"])
    title = g.unique_title(lambda: f"Order total {g.word()}")
    return TaskSpec(
        f'Save the total of my most recent order in a new note titled "{title}".',
        ['o = apis.shopping.search_orders(@shopping)[0]\n'
         f'apis.notes.create_note(@notes title={q(title)}, content=str(o["total"]))\n{DONE}'],
        [added_where("notes", "notes", "the note exists", title=title),
         added_where("notes", "notes", "it has the total", title=title, content=o["total"])],
        [only("notes", "notes", title=title)])


def file_song_artist(g: Gen) -> TaskSpec:
    s = _song(g)
    path = f"/documents/artist_{s['song_id']}.txt"
    return TaskSpec(
        f'Write the artist of the song "{s["title"]}" into a new file {path}.',
        [f"{_find_song(s['title'])}\n"
         f'apis.file_system.create_file(@file_system path={q(path)}, content=s["artist"])\n'
         + DONE],
        [added_where("file_system", "files", "the file exists", path=path),
         added_where("file_system", "files", "with the artist", path=path,
                     content=s["artist"])],
        [only("file_system", "files", path=path)])


CROSS_SCENARIOS = (
    Scenario("email_note", ("email", "notes"), 2, email_note),
    Scenario("text_event_location", ("calendar", "phone"), 2, text_event_location),
    Scenario("note_from_file", ("file_system", "notes"), 2, note_from_file),
    Scenario("email_playlist", ("email", "music"), 3, email_playlist, challenge=True),
    Scenario("note_order_total", ("notes", "shopping"), 2, note_order_total, challenge=True),
    Scenario("file_song_artist", ("file_system", "music"), 2, file_song_artist, challenge=True),
)
