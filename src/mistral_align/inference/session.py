"""A conversation with a loaded model: prompts built by our exact encoder, replies sampled and streamed.

    model, encoder = load_for_chat("runs/demo", quant="auto")      # inference/load.py
    session = ChatSession(model, encoder, Sampling(temperature=0, max_new_tokens=64))
    reply = session.say("Hello", stream=print_piece)

What a user types is always text: `[INST]` typed in a message stays the characters, because the
prompt is `MistralEncoder.encode_prompt` of the conversation, never a chat template over text.
Interactive commands: `/reset` (forget the history), `/system TEXT` (set the system prompt and
start over), `/exit` or end of input.

With tools (`ChatSession(..., tools=parse_tools(...))`, `mistral-align chat --tools FILE`) the
prompt holds them as mistral-common encodes them, and each reply is read back by mistral-common's
own decoding of the version's format (chat/decode.py): a reply that calls tools is a message with
`tool_calls`, printed as one JSON line. `/tool ID RESULT` answers call ID with RESULT (any text,
JSON or not); once every call of the reply is answered, the model replies to the results.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, TextIO

import torch

from mistral_align.chat.decode import call_json, decode_reply, name_calls
from mistral_align.chat.schema import ConversationError, Message, Tool
from mistral_align.errors import UserError


@dataclass
class Sampling:
    temperature: float = 0.7
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    seed: Optional[int] = None

    def check(self) -> None:
        if self.temperature < 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"--top-k must be >= 0 (0: off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"--repetition-penalty must be > 0, got {self.repetition_penalty}")
        if self.max_new_tokens <= 0:
            raise UserError(f"--max-new-tokens must be positive, got {self.max_new_tokens}")

    def generate_kwargs(self) -> dict:
        kw: dict = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature == 0:
            kw.update(do_sample=False, temperature=None, top_k=None, top_p=None)
        else:
            kw.update(do_sample=True, temperature=self.temperature, top_k=self.top_k or None, top_p=self.top_p)
        return kw


class _Streamer:
    """transformers streamer that decodes with our tokenizer and hands on each new piece of text."""

    def __init__(self, encoder, on_text: Callable[[str], None], prompt_len: int, stop_at: int | None = None):
        self.encoder, self.on_text = encoder, on_text
        self.ids: list[int] = []
        self.shown = ""
        self.skip_prompt = True
        self.stop_at = stop_at  # [TOOL_CALLS]: the calls are printed whole, as JSON, once the reply is complete
        self.stopped = False

    def put(self, value) -> None:
        if self.skip_prompt:  # the first call carries the prompt
            self.skip_prompt = False
            return
        if self.stopped:
            return
        new = [int(i) for i in value.reshape(-1).tolist() if int(i) != self.encoder.eos_id]
        if self.stop_at is not None and self.stop_at in new:
            new, self.stopped = new[:new.index(self.stop_at)], True
        self.ids += new
        text = self.encoder.raw.decode(self.ids)
        # Hold back a trailing replacement char: a multi-byte character may still be arriving.
        if text.endswith("\ufffd"):
            return
        if text.startswith(self.shown):
            new = text[len(self.shown):]
            if new:
                self.on_text(new)
            self.shown = text

    def end(self) -> None:
        text = self.encoder.raw.decode(self.ids)
        if text.startswith(self.shown) and len(text) > len(self.shown):
            self.on_text(text[len(self.shown):])
        self.shown = text


def reply_text(m: Message) -> str:
    """What a reply says in words (its thinking included), without its calls."""
    if isinstance(m.content, tuple):
        return "".join(getattr(c, "thinking", None) or getattr(c, "text", "") for c in m.content)
    return m.content


def calls_line(m: Message) -> str:
    """A reply's tool calls as one JSON line, in the OpenAI shape of the data rows."""
    return json.dumps({"tool_calls": [call_json(c) for c in m.tool_calls]}, ensure_ascii=False)


class ChatSession:
    def __init__(self, model, encoder, sampling: Sampling, system: Optional[str] = None, tools: Sequence[Tool] = ()):
        self.model, self.encoder, self.sampling = model, encoder, sampling
        self.system = system
        self.tools = tuple(tools)
        self.history: list[Message] = []
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: Optional[str]) -> None:
        self.system = text or None
        self.reset()

    def messages(self, user: str | None) -> list[Message]:
        """The conversation so far and `user`'s message (None: it ends with the tool results given)."""
        sys_msg = [Message("system", self.system)] if self.system else []
        return [*sys_msg, *self.history, *([Message("user", user)] if user is not None else [])]

    def prompt_ids(self, user: str | None) -> list[int]:
        return self.encoder.encode_prompt(self.messages(user), tools=self.tools)

    def pending_calls(self) -> list[str]:
        """The ids of the last reply's tool calls that have no result yet."""
        calling = next((i for i in range(len(self.history) - 1, -1, -1) if self.history[i].role != "tool"), None)
        if calling is None or not self.history[calling].tool_calls:
            return []
        answered = {m.tool_call_id for m in self.history[calling + 1:]}
        return [c.id for c in self.history[calling].tool_calls if c.id not in answered]

    def answer(self, call_id: str, content: str) -> list[str]:
        """Give call `call_id` of the last reply its result; returns the calls still waiting."""
        waiting = self.pending_calls()
        if call_id not in waiting:
            said = f"waiting: {', '.join(waiting)}" if waiting else "no call is waiting"
            raise UserError(f"no tool call {call_id!r} is waiting for a result ({said})")
        calling = next(m for m in reversed(self.history) if m.tool_calls)
        name = next(c.name for c in calling.tool_calls if c.id == call_id)
        self.history.append(Message("tool", content, tool_call_id=call_id, name=name))
        return self.pending_calls()

    def reply(self, user: str | None, stream: Optional[Callable[[str], None]] = None) -> Message:
        """The model's next message, after `user` (None: after the results of its last calls)."""
        if user is not None and self.pending_calls():
            raise UserError(f"answer the tool call(s) {', '.join(self.pending_calls())} first (/tool ID RESULT)")
        ids = self.prompt_ids(user)
        device = next(self.model.parameters()).device
        inputs = torch.tensor([ids], device=device)
        stop_at = self.encoder.raw.get_special_token("[TOOL_CALLS]") if self.tools else None
        streamer = _Streamer(self.encoder, stream, len(ids), stop_at) if stream else None
        with torch.no_grad():
            out = self.model.generate(
                input_ids=inputs, attention_mask=torch.ones_like(inputs), eos_token_id=self.encoder.eos_id,
                pad_token_id=self.encoder.eos_id, streamer=streamer, **self.sampling.generate_kwargs(),
            )
        new = [int(t) for t in out[0, len(ids):].tolist()]
        if new and new[-1] == self.encoder.eos_id:
            new = new[:-1]
        self.last_ids = new
        message = Message("assistant", self.encoder.raw.decode(new))
        if self.tools:
            try:  # mistral-common's own reading of the version's call format (chat/decode.py)
                message = decode_reply(self.encoder, new)
            except ConversationError as e:
                raise UserError(f"{e}; the reply was: {self.encoder.decode(new)!r}") from None
            taken = {c.id for m in self.history for c in m.tool_calls}
            message = name_calls(message, self.encoder.version, taken)
        self.history += [*([Message("user", user)] if user is not None else []), message]
        return message

    def say(self, user: str, stream: Optional[Callable[[str], None]] = None) -> str:
        return reply_text(self.reply(user, stream))


INTERACTIVE_HELP = ("Type a message. /reset forgets the conversation, /system TEXT sets the system prompt, "
                    "/tool ID RESULT answers a tool call, /exit quits.")


def show_reply(session: ChatSession, user: str | None, stdout: TextIO | None = None, stream: bool = True) -> Message:
    """Generate and print one reply: its text (streamed as it comes), then its calls as one JSON line."""
    stdout = stdout or sys.stdout  # looked up now: tests and callers may have replaced it
    streamed: list[str] = []

    def say(piece: str) -> None:
        streamed.append(piece)
        print(piece, end="", file=stdout, flush=True)

    message = session.reply(user, stream=say if stream else None)
    text = "".join(streamed) if stream else reply_text(message)
    if text or not message.tool_calls:  # a reply of calls only is just its JSON line
        print("" if stream else text, file=stdout, flush=True)
    if message.tool_calls:
        print(calls_line(message), file=stdout, flush=True)
    return message


def _show(session: ChatSession, user: str | None, stdout: TextIO, stream: bool) -> None:
    message = show_reply(session, user, stdout, stream)
    if message.tool_calls:
        print(f"[answer each call with /tool ID RESULT: {', '.join(c.id for c in message.tool_calls)}]", file=stdout,
              flush=True)


def interactive(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None,
                stream: bool = True) -> None:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout  # looked up now, as in show_reply
    tty = stdin.isatty()
    if tty:
        print(INTERACTIVE_HELP, file=stdout, flush=True)
    while True:
        if tty:
            print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        cmd = text.strip()
        if cmd in ("/exit", "/quit"):
            break
        if cmd == "/reset":
            session.reset()
            print("[history cleared]", file=stdout, flush=True)
            continue
        if cmd == "/system" or cmd.startswith("/system "):
            session.set_system(cmd[len("/system"):].strip())
            print(f"[system prompt {'set' if session.system else 'cleared'}; history cleared]", file=stdout, flush=True)
            continue
        try:
            if cmd == "/tool" or cmd.startswith("/tool "):
                call_id, _, result = cmd[len("/tool"):].strip().partition(" ")
                if not call_id:
                    raise UserError("usage: /tool ID RESULT")
                if session.answer(call_id, result.strip()):
                    continue  # more calls of the reply wait for their results
                _show(session, None, stdout, stream)
                continue
            _show(session, text, stdout, stream)
        except UserError as e:  # a mistake in one command; the session goes on
            print(f"[{e}]", file=stdout, flush=True)
