"""The chat template: how a list of messages becomes the text a base model continues.

A HILT model is a base model: it continues text and knows no turns. The default template writes a conversation
as a transcript that such a model has seen in its training text (plays, interviews, forums):

    <BOS>System: You are terse.
    User: Hello!
    Assistant:

and the model continues after ``Assistant:``. Its turn ends at <EOS> (the engine stops there) or where it starts
a new role line: the role markers (``\\nUser:``, ...) are stop strings, so the model never writes the user's next
turn. A template is Jinja as transformers stores it (``chat_template`` in tokenizer_config.json, or a
chat_template.jinja file): it sees ``messages`` (each with ``role`` and ``content``), ``bos_token``,
``eos_token`` and ``add_generation_prompt``, and runs in Jinja's sandbox. ``--chat_template FILE`` replaces the
default; the role markers of any template are found by rendering it (``role_stops``).
"""

from __future__ import annotations

import json
from pathlib import Path

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hilt.errors import UserError

DEFAULT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ message['role'] | capitalize }}: {{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

ROLES = ("system", "user", "assistant")


class ChatTemplate:
    """A compiled template plus the stop strings its role markers give."""

    def __init__(self, source: str, bos_token: str, eos_token: str, origin: str = "the chat template"):
        def raise_exception(message):  # transformers' templates call it to refuse a conversation
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            self._template = env.from_string(source)
        except TemplateError as e:
            raise UserError(f"{origin} is not a valid Jinja template: {e}") from None
        self.source = source
        self.bos_token, self.eos_token = bos_token, eos_token
        self.stops = role_stops(self, bos_token, eos_token)

    @classmethod
    def load(cls, path: str | Path | None, bos_token: str, eos_token: str) -> ChatTemplate:
        """The default, or a file: raw Jinja, or JSON with a ``chat_template`` string (tokenizer_config.json)."""
        if path is None:
            return cls(DEFAULT_TEMPLATE, bos_token, eos_token)
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --chat_template {path}: {e}") from None
        if path.suffix == ".json":
            try:
                text = json.loads(text)["chat_template"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path} has no chat_template string") from None
            if not isinstance(text, str):
                raise UserError(f"{path}: only a single chat_template string is supported")
        return cls(text, bos_token, eos_token, origin=str(path))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Raises jinja2.TemplateError when the template refuses the conversation."""
        return self._template.render(
            messages=messages,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            add_generation_prompt=add_generation_prompt,
        )


def role_stops(template: ChatTemplate, bos_token: str, eos_token: str) -> list[str]:
    """What a template writes between one message and the next one's content, per role (``"\\nUser:"`` for the
    default): when the model writes it, it has begun a turn that is not its own. Found by rendering two messages
    with marker contents, so it works for any template; <BOS>/<EOS> are left out (the engine stops at <EOS>)."""
    stops = []
    for role in ROLES:
        a, b = "\x00first\x00", "\x00second\x00"
        try:
            text = template.render(
                [{"role": "user", "content": a}, {"role": role, "content": b}], add_generation_prompt=False
            )
        except TemplateError:
            continue  # e.g. a template that allows a system message only first
        if a not in text or b not in text:
            continue  # the template rewrites contents; nothing reliable to stop on
        between = text[text.index(a) + len(a) : text.index(b)]
        between = between.replace(eos_token, "").replace(bos_token, "").rstrip()
        if between.strip() and between not in stops:
            stops.append(between)
    return stops
