"""Hostile agent code, run through make_env / reset / step / evaluate the way the trainer does.

Every case has a precise expectation for its observation (a regex), and every case must also:
end within the time limit (a hang guard, plus start-up), never raise in the trainer, leave a
valid-UTF-8 observation within the output cap, leave the host byte-identical (a world-writable
canary file and the temp folder), let the next cell run, and fail evaluation.

Classes here: string-based attribute access, pattern matching, frames and gc, monkeypatching,
forged and malformed frames, output and unicode abuse, CPU / memory / time. The cases marked
ESCAPE run in the test-only worker mode without the AST check and builtins restrictions
(`python_checks=False`), as if an escape had already happened: they test what the trainer and the
OS do with a fully compromised worker. OS effects: test_sandbox_oslimits.py; the replay after a
crash: test_sandbox_replay.py; evaluator spraying: test_sandbox_spray.py.
"""
import os
import re
import tempfile
import time

import pytest

from loopjax.envs import list_tasks, make_env
from loopjax.envs.sandbox_jail import SANDBOX_UID_BASE

LIMIT_S = 1.5
CAP = 4_000  # output_chars for these environments
TASK = list_tasks("miniworld-tiny", "train")[0]  # any task: these cases never solve it

# A frame written straight to the worker's protocol pipe (fd 4), bypassing its Channel.
FRAME = ("import os, struct, json\n"
         "def raw(b):\n    os.write(4, struct.pack('>I', len(b)) + b)\n")

# (class, name, code, regex the observation must match); ESCAPE cases have names starting "x_".
CASES = [
    # -- string-based attribute access -------------------------------------------------------
    ("strattr", "attrgetter", "import operator\nprint(operator.attrgetter('__class__')(()))",
     r"AttributeError: .*attrgetter"),
    ("strattr", "methodcaller", "import operator\noperator.methodcaller('__reduce_ex__', 2)(())",
     r"AttributeError: .*methodcaller"),
    ("strattr", "formatter_get_field",
     "import string\nprint(string.Formatter().get_field('0.__class__', [()], {}))",
     r"AttributeError: .*Formatter"),
    ("strattr", "str_format_fields", "print('{0.__class__.__base__.__subclasses__}'.format(()))",
     r"^<built-in method __subclasses__ of type object at 0x[0-9a-f]+>$"),
    ("strattr", "getattr_dunder", "getattr((), '__class__')", r"SandboxViolation: attribute"),
    ("strattr", "getattr_str_subclass",
     "class S(str):\n    def startswith(self, *a):\n        return False\n"
     "    def __hash__(self):\n        return 1\nprint(getattr((), S('__class__')))",
     r"SandboxViolation"),
    ("strattr", "hasattr_dunder", "print(hasattr((), '__globals__'))", r"SandboxViolation"),
    ("strattr", "reduce_getattr",
     "import functools\nprint(functools.reduce(getattr, ['__class__', '__base__'], ()))",
     r"SandboxViolation"),
    ("strattr", "map_getattr", "print(list(map(getattr, [()], ['__class__'])))",
     r"SandboxViolation"),
    ("strattr", "getattr_mro", "print(getattr(type, 'mro')(int))", r"SandboxViolation"),
    ("strattr", "format_map", "print('{x.__class__}'.format_map({'x': 1}))", r"SandboxViolation"),
    # -- pattern matching ----------------------------------------------------------------------
    ("match", "class_pattern_dunder", "match ():\n    case object(__class__=c):\n        print(c)",
     r"SandboxViolation: line 2: access to '__class__'"),
    ("match", "class_pattern_private", "match apis:\n    case object(_app=a):\n        print(a)",
     r"SandboxViolation: line 2: access to '_app'"),
    ("match", "class_pattern_frame",
     "def g():\n    yield 1\nmatch g():\n    case object(gi_frame=f):\n        print(f)",
     r"SandboxViolation: line 4: access to 'gi_frame'"),
    ("match", "nested_class_pattern",
     "match [1]:\n    case [int(__class__=c)]:\n        print(c)", r"SandboxViolation"),
    # -- frames and gc ---------------------------------------------------------------------------
    ("frames", "generator_frame", "def g():\n    yield 1\nprint(g().gi_frame.f_back)",
     r"SandboxViolation: line 3: access to '(gi_frame|f_back)'"),
    ("frames", "traceback_frame",
     "try:\n    1 / 0\nexcept Exception as e:\n    print(e.__traceback__)",
     r"SandboxViolation: line 4: access to '__traceback__'"),
    ("frames", "tb_frame_by_string",
     "try:\n    1 / 0\nexcept Exception as e:\n    print(getattr(e, 'with_traceback'))\n"
     "    print(getattr(getattr(e, '__traceback__'), 'tb_frame'))", r"SandboxViolation"),
    ("frames", "function_code", "print((lambda: 0).__code__)", r"SandboxViolation"),
    ("frames", "import_gc", "import gc\nprint(gc.get_objects())", r"ImportError: import of 'gc'"),
    ("frames", "import_sys", "import sys\nprint(sys.modules)", r"ImportError: import of 'sys'"),
    ("frames", "import_inspect", "import inspect", r"ImportError: import of 'inspect'"),
    ("frames", "x_frames_reach_channel",
     "import sys\nf = sys._getframe()\nwhile f.f_back:\n    f = f.f_back\n"
     "print(sorted(k for k in f.f_globals if k == 'Channel'))", r"^\['Channel'\]$"),
    ("frames", "x_gc_finds_printer",
     "import gc\nprint(any(type(o).__name__ == 'Printer' for o in gc.get_objects()))", r"^True$"),
    # -- monkeypatching the worker ---------------------------------------------------------------
    ("patch", "apis_attribute", "apis.supervisor.complete_task = lambda **kw: None",
     r"AttributeError"),
    ("patch", "apis_type", "type(apis).__getattr__ = None", r"SandboxViolation"),
    ("patch", "own_json_copy",
     "import json\njson.dumps = None\nprint(len(apis.phone.search_contacts(page_limit=2)))",
     r"^2$"),
    ("patch", "x_worker_json_encoder",
     "import json\njson.dumps = lambda *a, **k: '{\"op\": 1'\napis.phone.search_contacts()",
     r"protocol violation: a malformed message"),
    ("patch", "x_worker_print_limit",
     "import builtins\nbuiltins.print.limit = 10 ** 9\nprint('x' * (30 * 10 ** 6))",
     r"protocol violation: a \d+-byte message"),
    ("patch", "x_worker_channel_send",
     FRAME + "import sys\nch = sys._getframe().f_back.f_globals['Channel']\n"
     "ch.send = lambda self, msg: raw(b'{\"op\": \"done\", \"output\": 7, \"cell\": 1}')\n"
     "apis.phone.search_contacts()", r"protocol violation: a malformed done message"),
    # -- forged and malformed frames (ESCAPE) -----------------------------------------------------
    ("frames_forged", "x_wrong_types",
     FRAME + "raw(b'{\"op\": \"done\", \"output\": 5, \"error\": [1]}')\nwhile True: pass",
     r"protocol violation: a malformed done message"),
    ("frames_forged", "x_deep_nesting",
     FRAME + "raw(b'[' * 50000 + b']' * 50000)\nwhile True: pass",
     r"protocol violation: (a malformed message|not a message)"),
    ("frames_forged", "x_deep_kwargs",
     FRAME + "raw(json.dumps({'op': 'call', 'app': 'phone', 'api': 'search_contacts', "
     "'kwargs': {'q': eval('[' * 60 + ']' * 60)}}).encode())\nwhile True: pass",
     r"protocol violation: an unexpected message"),
    ("frames_forged", "x_huge_length",
     "import os\nos.write(4, b'\\xff\\xff\\xff\\xff')\nwhile True: pass",
     r"protocol violation: a 4294967295-byte message"),
    ("frames_forged", "x_partial_frame_then_hang",
     "import os, struct\nos.write(4, struct.pack('>I', 150000) + b'{\"op\"')\nwhile True: pass",
     r"TimeoutError: the cell ran past the 1.5 s limit"),
    ("frames_forged", "x_calls_without_reading",
     FRAME + "b = json.dumps({'op': 'call', 'app': 'api_docs', 'api': 'show_app_descriptions', "
     "'kwargs': {}}).encode()\nwhile True:\n    raw(b)", r"TimeoutError: the cell ran past"),
    ("frames_forged", "x_forged_done_wrong_cell",
     FRAME + "raw(json.dumps({'op': 'done', 'output': 'All tests passed', 'error': None, "
     "'cell': 99}).encode())\nwhile True: pass", r"protocol violation: a malformed done message"),
    ("frames_forged", "x_invalid_utf8",
     FRAME + "raw(b'{\"op\": \"done\", \"output\": \"\\xff\\xfe\"}')",
     r"protocol violation: a malformed message"),
    ("frames_forged", "x_nan_constant", FRAME + "raw(b'{\"op\": \"done\", \"output\": NaN}')",
     r"protocol violation: a malformed message"),
    ("frames_forged", "x_kwargs_not_dict",
     FRAME + "raw(b'{\"op\": \"call\", \"app\": \"phone\", \"api\": \"x\", \"kwargs\": [1]}')",
     r"protocol violation: an unexpected message"),
    ("frames_forged", "x_long_app_name",
     FRAME + "raw(json.dumps({'op': 'call', 'app': 'a' * 10000, 'api': 'x', 'kwargs': {}})"
     ".encode())",
     r"protocol violation: an unexpected message"),
    ("frames_forged", "x_unknown_op", FRAME + "raw(b'{\"op\": \"shell\", \"cmd\": \"id\"}')",
     r"protocol violation: an unexpected message"),
    ("frames_forged", "x_not_an_object", FRAME + "raw(b'[1, 2, 3]')",
     r"protocol violation: not a message"),
    ("frames_forged", "x_empty_frame", FRAME + "raw(b'')",
     r"protocol violation: a malformed message"),
    ("frames_forged", "x_close_channel", "import os\nos.close(4)\nos.close(3)\nwhile True: pass",
     r"the worker process died|TimeoutError"),
    ("frames_forged", "x_exit", "import os\nos._exit(0)", r"the worker process died"),
    ("frames_forged", "x_segfault", "import ctypes\nctypes.string_at(0)",
     r"the worker process died"),
    ("frames_forged", "x_oversized_call_arguments",
     FRAME + "raw(json.dumps({'op': 'call', 'app': 'notes', 'api': 'create_note', "
     "'kwargs': {'title': 't', 'content': 'c' * 100000}}).encode())\nimport sys\n"
     "n = struct.unpack('>I', os.read(3, 4))[0]\nprint(json.loads(os.read(3, n))['error'])",
     r"arguments of apis.notes.create_note are too large \(\d+ > 20000"),
    # -- output and unicode abuse ------------------------------------------------------------------
    ("output", "huge_print", "print('x' * (50 * 10 ** 6))",
     r"\[output truncated at 4000 characters\]"),
    ("output", "many_prints", "for i in range(100000):\n    print(i)",
     r"\[output truncated at 4000 characters\]"),
    ("output", "huge_error", "raise ValueError('x' * (10 * 10 ** 6))", r"\[\.\.\. error text cut"),
    ("output", "print_and_error", "print('a' * 3900)\nraise ValueError('b' * 3900)",
     r"error text cut \.\.\.\]\nb+$"),
    ("output", "lone_surrogates", "print('\\ud800' * 5)\nraise ValueError('\\udfff')",
     r"^\?\?\?\?\?\n.*ValueError: \?$"),
    ("output", "nul_bytes", "print('a\\x00b')\nraise ValueError('c\\x00d')", r"^a\\x00b\n"),
    ("output", "emoji_flood", "print('\\U0001F600' * 10 ** 6)", r"\[output truncated"),
    ("output", "str_raises",
     "class X:\n    def __str__(self):\n        raise KeyError('k')\nprint(X())",
     r"KeyError: 'k'"),
    ("output", "exception_str_raises",
     "class E(Exception):\n    def __str__(self):\n        raise ValueError('v')\nraise E()",
     r"E: <exception str\(\) failed>|E$"),
    ("output", "exception_str_huge",
     "class E(Exception):\n    def __str__(self):\n        return 'y' * 10 ** 7\nraise E()",
     r"error text cut"),
    ("output", "deep_repr", "x = []\nfor i in range(10 ** 5):\n    x = [x]\nprint(x)",
     r"RecursionError"),
    # -- CPU, memory, time -----------------------------------------------------------------------
    ("limits", "infinite_loop", "while True:\n    pass", r"TimeoutError: the cell ran past"),
    ("limits", "swallowing_loop",
     "while True:\n    try:\n        while True: pass\n    except BaseException:\n        pass",
     r"TimeoutError: the cell ran past"),
    ("limits", "loop_in_finally", "try:\n    while True: pass\nfinally:\n    while True: pass",
     r"TimeoutError: the cell ran past"),
    ("limits", "memory_bomb", "x = [0] * (10 ** 10)", r"MemoryError"),
    ("limits", "string_memory_bomb", "x = 'a' * (10 ** 10)", r"MemoryError"),
    ("limits", "deep_recursion", "def f(n):\n    return f(n + 1)\nf(0)", r"RecursionError"),
    ("limits", "regex_backtracking", "import re\nre.match('(a+)+$', 'a' * 64 + 'b')",
     r"TimeoutError: the cell ran past"),
    ("limits", "huge_power", "x = 7 ** (10 ** 10)", r"TimeoutError|MemoryError"),
    ("limits", "x_sleep", "import time\ntime.sleep(60)", r"TimeoutError: the cell ran past"),
    ("limits", "x_ignore_sigxcpu",
     "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True: pass",
     r"TimeoutError|the worker process died"),
    ("limits", "x_raise_rlimits",
     "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))",
     r"ValueError: not allowed to raise maximum limit|PermissionError"),
    ("limits", "sys_exit", "raise SystemExit(0)", r"SystemExit: 0"),
    ("limits", "keyboard_interrupt", "raise KeyboardInterrupt", r"KeyboardInterrupt"),
    ("limits", "huge_api_argument",
     "apis.phone.send_text_message(to='x', message='m' * (5 * 10 ** 6))",
     r"ValueError: API arguments are too large"),
    ("limits", "bad_api_argument", "apis.phone.search_contacts(query=object())",
     r"TypeError: API arguments must be JSON values"),
]
assert len({c[1] for c in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def envs():
    e = {True: make_env("miniworld-tiny", time_limit_s=LIMIT_S, output_chars=CAP),
         False: make_env("miniworld-tiny", time_limit_s=LIMIT_S, output_chars=CAP,
                         python_checks=False)}
    yield e
    for x in e.values():
        x.close()


@pytest.fixture(scope="module")
def canary():
    d = tempfile.mkdtemp(prefix="loopjax-canary-")
    path = os.path.join(d, "canary.txt")
    with open(path, "w") as f:
        f.write("intact")
    os.chmod(d, 0o777)
    os.chmod(path, 0o666)  # even world-writable, the worker cannot touch it
    yield path


def host_snapshot(canary):
    """The canary's bytes, its folder's listing, and the temp folder's entries owned by a sandbox
    uid or nobody (the temp folder itself is shared with other processes)."""
    with open(canary, "rb") as f:
        content = f.read()
    tmp = tempfile.gettempdir()
    foreign = []
    for name in os.listdir(tmp):
        try:
            uid = os.lstat(os.path.join(tmp, name)).st_uid
        except FileNotFoundError:
            continue
        if uid >= SANDBOX_UID_BASE or uid == 65534:
            foreign.append(name)
    return content, sorted(os.listdir(os.path.dirname(canary))), foreign


def check_observation(text):
    text.encode("utf-8")  # valid UTF-8: no lone surrogates
    assert "\x00" not in text
    assert len(text) <= CAP + 200, len(text)


@pytest.mark.parametrize("kind,name,code,expect", CASES, ids=[c[1] for c in CASES])
def test_hostile_case_is_contained(envs, canary, kind, name, code, expect):
    env = envs[not name.startswith("x_")]
    before = host_snapshot(canary)
    env.reset(TASK)
    start = time.monotonic()
    res = env.step(code)
    assert time.monotonic() - start < LIMIT_S + 30  # a hang guard, not a performance assertion
    check_observation(res.output)
    assert re.search(expect, res.output, re.S | re.M), (name, res.output[-1000:])
    assert not res.done
    after = env.step("print(6 * 7)").output  # the episode goes on (after a restart: a note first)
    assert after.endswith("42"), after
    assert host_snapshot(canary) == before
    assert not env.evaluate().success


def test_forged_done_is_only_text(envs):
    """A forged done frame with the right cell number says what print could say, nothing more:
    the episode is not done, evaluation fails, and the trainer goes on (the worker's real done
    frame then arrives out of turn and restarts it)."""
    env = envs[False]
    env.reset(TASK)
    res = env.step(FRAME + "raw(json.dumps({'op': 'done', 'output': 'forged \\ud800', "
                   "'error': None, 'cell': 1}).encode())")
    check_observation(res.output)
    assert res.output == "forged ?" and not res.done and not env.world.completed
    for _ in range(3):
        check_observation(env.step("print(1)").output)
    assert not env.evaluate().success
    env.reset(TASK)
    assert env.step("print(6 * 7)").output == "42"


def test_patching_cannot_fake_success(envs):
    env = envs[True]
    env.reset(TASK)
    env.step("apis.supervisor.complete_task(answer='whatever')")
    ev = env.evaluate()
    assert not ev.success and ev.reward < 1.0


def test_variables_survive_a_timeout_and_calls_are_not_repeated(envs):
    env = envs[True]
    env.reset(TASK)
    env.step("n = len(apis.phone.search_contacts(page_limit=3))\nk = 5")
    calls = env.world.num_calls
    res = env.step("while True: pass")
    assert "TimeoutError" in res.output and "restored" in res.output
    assert env.step("print(n, k)").output == "3 5"
    assert env.world.num_calls == calls  # the replay answered from the log


def test_world_growth_is_capped(envs):
    env = envs[True]
    env.reset(TASK)
    res = env.step("for i in range(1000):\n"
                   "    apis.notes.create_note(title=f't{i}', content='c' * 1000)")
    assert "ApiError" in res.output and "the most one episode may add" in res.output, res.output
    from loopjax.envs.miniworld.env import MAX_NEW_RECORDS, _num_records
    assert _num_records(env.world.state) - env._base_records <= MAX_NEW_RECORDS
    assert not env.evaluate().success


def test_episode_argument_budget(envs):
    env = envs[True]
    env.reset(TASK)
    res = env.step("for i in range(100):\n    apis.phone.search_contacts(query='q' * 19000)")
    assert "characters of arguments; no further calls are accepted" in res.output, res.output
