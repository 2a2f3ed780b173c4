"""Chat messages → the prompt text the model was fine-tuned on, with the model's own template.

The template is the bundle's `chat_template.jinja` (as transformers saves it now), else the
`chat_template` of its `tokenizer_config.json`, rendered the
way transformers' `apply_chat_template` renders it (a sandboxed environment, `raise_exception`,
`bos_token`/`eos_token`, `add_generation_prompt`), so the compiled model sees exactly the text
it saw in training. No transformers import: this is the device-side runtime.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import BundleError, InputError


def _raise(message: str):
    raise InputError(f"the chat template refused the messages: {message}")


def _token_text(value: Any) -> str:
    """A special token from tokenizer_config.json: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        return str(value.get("content", ""))
    return str(value or "")


class ChatTemplate:
    """The model's chat template, compiled once."""

    def __init__(self, tokenizer_config: Path, template_file: Path | None = None):
        try:
            config = json.loads(tokenizer_config.read_text())
            source = template_file.read_text() if template_file else config.get("chat_template")
        except (OSError, ValueError) as err:
            raise BundleError(f"{tokenizer_config.parent}: unreadable ({err})") from None
        if isinstance(source, list):  # named templates: the default one
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
            source = named.get("default")
        if not isinstance(source, str) or not source:
            raise InputError(
                f"{tokenizer_config.parent.parent.name}: this model has no chat template; "
                "pass a prompt string instead of messages"
            )
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(
            x, ensure_ascii=False, indent=indent
        )
        try:
            self._template = env.from_string(source)
        except TemplateError as err:
            raise BundleError(f"{tokenizer_config}: the chat template does not parse: {err}")
        self._specials = {
            "bos_token": _token_text(config.get("bos_token")),
            "eos_token": _token_text(config.get("eos_token")),
        }

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages` ([{"role": ..., "content": ...}, ...])."""
        if not isinstance(messages, list) or not messages:
            raise InputError("messages must be a non-empty list of {role, content} objects")
        for k, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InputError(f"messages[{k}] must be an object with a string 'role'")
            if not isinstance(message.get("content"), str):
                raise InputError(f"messages[{k}].content must be a string")
        from jinja2.exceptions import TemplateError

        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self._specials
            )
        except TemplateError as err:
            raise InputError(f"the chat template failed on these messages: {err}") from None
