"""Tool calls of chat completions: prompt rendering, grammars and output parsers.

Two output formats, chosen by the server's ``--tool-call-parser`` (vLLM's names):

- ``hermes``: each call is ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  (Hermes 2 Pro, Qwen 2.5/3 and the many models trained on that format);
- ``llama3_json``: the reply is one or more ``{"name": ..., "parameters": {...}}``
  objects (separated by ``;``), optionally after ``<|python_tag|>`` (Llama 3.1/3.2).

``tool_choice`` ``"auto"`` lets the model answer in text or call tools (the parser finds
the calls; it needs ``--enable-auto-tool-choice``); ``"required"`` and a named function
are enforced while sampling by an xgrammar structural tag in the same format (xgrammar's
built-in ``qwen_3`` and ``llama`` tags, reasoning off), so the reply always parses;
``"none"`` leaves the tools out of the prompt. A chat template that does not mention
``tools`` (the embedded SmolLM2's) gets the function list as a system block written
here, in the parser's format.

Anchor: vLLM's OpenAI server (``tool_parsers/hermes_tool_parser.py``,
``llama_tool_parser.py``; guided decoding for required/named choices) and SGLang's
function-call parsers with structural tags. Differences: ``required`` and named calls use
the same text format as ``auto`` (not a bare JSON array/object), so one parser reads all
three; a streamed call is sent as one delta once it is complete (name and the whole
``arguments`` string), not argument fragment by fragment.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, StrictStr

from sagellm.core.errors import InvalidRequestError
from sagellm.engine.structured import StructuredOutput, import_xgrammar

__all__ = [
    "PARSERS",
    "ChatTool",
    "HermesToolParser",
    "Llama3JsonToolParser",
    "NamedToolChoice",
    "ToolCall",
    "ToolParser",
    "make_parser",
    "render_tool_messages",
    "tool_grammar",
]

_LAX = ConfigDict(extra="ignore")

#: ``--tool-call-parser`` values and the xgrammar structural-tag model of each format.
PARSERS: dict[str, str] = {"hermes": "qwen_3", "llama3_json": "llama"}


class FunctionDefinition(BaseModel):
    """``tools[].function`` of a request."""

    model_config = _LAX

    name: StrictStr
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: any JSON object
    strict: StrictBool | None = None


class ChatTool(BaseModel):
    """One entry of ``tools``."""

    model_config = _LAX

    type: Literal["function"]
    function: FunctionDefinition

    def as_dict(self) -> dict[str, Any]:
        """The tool in OpenAI's shape, without unset fields."""
        return {"type": "function", "function": self.function.model_dump(exclude_none=True)}


class _FunctionName(BaseModel):
    model_config = _LAX

    name: StrictStr


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming one function."""

    model_config = _LAX

    type: Literal["function"]
    function: _FunctionName


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str  # a JSON object, as OpenAI sends it
    id: str = ""

    def as_dict(self) -> dict[str, Any]:
        """OpenAI's ``tool_calls[]`` entry."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that starts ``marker`` (held back while
    streaming: the next delta may complete the marker)."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _to_call(obj: Any, args_keys: Sequence[str]) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args: Any = {}
    for key in args_keys:
        if key in obj:
            args = obj[key]
            break
    if isinstance(args, str):  # some models write the arguments as JSON text already
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), _call_id())


class ToolParser:
    """Finds tool calls in a reply, all at once or delta by delta.

    ``feed(delta, final=...)`` returns the text that is plain content so far and the
    calls completed by this delta; text that may still turn into a call is held back
    until it is known. One parser per completion.
    """

    name = ""

    def __init__(self) -> None:
        self.num_calls = 0

    def feed(self, delta: str, *, final: bool) -> tuple[str, list[ToolCall]]:
        """Content released and calls completed by ``delta`` (everything when ``final``)."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The content (None when only calls were written) and the calls of a reply."""
        content, calls = self.feed(text, final=True)
        if calls:
            return (content.strip() or None), calls
        return content, calls

    @staticmethod
    def system_prompt(tools: Sequence[ChatTool]) -> str:
        """The function list and the call format, for templates that ignore ``tools``."""
        raise NotImplementedError

    @staticmethod
    def render_call(name: str, arguments: Mapping[str, Any]) -> str:
        """An earlier call of the conversation, written as the model would write it."""
        raise NotImplementedError


class HermesToolParser(ToolParser):
    """``<tool_call>{"name": ..., "arguments": ...}</tool_call>``, any number of times."""

    name = "hermes"
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._in_call = False

    def feed(self, delta: str, *, final: bool) -> tuple[str, list[ToolCall]]:
        self._buf += delta
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if not self._in_call:
                i = self._buf.find(self.START)
                if i < 0:
                    keep = 0 if final else _partial_suffix(self._buf, self.START)
                    cut = len(self._buf) - keep
                    content.append(self._buf[:cut])
                    self._buf = self._buf[cut:]
                    break
                content.append(self._buf[:i])
                self._buf = self._buf[i + len(self.START) :]
                self._in_call = True
                continue
            j = self._buf.find(self.END)
            if j < 0 and not final:
                break
            body = self._buf if j < 0 else self._buf[:j]
            self._buf = "" if j < 0 else self._buf[j + len(self.END) :]
            self._in_call = False
            call = self._parse_body(body)
            if call is None:  # not a call after all: give the text back
                content.append(self.START + body + ("" if j < 0 else self.END))
            else:
                calls.append(call)
                self.num_calls += 1
        text = "".join(content)
        if self.num_calls and not text.strip():
            text = ""  # the newlines between calls are not content
        return text, calls

    @staticmethod
    def _parse_body(body: str) -> ToolCall | None:
        try:
            obj = json.loads(body.strip())
        except json.JSONDecodeError:
            return None
        return _to_call(obj, ("arguments", "parameters"))

    @staticmethod
    def system_prompt(tools: Sequence[ChatTool]) -> str:
        listing = "\n".join(json.dumps(t.as_dict(), ensure_ascii=False) for t in tools)
        return (
            "You may call functions to help with the user's request. The functions you can "
            "call are described as JSON between <tools> and </tools>:\n"
            f"<tools>\n{listing}\n</tools>\n"
            "To call a function, write a JSON object with its name and its arguments between "
            "<tool_call> and </tool_call>, one block per call:\n"
            '<tool_call>\n{"name": "<function name>", "arguments": {"<argument>": <value>}}\n'
            "</tool_call>"
        )

    @staticmethod
    def render_call(name: str, arguments: Mapping[str, Any]) -> str:
        body = json.dumps({"name": name, "arguments": dict(arguments)}, ensure_ascii=False)
        return f"<tool_call>\n{body}\n</tool_call>"


class Llama3JsonToolParser(ToolParser):
    """A reply that is ``{"name": ..., "parameters": ...}`` objects (``;``-separated),
    optionally after ``<|python_tag|>``; any other reply is content."""

    name = "llama3_json"
    BOT = "<|python_tag|>"

    def __init__(self) -> None:
        super().__init__()
        self._buf = ""
        self._mode: Literal["undecided", "text", "calls"] = "undecided"
        self._decoder = json.JSONDecoder()

    def feed(self, delta: str, *, final: bool) -> tuple[str, list[ToolCall]]:
        self._buf += delta
        if self._mode == "undecided":
            head = self._buf.lstrip()
            if head.startswith(self.BOT):
                head = head[len(self.BOT) :].lstrip()
            elif self.BOT.startswith(head) and head and not final:
                return "", []  # maybe the start of the tag
            if not head and not final:
                return "", []
            if head.startswith("{"):
                self._mode, self._buf = "calls", head
            else:
                self._mode = "text"
        if self._mode == "text":
            out, self._buf = self._buf, ""
            return out, []
        calls: list[ToolCall] = []
        while True:
            rest = self._buf.lstrip().lstrip(";").lstrip()
            if not rest:
                self._buf = ""
                return "", calls
            try:
                obj, end = self._decoder.raw_decode(rest)
            except json.JSONDecodeError:
                self._buf = rest
                if not final:
                    return "", calls  # the object is not complete yet
                self._buf = ""
                return rest, calls
            call = _to_call(obj, ("parameters", "arguments"))
            if call is None:  # JSON, but not a call: the rest of the reply is content
                self._buf, self._mode = "", "text"
                return rest, calls
            calls.append(call)
            self.num_calls += 1
            self._buf = rest[end:]

    @staticmethod
    def system_prompt(tools: Sequence[ChatTool]) -> str:
        listing = "\n".join(json.dumps(t.as_dict(), ensure_ascii=False) for t in tools)
        return (
            "You may call functions to help with the user's request. The functions you can "
            f"call are described as JSON:\n{listing}\n"
            "To call a function, reply with nothing but a JSON object of the form "
            '{"name": "<function name>", "parameters": {"<argument>": <value>}}.'
        )

    @staticmethod
    def render_call(name: str, arguments: Mapping[str, Any]) -> str:
        return json.dumps({"name": name, "parameters": dict(arguments)}, ensure_ascii=False)


_PARSER_CLASSES: dict[str, type[ToolParser]] = {
    "hermes": HermesToolParser,
    "llama3_json": Llama3JsonToolParser,
}


def make_parser(name: str) -> ToolParser:
    """A fresh parser for one completion; ``name`` is a ``--tool-call-parser`` value."""
    cls = _PARSER_CLASSES.get(name)
    if cls is None:
        raise InvalidRequestError(
            f"unknown tool call parser {name!r}; choose one of {', '.join(_PARSER_CLASSES)}"
        )
    return cls()


def tool_grammar(
    parser: str,
    tools: Sequence[ChatTool],
    tool_choice: Literal["required"] | NamedToolChoice,
    *,
    parallel_tool_calls: bool = True,
) -> StructuredOutput:
    """The constraint that makes a reply one or more calls (``required``) or exactly one
    call of the named function, written in ``parser``'s format."""
    xgr = import_xgrammar()
    choice: Any = tool_choice if isinstance(tool_choice, str) else tool_choice.model_dump()
    try:
        tag = xgr.get_model_structural_tag(
            PARSERS[parser],
            tools=[t.as_dict() for t in tools],
            tool_choice=choice,
            reasoning="disabled",
            parallel_tool_calls=parallel_tool_calls,
        )
    except ValueError as exc:
        raise InvalidRequestError(f"tool_choice: {exc}") from None
    return StructuredOutput(structural_tag=tag.model_dump_json())


def render_tool_messages(
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[ChatTool],
    parser: str,
) -> list[dict[str, Any]]:
    """Messages for a chat template that ignores ``tools``: the function list as (the
    start of) the system message, earlier calls as assistant text in the parser's format,
    tool results as user turns."""
    fmt = _PARSER_CLASSES[parser]
    block = fmt.system_prompt(tools)
    out: list[dict[str, Any]] = []
    for m in messages:
        role = m["role"]
        content = str(m.get("content") or "")
        if role == "assistant" and m.get("tool_calls"):
            written = [
                fmt.render_call(c["function"]["name"], c["function"]["arguments"])
                for c in m["tool_calls"]
            ]
            content = "\n".join([content, *written]) if content else "\n".join(written)
            out.append({"role": "assistant", "content": content})
        elif role == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{content}\n</tool_response>"})
        else:
            out.append({"role": role, "content": content})
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
    else:
        out.insert(0, {"role": "system", "content": block})
    return out
