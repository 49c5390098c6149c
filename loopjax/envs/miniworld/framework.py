"""The API framework of miniworld: declarative API specs, argument validation, pagination, docs.

Every API is a plain function `fn(ctx, **kwargs)` registered on an `App` with `App.api(...)`. The
spec (parameters with type / required / default / constraints, response schema) is the single
source for three things: argument validation (a bad call raises `ApiError`, the agent sees a
422-style message), pagination (`paginated=True` adds `page_index` / `page_limit` and slices the
returned list) and the documentation that `api_docs` serves in AppWorld's shape.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

_TYPES = {"string": str, "integer": int, "number": (int, float), "boolean": bool,
          "list[string]": list, "list[integer]": list, "object": dict,
          "any": (str, int, float, bool, list, dict, type(None))}
PAGE_LIMIT_MAX = 20


class ApiError(Exception):
    """An API call the world refuses (bad arguments, unknown entity, wrong token...)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status

    def render(self) -> str:
        return f"Response status code is {self.status}:\n{{\"message\": \"{self}\"}}"


@dataclasses.dataclass(frozen=True)
class Param:
    """One API parameter. `constraints` are human-readable and enforced by `check`."""

    name: str
    type: str
    description: str
    required: bool = True
    default: Any = None
    ge: float | None = None
    le: float | None = None
    min_length: int | None = None
    choices: tuple | None = None

    def constraints(self) -> list[str]:
        out = []
        if self.ge is not None:
            out.append(f"value >= {self.ge}")
        if self.le is not None:
            out.append(f"value <= {self.le}")
        if self.min_length is not None:
            out.append(f"length >= {self.min_length}")
        if self.choices is not None:
            out.append("value in [" + ", ".join(repr(c) for c in self.choices) + "]")
        return out

    def check(self, value: Any) -> Any:
        """Validate (and lightly coerce) one argument; raise ApiError with the reason."""
        if value is None and not self.required:
            return None
        want = _TYPES[self.type]
        if self.type == "number" and isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        bad_bool = isinstance(value, bool) and self.type in ("integer", "number")
        if not isinstance(value, want) or bad_bool:
            raise ApiError(f"{self.name}: expected {self.type}, got {type(value).__name__}")
        if self.type.startswith("list[") and not all(
                isinstance(v, _TYPES[self.type[5:-1]]) for v in value):
            raise ApiError(f"{self.name}: expected {self.type}")
        if self.ge is not None and value < self.ge:
            raise ApiError(f"{self.name}: must be >= {self.ge}")
        if self.le is not None and value > self.le:
            raise ApiError(f"{self.name}: must be <= {self.le}")
        if self.min_length is not None and len(value) < self.min_length:
            raise ApiError(f"{self.name}: must have length >= {self.min_length}")
        if self.choices is not None and value not in self.choices:
            raise ApiError(f"{self.name}: must be one of {list(self.choices)}")
        return value

    def doc(self) -> dict:
        return {"name": self.name, "type": self.type, "required": self.required,
                "description": self.description, "default": self.default,
                "constraints": self.constraints()}


PAGE_PARAMS = (
    Param("page_index", "integer", "The index of the page to return.", False, 0, ge=0),
    Param("page_limit", "integer", "The maximum number of results per page.", False, 5,
          ge=1, le=PAGE_LIMIT_MAX),
)
TOKEN_PARAM = Param("access_token", "string", "Access token obtained from the app's login API.")


@dataclasses.dataclass(frozen=True)
class Api:
    """A registered API: its spec and handler."""

    app: str
    name: str
    description: str
    params: tuple[Param, ...]
    returns: Any
    fn: Callable
    method: str = "GET"
    paginated: bool = False
    needs_token: bool = True

    def all_params(self, auth: bool) -> tuple[Param, ...]:
        head = (TOKEN_PARAM,) if auth and self.needs_token else ()
        return head + self.params + (PAGE_PARAMS if self.paginated else ())

    def doc(self, auth: bool) -> dict:
        """The AppWorld-shaped documentation of this API."""
        returns = [self.returns] if self.paginated else self.returns
        return {"app_name": self.app, "api_name": self.name,
                "path": f"/{self.app}/{self.name.replace('_', '/')}", "method": self.method,
                "description": self.description,
                "parameters": [p.doc() for p in self.all_params(auth)],
                "response_schemas": {"success": returns, "failure": {"message": "string"}}}

    def bind(self, kwargs: dict, auth: bool) -> dict:
        """Check kwargs against the spec: unknown, missing and ill-typed arguments raise."""
        spec = {p.name: p for p in self.all_params(auth)}
        unknown = sorted(set(kwargs) - set(spec))
        if unknown:
            raise ApiError(f"unexpected argument(s) {unknown} for {self.app}.{self.name}; "
                           f"valid: {sorted(spec)}")
        out = {}
        for name, p in spec.items():
            if name not in kwargs:
                if p.required:
                    raise ApiError(f"missing required argument '{name}' for "
                                   f"{self.app}.{self.name}")
                out[name] = p.default
            else:
                out[name] = p.check(kwargs[name])
        return out


class App:
    """A named collection of APIs with a one-line description."""

    def __init__(self, name: str, description: str, needs_login: bool = True):
        self.name = name
        self.description = description
        self.needs_login = needs_login
        self.apis: dict[str, Api] = {}

    def subset(self, names: tuple[str, ...]) -> App:
        """A copy of this app with only the named APIs (a small preset's smaller docs)."""
        unknown = sorted(set(names) - set(self.apis))
        if unknown:
            raise ValueError(f"{self.name} has no APIs {unknown}; it has {sorted(self.apis)}")
        app = App(self.name, self.description, self.needs_login)
        app.apis = {n: a for n, a in self.apis.items() if n in names}
        return app

    def api(self, name: str, description: str, params=(), returns: Any = None, *,
            method: str = "GET", paginated: bool = False, needs_token: bool | None = None):
        """Decorator registering `fn(ctx, **kwargs)` as API `name`."""
        def register(fn):
            token = self.needs_login if needs_token is None else needs_token
            self.apis[name] = Api(self.name, name, description, tuple(params), returns, fn,
                                  method, paginated, token)
            return fn
        return register


def paginate(items: list, page_index: int, page_limit: int) -> list:
    start = page_index * page_limit
    return items[start:start + page_limit]


def require(condition: bool, message: str, status: int = 422) -> None:
    """Raise ApiError(message) unless condition holds: the handlers' one validation idiom."""
    if not condition:
        raise ApiError(message, status)


def find(table: dict, key: Any, what: str) -> dict:
    """The record `table[key]` or a 404 ApiError naming what was not found."""
    if key not in table:
        raise ApiError(f"{what} {key!r} not found", 404)
    return table[key]


def words(text: Any) -> list[str]:
    return re.findall(r"[a-z0-9]+", str(text).lower())


def matches(query: str, *fields: Any) -> bool:
    """Case-insensitive, whole words: every word of query is a word of one of the fields."""
    have = set(words(" ".join(str(f) for f in fields)))
    return all(w in have for w in words(query or ""))


def S(name, description, required=True, default=None, **kw) -> Param:  # noqa: N802
    return Param(name, "string", description, required, default, **kw)


def I(name, description, required=True, default=None, **kw) -> Param:  # noqa: N802,E741,E743
    return Param(name, "integer", description, required, default, **kw)


def N(name, description, required=True, default=None, **kw) -> Param:  # noqa: N802
    return Param(name, "number", description, required, default, **kw)


def B(name, description, required=True, default=None, **kw) -> Param:  # noqa: N802
    return Param(name, "boolean", description, required, default, **kw)


def L(name, description, required=True, default=None, **kw) -> Param:  # noqa: N802
    return Param(name, "list[string]", description, required, default, **kw)
