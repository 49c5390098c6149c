"""The ReAct prompt (docs/algorithm.md, "The agent"), the environment's reply format, and a compact
variant for a tiny from-scratch model.

Prompts are lists of (role, text) messages to feed into `Conversation.add_message`. The full prompt
is: system text with the key instructions, one worked example as real chat turns (a user task,
then assistant turns that read the API docs, call APIs and finish with complete_task, with the
environment's replies in exactly the format `format_observation` produces), then the task. The
worked example's assistant turns are context, not policy outputs (add_message marks them so).
"""
from __future__ import annotations

from loopjax.agent.observation import truncate_observation

Message = tuple[str, str]

SYSTEM = """\
You are an AI agent that completes tasks for your supervisor by writing Python code that calls \
the APIs of their apps.

You work in a Python REPL over several turns. In each turn, think briefly, then write one \
```python code block. The code runs in a persistent REPL (variables stay defined between turns) \
and whatever it prints comes back to you as the next message. An object `apis` gives access to \
every app: call an API as `apis.<app_name>.<api_name>(**parameters)`; it returns JSON-like data.

Key instructions:
1. Look at the API docs before using an API: apis.api_docs.show_app_descriptions(), \
apis.api_docs.show_api_descriptions(app_name=...), apis.api_docs.show_api_doc(app_name=..., \
api_name=...). Never guess an API's name or parameters.
2. Write exactly one code block per turn, and print what you need to see.
3. Take small steps and check each result before building on it.
4. Personal information (account passwords, payment cards, addresses) comes from \
apis.supervisor. Log in to an app with the supervisor's email as username and the password from \
apis.supervisor.show_account_passwords(), then pass the access_token to the app's APIs.
5. List APIs are paginated: loop over page_index until an empty page comes back.
6. Do only what the task asks; change nothing else.
7. Finish with apis.supervisor.complete_task(answer=...) if the task asks a question, or \
apis.supervisor.complete_task() otherwise. This ends the task."""

EXAMPLE_USER = dict(name="Ana Silva", email="ana.silva@example.com", phone="555-0142",
                    date="2024-03-08")
EXAMPLE_INSTRUCTION = "How many of my phone contacts are my coworkers?"
# (thought, code, output) per assistant turn; the last turn's output is never shown.
EXAMPLE_STEPS = [
    ("First I look at the apps that exist.",
     "print(apis.api_docs.show_app_descriptions())",
     '[{"name": "supervisor", "description": "The supervisor: profile, account passwords, payment '
     'cards, addresses, and task completion."}, {"name": "api_docs", "description": "Documentation '
     'of every app and API."}, {"name": "phone", "description": "Phone: contacts, text messages '
     'and alarms."}, {"name": "notes", "description": "Notes with tags."}]'),
    ("Contacts live in the phone app. Let me see its APIs.",
     "print(apis.api_docs.show_api_descriptions(app_name='phone'))",
     '[{"name": "login", "description": "Log in to phone; returns an access token."}, {"name": '
     '"search_contacts", "description": "Search the supervisor\'s contacts by name, number or '
     'email."}, {"name": "send_text_message", "description": "Send a text message."}]'),
    ("search_contacts looks right. I read its doc before using it.",
     "print(apis.api_docs.show_api_doc(app_name='phone', api_name='search_contacts'))",
     '{"app_name": "phone", "api_name": "search_contacts", "parameters": [{"name": "access_token", '
     '"type": "string", "required": true}, {"name": "query", "type": "string", "required": false, '
     '"default": ""}, {"name": "relationship", "type": "string", "required": false}, {"name": '
     '"page_index", "type": "integer", "required": false, "default": 0}, {"name": "page_limit", '
     '"type": "integer", "required": false, "default": 5}], "response_schema": [{"contact_id": '
     '"integer", "name": "string", "relationship": "string"}]}'),
    ("It needs an access token, so I log in with the phone password from the supervisor app.",
     "passwords = apis.supervisor.show_account_passwords()\n"
     "password = [p['password'] for p in passwords if p['account_name'] == 'phone'][0]\n"
     "login = apis.phone.login(username='ana.silva@example.com', password=password)\n"
     "print(login)",
     '{"access_token": "phone-ana-7f3a", "token_type": "Bearer"}'),
    ("Now I collect the coworker contacts page by page.",
     "coworkers = []\npage_index = 0\nwhile True:\n"
     "    page = apis.phone.search_contacts(access_token=login['access_token'], "
     "relationship='coworker', page_index=page_index)\n"
     "    if not page:\n        break\n    coworkers += page\n    page_index += 1\n"
     "print(len(coworkers), [c['name'] for c in coworkers])",
     "3 ['Ben Ortiz', 'Chloe Park', 'Dev Patel']"),
    ("Ana has 3 coworker contacts. I submit the answer.",
     "apis.supervisor.complete_task(answer=3)", None),
]

COMPACT_SYSTEM = ("Solve the task with Python: one ```python block per turn, using "
                  "apis.<app>.<api>(...). Read docs with apis.api_docs first. End with "
                  "apis.supervisor.complete_task(answer=...).")


def task_message(instruction: str, *, name: str, email: str, phone: str, date: str) -> str:
    """The task as the user states it: who the supervisor is, the date, and the instruction."""
    return (f"My name is {name}. My personal email is {email} and my phone number is {phone}.\n"
            f"Today's date is {date}.\nTask: {instruction}")


def format_code_turn(code: str, thought: str = "") -> str:
    """An assistant turn in the format the prompt teaches: a short thought, then one block.
    Also the format of warm-start demonstrations built from ground-truth solutions."""
    block = f"```python\n{code}\n```"
    return f"{thought}\n{block}" if thought else block


def format_observation(output: str, *, instruction: str | None = None, tokenizer=None,
                       max_tokens: int = 3000, compact: bool = False) -> str:
    """The environment's reply (a user turn): the output of the turn's code, cut to `max_tokens`
    when a tokenizer is given, then a short reminder of the task when `instruction` is given."""
    if tokenizer is not None:
        output = truncate_observation(output, tokenizer, max_tokens)
    if compact:
        text = f"Output:\n{output}"
        return f"{text}\nTask: {instruction}" if instruction else text
    shown = output if output.strip() else "(the code ran and printed nothing)"
    text = f"Output:\n```\n{shown}\n```"
    if instruction:
        text += ("\n\nReminder -- your task: " + instruction +
                 "\nWrite one python code block; finish with apis.supervisor.complete_task(...).")
    return text


def example_messages() -> list[Message]:
    """The worked example as chat turns: user task, then assistant/user(output) pairs."""
    msgs: list[Message] = [("user", "Here is an example task and its solution.\n\n"
                            + task_message(EXAMPLE_INSTRUCTION, **EXAMPLE_USER))]
    for thought, code, output in EXAMPLE_STEPS:
        msgs.append(("assistant", format_code_turn(code, thought)))
        if output is not None:
            msgs.append(("user", format_observation(output, instruction=EXAMPLE_INSTRUCTION)))
    return msgs


def react_messages(instruction: str, *, name: str, email: str, phone: str, date: str,
                   compact: bool = False) -> list[Message]:
    """The whole prompt for a task, ready for `Conversation.add_message` in order.

    compact=False: system text + key instructions, the worked example, then the task (about
    1.5K tokens with a Qwen tokenizer). compact=True: two short messages, no example -- for a
    tiny from-scratch CPU model whose context is short; pair it with
    format_observation(..., compact=True)."""
    task = task_message(instruction, name=name, email=email, phone=phone, date=date)
    if compact:
        return [("system", COMPACT_SYSTEM), ("user", task)]
    return ([("system", SYSTEM)] + example_messages()
            + [("user", "The example is over. The apps and the REPL are fresh; solve this task "
                        "the same way.\n\n" + task)])
