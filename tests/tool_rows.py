"""Small tool rows in the OpenAI shape, shared by the tests of tool rows in every stage and verb
(config and loading, validate/preview, serving, training). Ids are OpenAI-style ("call_..."), which
v3-v11 refuse as written: the rows are used with `tool_call_ids: regenerate` or checked as refused.
"""

from __future__ import annotations

import json
from pathlib import Path

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}
TOOLS = [WEATHER, TIME]
CITIES = ["Paris", "Rome", "Oslo", "Lima", "東京"]
SKY = {"Paris": "sunny", "Rome": "cloudy", "Oslo": "snow", "Lima": "fog", "東京": "rain 🌧"}


def call(city: str, call_id: str = "call_0001", name: str = "get_weather") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps({"city": city})}}


def sft_row(city: str, thinking: bool = False) -> dict:
    """A user asks, the assistant calls get_weather, the tool answers, the assistant replies."""
    reply: dict = {"role": "assistant", "content": f"It is {SKY[city]} in {city}."}
    if thinking:  # v13
        reply["content"] = [{"type": "thinking", "thinking": f"The tool said {SKY[city]}."},
                            {"type": "text", "text": reply["content"]}]
    return {"tools": TOOLS, "messages": [
        {"role": "user", "content": f"Weather in {city}?"},
        {"role": "assistant", "tool_calls": [call(city)]},
        {"role": "tool", "tool_call_id": "call_0001", "content": json.dumps({"sky": SKY[city]}, ensure_ascii=False)},
        reply,
    ]}


def two_turn_row(city: str) -> dict:
    """A call and its result before a second user message: v2 leaves both out."""
    row = sft_row(city)
    row["messages"] += [{"role": "user", "content": "Thanks!"}, {"role": "assistant", "content": "You are welcome."}]
    return row


def dpo_row(city: str, wrong: str | None = None) -> dict:
    """Chosen: the right call; rejected: the right tool with the `wrong` city, or (None) the wrong tool."""
    rejected = call(wrong) if wrong is not None else call(city, name="get_time")
    return {"tools": TOOLS, "prompt": [{"role": "user", "content": f"Weather in {city}?"}],
            "chosen": [{"role": "assistant", "tool_calls": [call(city)]}],
            "rejected": [{"role": "assistant", "tool_calls": [rejected]}]}


def write_jsonl(path: Path, rows: list) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows),
                    encoding="utf-8")
    return path
