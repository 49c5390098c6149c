"""The sandbox worker: a separate Python process that runs the agent's code cells.

Started by `loopjax.envs.sandbox` as `python -I -S -B sandbox_worker.py '<limits json>'`; it uses
the standard library only (it never imports loopjax, jax or numpy). Everything in this process is
assumed to be in the agent's hands once agent code runs: the trainer validates every frame it
sends (`loopjax.envs.sandbox`). The security boundary is the OS, set up here before any agent code
runs (`lock_down`, with `sandbox_jail.py`: namespaces, a read-only root holding only the standard
library, its own uid, rlimits, seccomp). If any step fails the worker reports
{"op": "refused", "reason"} and runs nothing, unless the trainer passed `unsafe_no_os_sandbox`
(then only the rlimits and the Python-level checks apply).

Agent code is then checked (`check_code`: no dunder / private attribute access, no frame or code
object attributes, imports only from ALLOWED_MODULES) and run with a restricted builtins dict: a
friendly early error for common mistakes, not the boundary.

Protocol (4-byte big-endian length + UTF-8 JSON, both ways):
  worker -> trainer: {"op": "ready"} | {"op": "refused", "reason": str}
                     | {"op": "call", "app", "api", "kwargs"}
                     | {"op": "done", "output": str, "error": str | null, "cell": int}
  trainer -> worker: {"op": "exec", "code": str, "cell": int}
                     | {"op": "result", "ok": bool, "value"|"error"}
"""
import ast
import builtins
import json
import linecache
import os
import resource
import struct
import sys
import traceback
import types

if __package__:  # imported as loopjax.envs.sandbox_worker
    from loopjax.envs import sandbox_jail as jail
else:  # run as a file, as the trainer starts it: isolated mode (-I) puts no folder of the project
    # on sys.path, and the loopjax.envs package (registry, miniworld) must not load in here; so
    # the sibling file is found after the standard library, and sys.path is left as it was.
    sys.path.append(os.path.dirname(os.path.abspath(__file__)))
    import sandbox_jail as jail
    del sys.path[-1]

# The documented import allow-list: pure computation, no I/O.
ALLOWED_MODULES = ("math", "json", "re", "datetime", "itertools", "collections", "functools",
                   "random", "string", "statistics", "decimal", "fractions", "operator",
                   "heapq", "bisect", "copy", "textwrap")
for _m in ALLOWED_MODULES + ("_strptime", "encodings.idna", "unicodedata"):
    __import__(_m)

FORBIDDEN_NAMES = frozenset((
    "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "f_trace", "gi_frame", "gi_code",
    "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code", "tb_frame",
    "tb_next", "co_code", "co_consts", "func_globals", "mro", "format_map"))
INTERNAL_IMPORTS = ("_strptime",)  # imported lazily by allowed modules (datetime.strptime)
# Module attributes that reach attributes by a string, out of the AST check's sight.
HIDDEN_ATTRIBUTES = {"operator": ("attrgetter", "methodcaller"), "string": ("Formatter",)}
SAFE_BUILTINS = (
    "abs all any ascii bin bool bytes callable chr complex dict dir divmod enumerate filter "
    "float format frozenset hash hex id int isinstance issubclass iter len list map max min "
    "next object oct ord pow range repr reversed round set slice sorted str sum super tuple "
    "type zip staticmethod classmethod property True False None NotImplemented Ellipsis "
    "__build_class__").split()
MAX_ARGUMENT_CHARS = 20_000


class ApiError(Exception):
    """Raised in agent code when the world refuses an API call."""


class SandboxViolation(Exception):
    """Raised when agent code uses something the sandbox does not allow."""


# ---- protocol --------------------------------------------------------------------------------
class Channel:
    def __init__(self, rfd, wfd):
        self.rfd, self.wfd = rfd, wfd

    def send(self, msg):
        body = json.dumps(msg).encode("utf-8", "replace")
        data = struct.pack(">I", len(body)) + body
        while data:
            data = data[os.write(self.wfd, data):]

    def _read(self, n):
        buf = b""
        while len(buf) < n:
            chunk = os.read(self.rfd, n - len(buf))
            if not chunk:
                os._exit(0)  # the trainer went away
            buf += chunk
        return buf

    def recv(self):
        (n,) = struct.unpack(">I", self._read(4))
        return json.loads(self._read(n))


def lock_down(limits):
    """Protocol pipe to fds 3/4, fds 0-2 to /dev/null, then the OS sandbox (or refuse)."""
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    os.close(null)
    channel = Channel(rfd, wfd)

    def refuse(reason):
        channel.send({"op": "refused", "reason": reason})
        os._exit(3)

    if limits.get("unsafe_no_os_sandbox"):
        if os.getuid() == 0:  # the old best effort: nobody, rlimits
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        jail.set_rlimits(limits, max(rfd, wfd) + 1)
    else:
        try:
            jail.enter_os_sandbox(limits, rfd, wfd, refuse)
        except (jail.SandboxUnavailable, OSError) as e:
            refuse(f"{type(e).__name__}: {e}")
    sys.setrecursionlimit(int(limits.get("recursion_limit", 500)))
    return channel


# ---- the agent's view ------------------------------------------------------------------------
def make_apis(channel):
    """The `apis` object: apis.<app>.<api>(**kwargs) -> JSON result, or raises ApiError."""
    def call(app, api, args, kwargs):
        if args:
            raise TypeError(f"apis.{app}.{api} takes keyword arguments only")
        try:
            size = len(json.dumps(kwargs))
        except (TypeError, ValueError, RecursionError) as e:
            raise TypeError(f"API arguments must be JSON values (str, int, float, bool, "
                            f"list, dict, None): {e}") from None
        if size > MAX_ARGUMENT_CHARS:
            raise ValueError(f"API arguments are too large ({size} > {MAX_ARGUMENT_CHARS} "
                             "characters as JSON)")
        channel.send({"op": "call", "app": app, "api": api, "kwargs": kwargs})
        reply = channel.recv()
        if not reply["ok"]:
            raise ApiError(reply["error"])
        return reply["value"]

    class AppProxy:
        __slots__ = ("_app",)

        def __init__(self, app):
            object.__setattr__(self, "_app", app)

        def __getattr__(self, api):
            app = object.__getattribute__(self, "_app")
            return lambda *args, **kwargs: call(app, api, args, kwargs)

        def __repr__(self):
            return f"<app {object.__getattribute__(self, '_app')}>"

    class Apis:
        __slots__ = ()

        def __getattr__(self, app):
            return AppProxy(app)

        def __repr__(self):
            return "<apis: call apis.<app>.<api>(**kwargs)>"

    return Apis()


def safe_module(name):
    """A read-only namespace of a module's public, non-module attributes."""
    mod = sys.modules[name]
    hidden = HIDDEN_ATTRIBUTES.get(name, ())
    public = {k: v for k, v in vars(mod).items()
              if not k.startswith("_") and not isinstance(v, types.ModuleType) and k not in hidden}
    return types.SimpleNamespace(**public)


def make_builtins(printer):
    modules = {m: safe_module(m) for m in ALLOWED_MODULES}

    def safe_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name in INTERNAL_IMPORTS and not level:  # what allowed modules import lazily
            return sys.modules[name]
        if level or name not in modules:
            raise ImportError(f"import of {name!r} is not allowed in the sandbox; allowed: "
                              f"{', '.join(ALLOWED_MODULES)}")
        return modules[name]

    def check_name(name):
        if type(name) is not str or name.startswith("_") or name in FORBIDDEN_NAMES:
            raise SandboxViolation(f"attribute {name!r} is not accessible in the sandbox")

    def safe_getattr(obj, name, *default):
        check_name(name)
        return getattr(obj, name, *default)

    def safe_hasattr(obj, name):
        check_name(name)
        return hasattr(obj, name)

    table = {n: getattr(builtins, n) for n in SAFE_BUILTINS}
    for n, v in vars(builtins).items():
        if isinstance(v, type) and issubclass(v, BaseException):
            table[n] = v
    table.update(__import__=safe_import, getattr=safe_getattr, hasattr=safe_hasattr,
                 print=printer, ApiError=ApiError, SandboxViolation=SandboxViolation)
    return table


def check_code(tree):
    """Reject dunder / private attribute access, frame attributes, star imports and match class
    patterns (their keyword names are attribute lookups the AST does not show as attributes)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            name = node.attr
        elif isinstance(node, ast.Name):
            name = node.id if node.id.startswith("__") else ""
        elif isinstance(node, ast.ImportFrom):
            if node.level or any(a.name == "*" for a in node.names):
                raise SandboxViolation("relative and star imports are not allowed")
            name = ""
        elif isinstance(node, ast.MatchClass):
            name = next((k for k in node.kwd_attrs if k.startswith("_") or k in FORBIDDEN_NAMES),
                        "")
        else:
            continue
        if name.startswith("_") or name in FORBIDDEN_NAMES:
            raise SandboxViolation(f"line {node.lineno}: access to {name!r} is not allowed in "
                                   "the sandbox (no dunder/private attributes or frames)")


class Printer:
    """print() into a capped buffer."""

    def __init__(self, limit):
        self.limit, self.parts, self.size, self.truncated = limit, [], 0, False

    def __call__(self, *args, sep=" ", end="\n", file=None, flush=False):
        text = str(sep).join(str(a) for a in args) + str(end)
        room = self.limit - self.size
        if len(text) > room:
            text, self.truncated = text[:max(room, 0)], True
        self.parts.append(text)
        self.size += len(text)

    def take(self):
        out = "".join(self.parts)
        if self.truncated:
            out += f"\n[output truncated at {self.limit} characters]"
        self.parts, self.size, self.truncated = [], 0, False
        return out


def format_error(exc, cell_prefix="<cell", limit=20_000):
    """A traceback with only the agent's frames."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f.filename.startswith(cell_prefix)][-20:]
    lines = traceback.format_list(frames)
    head = "Traceback (most recent call last):\n" if frames else ""
    text = head + "".join(lines) + "".join(traceback.format_exception_only(type(exc), exc))
    return text if len(text) <= limit else text[:limit] + "\n[error truncated]"


# ---- main loop --------------------------------------------------------------------------------
def run_cell(code, n, namespace, printer, cpu_s, check_ast=True):
    """Compile, check and run one cell in namespace; return its error text or None."""
    used = resource.getrusage(resource.RUSAGE_SELF)
    spent = int(used.ru_utime + used.ru_stime)
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    resource.setrlimit(resource.RLIMIT_CPU, (min(spent + int(cpu_s) + 1, hard), hard))
    filename = f"<cell {n}>"
    try:
        tree = ast.parse(code, filename, "exec")
        if check_ast:
            check_code(tree)
        linecache.cache[filename] = (len(code), None, code.splitlines(True), filename)
        exec(compile(tree, filename, "exec"), namespace)
        return None
    except BaseException as exc:  # SystemExit, KeyboardInterrupt included: the cell just fails
        try:
            return format_error(exc)
        except BaseException:
            return f"{type(exc).__name__}"


def main():
    limits = json.loads(sys.argv[1])
    channel = lock_down(limits)
    printer = Printer(int(limits["output_chars"]))
    checks = bool(limits.get("python_checks", True))  # False only in tests of the OS boundary
    namespace = {"__builtins__": make_builtins(printer) if checks else builtins.__dict__,
                 "__name__": "__main__", "apis": make_apis(channel)}
    if not checks:
        builtins.print = printer
    channel.send({"op": "ready"})
    n = 0
    while True:
        msg = channel.recv()
        n += 1
        error = run_cell(msg["code"], n, namespace, printer, limits["cpu_per_cell_s"], checks)
        channel.send({"op": "done", "output": printer.take(), "error": error, "cell": msg["cell"]})


if __name__ == "__main__":
    main()
