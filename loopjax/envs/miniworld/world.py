"""The live world of one episode: its state, login sessions and the supervisor's answer.

The world lives in the trainer process; the agent's code (in the sandbox worker) reaches it only
through `World.call(app, api, kwargs)`, so nothing the agent does to its own objects can change
the state or the evaluation.
"""
from __future__ import annotations

from typing import Any

from loopjax.envs.miniworld.framework import ApiError, App, paginate, require

NO_ANSWER = object()


def copy_state(state: dict) -> dict:
    """A deep copy of a JSON-like state (faster than copy.deepcopy for this fixed layout)."""
    def cp(v):
        if isinstance(v, dict):
            return {k: cp(x) for k, x in v.items()}
        if isinstance(v, list):
            return [cp(x) for x in v]
        return v
    return cp(state)


class Ctx:
    """What an API handler sees: its app's tables, the whole state, people, a clock, new ids."""

    def __init__(self, world: World, app: str):
        self.world = world
        self.db = world.state.get(app, {})
        self.state = world.state
        self.people = world.people

    @property
    def user(self) -> dict:
        return self.state["supervisor"]["profile"][1]

    def now(self) -> str:
        self.world.clock += 1
        return f"2024-05-15T{9 + self.world.clock // 60:02d}:{self.world.clock % 60:02d}:00"

    def new_id(self, table: str) -> int:
        return max(self.db[table], default=0) + 1

    def person(self, who: str) -> dict:
        """Resolve a full name (case-insensitive), email or phone number to a world person."""
        key = (who or "").strip().lower()
        for p in self.people:
            if key in (p["name"].lower(), p["email"], p["phone_number"]):
                return p
        raise ApiError(f"no person found matching {who!r}; use a full name, email or phone "
                       "number", 404)


class World:
    """Dispatches API calls against a state; records complete_task's answer."""

    def __init__(self, apps: dict[str, App], state: dict, people: list[dict], auth: bool):
        self.apps = apps
        self.state = state
        self.people = people
        self.auth = auth
        self.tokens: dict[str, str] = {}
        self.answer: Any = NO_ANSWER
        self.clock = 0
        self.num_calls = 0

    @property
    def completed(self) -> bool:
        return self.answer is not NO_ANSWER

    def login(self, app: str, username: str, password: str) -> dict:
        """Check a password against the supervisor's account table; hand out a token."""
        sup = self.state["supervisor"]
        require(username in (sup["profile"][1]["email"], sup["profile"][1]["phone_number"]),
                f"no {app} account for username {username!r}", 401)
        ok = any(r["account_name"] == app and r["password"] == password
                 for r in sup["passwords"].values())
        require(ok, "invalid password", 401)
        token = f"{app}-token-{len(self.tokens) + 1}"
        self.tokens[token] = app
        return {"access_token": token, "token_type": "Bearer"}

    def call(self, app: str, api: str, kwargs: dict) -> Any:
        """One API call: validate, authenticate, run the handler, paginate. Raises ApiError."""
        self.num_calls += 1
        require(app in self.apps, f"unknown app {app!r}; apps: {sorted(self.apps)}", 404)
        spec = self.apps[app].apis.get(api)
        require(spec is not None, f"unknown api {app}.{api}; see "
                f"apis.api_docs.show_api_descriptions(app_name={app!r})", 404)
        args = spec.bind(dict(kwargs), self.auth)
        if self.auth and spec.needs_token:
            token = args.pop("access_token")
            require(self.tokens.get(token) == app,
                    f"invalid access_token for {app}; call apis.{app}.login first", 401)
        if self.completed and app != "api_docs":
            raise ApiError("the task is already completed", 409)
        page = (args.pop("page_index"), args.pop("page_limit")) if spec.paginated else None
        result = spec.fn(Ctx(self, app), **args)
        return paginate(result, *page) if page else result
