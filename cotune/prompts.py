"""How a component's inputs become its prompt: one home for the rendering that the runtime,
the judge, synthesis and the tiny model's builder all need (the tiny model is trained on
prompts rendered exactly as the runtime will render them)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from cotune.engines.base import Message
from cotune.spec import Component


def render_value(value: Any) -> str:
    """How a field appears in a prompt: lists as numbered lines, mappings as JSON."""
    if value is None:
        return ""
    if isinstance(value, list):
        return "\n".join(f"{i + 1}. {render_value(item)}" for i, item in enumerate(value))
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def render_messages(component: Component, values: Mapping[str, Any]) -> list[Message]:
    if component.chat:  # the conversation itself (checked when its data was loaded)
        return [
            {"role": str(m["role"]), "content": str(m["content"])}
            for m in values[component.reads[0]]
        ]
    rendered = {name: render_value(values[name]) for name in component.reads}
    messages: list[Message] = []
    if component.system:
        messages.append({"role": "system", "content": component.system.format(**rendered)})
    assert component.prompt is not None  # checked by the spec
    messages.append({"role": "user", "content": component.prompt.format(**rendered)})
    return messages
