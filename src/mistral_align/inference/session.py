"""A conversation with a loaded model: prompts built by our exact encoder, replies sampled and streamed.

    model, encoder = load_for_chat("runs/demo", quant="auto")      # inference/load.py
    session = ChatSession(model, encoder, Sampling(temperature=0, max_new_tokens=64))
    reply = session.say("Hello", stream=print_piece)

What a user types is always text: `[INST]` typed in a message stays the characters, because the
prompt is `MistralEncoder.encode_prompt` of the conversation, never a chat template over text.
Interactive commands: `/reset` (forget the history), `/system TEXT` (set the system prompt and
start over), `/exit` or end of input.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional, TextIO

import torch

from mistral_align.chat.schema import Message
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

    def __init__(self, encoder, on_text: Callable[[str], None], prompt_len: int):
        self.encoder, self.on_text = encoder, on_text
        self.ids: list[int] = []
        self.shown = ""
        self.skip_prompt = True

    def put(self, value) -> None:
        if self.skip_prompt:  # the first call carries the prompt
            self.skip_prompt = False
            return
        self.ids += [int(i) for i in value.reshape(-1).tolist() if int(i) != self.encoder.eos_id]
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


class ChatSession:
    def __init__(self, model, encoder, sampling: Sampling, system: Optional[str] = None):
        self.model, self.encoder, self.sampling = model, encoder, sampling
        self.system = system
        self.history: list[Message] = []
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)

    def reset(self) -> None:
        self.history = []

    def set_system(self, text: Optional[str]) -> None:
        self.system = text or None
        self.reset()

    def messages(self, user: str) -> list[Message]:
        sys_msg = [Message("system", self.system)] if self.system else []
        return [*sys_msg, *self.history, Message("user", user)]

    def prompt_ids(self, user: str) -> list[int]:
        return self.encoder.encode_prompt(self.messages(user))

    def say(self, user: str, stream: Optional[Callable[[str], None]] = None) -> str:
        ids = self.prompt_ids(user)
        device = next(self.model.parameters()).device
        inputs = torch.tensor([ids], device=device)
        streamer = _Streamer(self.encoder, stream, len(ids)) if stream else None
        with torch.no_grad():
            out = self.model.generate(
                input_ids=inputs, attention_mask=torch.ones_like(inputs), eos_token_id=self.encoder.eos_id,
                pad_token_id=self.encoder.eos_id, streamer=streamer, **self.sampling.generate_kwargs(),
            )
        new = [int(t) for t in out[0, len(ids):].tolist()]
        if new and new[-1] == self.encoder.eos_id:
            new = new[:-1]
        reply = self.encoder.raw.decode(new)
        self.last_ids = new
        self.history += [Message("user", user), Message("assistant", reply)]
        return reply


def interactive(session: ChatSession, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout, stream: bool = True) -> None:
    tty = stdin.isatty()
    if tty:
        print("Type a message. /reset forgets the conversation, /system TEXT sets the system prompt, /exit quits.",
              file=stdout, flush=True)
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
        if stream:
            session.say(text, stream=lambda s: print(s, end="", file=stdout, flush=True))
            print(file=stdout, flush=True)
        else:
            print(session.say(text), file=stdout, flush=True)
