"""The chat messages and tools of a request (``messages``, ``tools``, ``tool_choice``), and a message as the chat
template sees it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from server.protocol_base import RequestObject
from server.protocol_limits import MAX_CONTENT_PARTS, MAX_TOOL_CALLS, items_at_most
from server.requests.json_values import NotJson, read_json


class TextPart(RequestObject):
    """One part of a message's content; only text parts are supported. Other keys (``cache_control``)
    are accepted and change nothing."""

    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, data: Any) -> Any:
        # Checked before the fields so an image part gets this message, not "field 'text' missing".
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"only 'text' content parts are supported, got type {data.get('type')!r}")
        return data


FUNCTION_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionDefinition(RequestObject):
    name: str = Field(pattern=FUNCTION_NAME)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(RequestObject):
    """An entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(RequestObject):
    name: str


class NamedToolChoice(RequestObject):
    """``tool_choice`` naming one function."""

    type: Literal["function"]
    function: FunctionName


class FunctionCall(RequestObject):
    name: str
    arguments: str
    """JSON text of the arguments object, as OpenAI sends it."""


class ToolCall(RequestObject):
    """An assistant message's tool call, in the history a client sends back."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(RequestObject):
    """A chat message. Keys clients echo back from answers (``refusal``, ``annotations`` ...) are accepted."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Annotated[
        str | Annotated[list[TextPart], Field(max_length=MAX_CONTENT_PARTS)] | None, items_at_most(MAX_CONTENT_PARTS)
    ] = None
    name: str | None = None
    """Given to the chat template with the message (templates that know ``name`` render it)."""
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOL_CALLS)
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _check(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only 'assistant' messages have 'tool_calls'")
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs 'content'")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a 'tool' message needs 'tool_call_id'")
        return self

    def text(self) -> str:
        """The content as one string (text parts joined by newlines, like vLLM)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self, param: str = "messages[0]") -> dict[str, Any]:
        """The message as the chat template sees it (``developer`` is a system message; tool calls carry their
        arguments as an object, as chat templates expect). ``param`` names the message in errors: arguments
        nested too deep are an InvalidParameterError naming ``<param>.tool_calls[j].function.arguments``."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {
                        "name": c.function.name,
                        "arguments": _arguments(c, f"{param}.tool_calls[{j}].function.arguments"),
                    },
                }
                for j, c in enumerate(self.tool_calls)
            ]
        return message


def template_messages(messages: list[ChatMessage]) -> tuple[dict[str, Any], ...]:
    """Every message as the chat template sees it (:meth:`ChatMessage.for_template`), errors naming ``messages[i]``."""
    return tuple(m.for_template(f"messages[{i}]") for i, m in enumerate(messages))


def _arguments(call: ToolCall, param: str) -> Any:
    """A tool call's arguments as a JSON value (the text itself when it is not JSON); arguments nested deeper
    than the chat template and ``json`` can take, or of more values than a request body may hold, are an
    InvalidParameterError naming ``param`` (:func:`~server.requests.json_values.read_json`)."""
    try:
        return read_json(call.function.arguments, param)
    except NotJson:
        return call.function.arguments
