"""Exact Mistral instruct encodings, built message by message from the tokenizer's own pieces.

The loss mask is decided at the moment each message is encoded, so it can never drift from the
ids. The layout per tokenizer version mirrors mistral-common's instruct tokenizers:

    v1         <s>▁[INST]▁{system\\n\\n}{user}▁[/INST]{assistant}</s>...   ([INST] is plain text;
               the system prompt joins the *first* user message; assistant text is not stripped)
    v2, v3     <s>[INST]{user}[/INST]{assistant}</s>...   ([INST] is a control token; the system
    v3-tekken  prompt joins the *last* user message; trailing spaces of a reply are dropped)
    v7         <s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{user}[/INST]{assistant}</s>...
    v7-tekken  (the system prompt is its own block right after BOS; v11 and v13 differ from v7
    v11, v13   only in how tools, tool calls and thinking are encoded, which our schema has none of)

Text is encoded with the raw tokenizer (sentencepiece or tekken) with no special-token parsing,
so a user who types "[INST]" or "</s>" gets those characters, never a control token. The test
suite proves every layout equal to mistral-common's `encode_chat_completion` (finetuning mode).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal, Sequence

from mistral_align.chat.schema import Message, Preference
from mistral_align.chat.tekken_files import derived_tekken_file
from mistral_align.names import DERIVED_TOKENIZER_VERSIONS, TOKENIZER_VERSIONS

IGNORE_INDEX = -100

# version -> file shipped inside the mistral-common package (mistral_common/data/)
TOKENIZER_FILES = {
    "v1": "tokenizer.model.v1",
    "v2": "mistral_instruct_tokenizer_240216.model.v2",
    "v3": "mistral_instruct_tokenizer_240323.model.v3",
    "v7": "mistral_instruct_tokenizer_241114.model.v7",
    "v3-tekken": "tekken_240718.json",
}
# Versions mistral-common encodes but ships no file for (DERIVED_TOKENIZER_VERSIONS): a tekken file
# is made from the shipped Nemo one with the version's special tokens (see chat/tekken_files.py).
assert set(TOKENIZER_FILES) | set(DERIVED_TOKENIZER_VERSIONS) == set(TOKENIZER_VERSIONS)
# The system prompt is its own [SYSTEM_PROMPT] block after BOS (v7 and later); before v7 it is
# written into a user message.
SYSTEM_BLOCK_VERSIONS = frozenset({"v7", "v7-tekken", "v11", "v13"})

TrainOn = Literal["all", "last"]


@dataclass
class SftEncoding:
    input_ids: list[int]
    labels: list[int]  # unshifted; IGNORE_INDEX where the loss is masked


@dataclass
class DpoEncoding:
    prompt_ids: list[int]
    chosen_ids: list[int]  # ends with EOS
    rejected_ids: list[int]  # ends with EOS


def tokenizer_file(version: str) -> Path:
    """The tokenizer file for `version`: the one mistral-common ships, or one made from it."""
    if version not in TOKENIZER_VERSIONS:
        raise ValueError(f"unknown tokenizer version {version!r}; expected one of {', '.join(TOKENIZER_VERSIONS)}")
    if version in DERIVED_TOKENIZER_VERSIONS:
        return derived_tekken_file(version)
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer._data_path() / TOKENIZER_FILES[version]


def load_mistral_tokenizer(version: str):
    """mistral-common's own `MistralTokenizer` for `version`, in finetuning validation mode."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(tokenizer_file(version)), mode=ValidationMode.finetuning)


class MistralEncoder:
    """Turns conversations into ids and labels exactly as mistral-common would tokenize them."""

    def __init__(self, version: str):
        self.version = version
        self.mistral = load_mistral_tokenizer(version)
        self.raw = self.mistral.instruct_tokenizer.tokenizer  # SentencePieceTokenizer or Tekkenizer
        self.bos_id = self.raw.bos_id
        self.eos_id = self.raw.eos_id
        self.pad_id = self.raw.pad_id
        self.vocab_size = self.raw.n_words
        self.control_tokens = version != "v1"  # v1 writes [INST] as text
        if self.control_tokens:
            self.begin_inst = self.raw.get_special_token("[INST]")
            self.end_inst = self.raw.get_special_token("[/INST]")
        self.system_block = version in SYSTEM_BLOCK_VERSIONS
        if self.system_block:
            self.begin_system = self.raw.get_special_token("[SYSTEM_PROMPT]")
            self.end_system = self.raw.get_special_token("[/SYSTEM_PROMPT]")

    def __getstate__(self):
        # datasets.map pickles the encoder into worker processes; rebuild the tokenizer there.
        return {"version": self.version}

    def __setstate__(self, state):
        self.__init__(state["version"])

    # -- pieces -------------------------------------------------------------------------------

    def text(self, s: str) -> list[int]:
        return self.raw.encode(s, bos=False, eos=False)

    def _user(self, content: str, system: str | None) -> list[int]:
        if system:
            content = f"{system}\n\n{content}"
        if not self.control_tokens:
            return self.text(f"[INST] {content} [/INST]")
        return [self.begin_inst, *self.text(content), self.end_inst]

    def _assistant(self, content: str) -> list[int]:
        if self.version != "v1":
            content = content.rstrip(" ")
        return [*self.text(content), self.eos_id]

    def _system(self, content: str) -> list[int]:
        return [self.begin_system, *self.text(content), self.end_system]

    def _segments(self, messages: Sequence[Message]) -> list[tuple[Message, list[int]]]:
        """Each message with its ids, in order; BOS is not included."""
        system = messages[0].content if messages and messages[0].role == "system" else None
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        # Where the system prompt goes is the main difference between versions.
        system_host = {"v1": users[0] if users else None}.get(self.version, users[-1] if users else None)
        out: list[tuple[Message, list[int]]] = []
        for i, m in enumerate(messages):
            if m.role == "system":
                if self.system_block:
                    out.append((m, self._system(m.content)))
                continue
            if m.role == "user":
                host = system if (not self.system_block and i == system_host) else None
                out.append((m, self._user(m.content, host)))
            else:
                out.append((m, self._assistant(m.content)))
        return out

    # -- public encodings ---------------------------------------------------------------------

    def encode_sft(self, messages: Sequence[Message], train_on: TrainOn = "all") -> SftEncoding:
        if train_on not in ("all", "last"):
            raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
        segments = self._segments(messages)
        last_assistant = max((i for i, (m, _) in enumerate(segments) if m.role == "assistant"), default=-1)
        input_ids = [self.bos_id]
        labels = [IGNORE_INDEX]
        for i, (m, ids) in enumerate(segments):
            trained = m.role == "assistant" and m.weight == 1 and (train_on == "all" or i == last_assistant)
            input_ids += ids
            labels += ids if trained else [IGNORE_INDEX] * len(ids)
        return SftEncoding(input_ids, labels)

    def encode_prompt(self, messages: Sequence[Message]) -> list[int]:
        """A generation prompt: the conversation so far, ending with a user message."""
        return [self.bos_id, *(i for _, ids in self._segments(messages) for i in ids)]

    def encode_dpo(self, pair: Preference) -> DpoEncoding:
        # prompt + chosen is the full encoding of the conversation ending with the chosen reply:
        # the system prompt's host (first or last user) lies inside the prompt either way.
        return DpoEncoding(
            prompt_ids=self.encode_prompt(pair.prompt),
            chosen_ids=self._assistant(pair.chosen.content),
            rejected_ids=self._assistant(pair.rejected.content),
        )

    def decode(self, ids: Sequence[int]) -> str:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        return self.raw.decode(list(ids), special_token_policy=SpecialTokenPolicy.KEEP)

    def piece(self, token_id: int) -> str:
        """One token as text, for showing people their data (▁ marks a space in sentencepiece)."""
        return self.raw.id_to_piece(token_id)


@lru_cache(maxsize=None)
def get_encoder(version: str) -> MistralEncoder:
    return MistralEncoder(version)
