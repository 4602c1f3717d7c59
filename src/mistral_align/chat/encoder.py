"""Exact Mistral instruct encodings, built message by message with mistral-common's own encoders.

The loss mask is decided at the moment each message is encoded, so it can never drift from the
ids. Each message is encoded by the per-message encoder of mistral-common's instruct tokenizer for
the version (`encode_user_message`, `encode_assistant_message`, `encode_tool_message`, ...), in
the walk its `encode_instruct` makes, given the form its request normaliser would give it
(chat/to_mistral.py). The layout per tokenizer version:

    v1         <s>▁[INST]▁{system\\n\\n}{user}▁[/INST]{assistant}</s>...   ([INST] is plain text;
               the system prompt joins the *first* user message; assistant text is not stripped)
    v2, v3     <s>[INST]{user}[/INST]{assistant}</s>...   ([INST] is a control token; the system
    v3-tekken  prompt joins the *last* user message; trailing spaces of a reply are dropped)
    v7         <s>[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT][INST]{user}[/INST]{assistant}</s>...
    v7-tekken  (the system prompt is its own block right after BOS)
    v11, v13

Tools, v2 to v13 (v1 has none):

    tools      [AVAILABLE_TOOLS][{"type": "function", "function": {...}}, ...][/AVAILABLE_TOOLS]
               just before the [INST] of the last user message (v13: of the first one)
    calls      v2:        [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]</s>
               v3, v7:    [TOOL_CALLS][{"name": ..., "arguments": {...}, "id": ...}, ...]</s>
               v11:       [TOOL_CALLS]name[CALL_ID]id[ARGS]{...} per call, then </s>
               v13:       [TOOL_CALLS]name[ARGS]{...} per call, then </s>
               (v7 and later: a reply's text first, then its calls)
    results    v2:        [TOOL_RESULTS][{"name": ..., "content": ...}][/TOOL_RESULTS]
               v3:        [TOOL_RESULTS]{"content": ..., "call_id": ...}[/TOOL_RESULTS]
               v7, v11:   [TOOL_RESULTS]id[TOOL_CONTENT]content[/TOOL_RESULTS]
               v13:       [TOOL_RESULTS]content[/TOOL_RESULTS]
    thinking   v13:       [THINK]...[/THINK] where the reply has it

v2 leaves out every call and every result before the last user message (its replies stay); the
encodings count what was left out (`dropped_tool_calls`, `dropped_tool_results`). Trained: each
assistant message (its text, thinking and calls) and its EOS; everything else is masked.

Text is encoded with the raw tokenizer (sentencepiece or tekken) with no special-token parsing,
so a user who types "[INST]" or "[TOOL_CALLS]" gets those characters, never a control token. The
test suite proves every layout equal to mistral-common's `encode_chat_completion` (finetuning
mode), and every mask equal to one built from mistral-common's own normalised request.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal, Sequence

from mistral_align.chat.messages import Message, Preference, Thinking, Tool, Unpaired
from mistral_align.chat.tekken_files import derived_tekken_file
from mistral_align.names import DERIVED_TOKENIZER_VERSIONS, TEKKEN_VERSIONS, TOKENIZER_VERSIONS

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
    # What mistral-common leaves out of the encoding (v2: calls and results before the last user message).
    dropped_tool_calls: int = 0
    dropped_tool_results: int = 0


@dataclass
class DpoEncoding:
    prompt_ids: list[int]
    chosen_ids: list[int]  # ends with EOS
    rejected_ids: list[int]  # ends with EOS
    dropped_tool_calls: int = 0  # left out of the prompt, as in SftEncoding
    dropped_tool_results: int = 0


@dataclass
class KtoEncoding:
    prompt_ids: list[int]
    completion_ids: list[int]  # ends with EOS
    label: bool
    dropped_tool_calls: int = 0  # left out of the prompt, as in SftEncoding
    dropped_tool_results: int = 0


@dataclass
class _Segment:
    """One message and its ids, as encode_instruct would append them (BOS not included)."""

    message: Message
    ids: list[int]

    @property
    def dropped(self) -> tuple[int, int]:
        """(calls, results) that mistral-common encoded as nothing."""
        if self.ids:
            return 0, 0
        return len(self.message.tool_calls), int(self.message.role == "tool")


def tokenizer_file(version: str) -> Path:
    """The tokenizer file for `version`: the one mistral-common ships, or one made from it."""
    if version not in TOKENIZER_VERSIONS:
        raise ValueError(f"unknown tokenizer version {version!r}; expected one of {', '.join(TOKENIZER_VERSIONS)}")
    if version in DERIVED_TOKENIZER_VERSIONS:
        return derived_tekken_file(version)
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer._data_path() / TOKENIZER_FILES[version]


class TokenizerFileError(ValueError):
    """A tokenizer file that is not one of `version` (or not one mistral-common can read)."""


def load_mistral_tokenizer(version: str, path: str | Path | None = None):
    """mistral-common's own `MistralTokenizer` for `version`, in finetuning validation mode: from
    `path` (a model repository's own `tekken.json` or `tokenizer.model.vN`), else from the file
    mistral-common ships for it (or the one derived from it, chat/tekken_files.py)."""
    from mistral_common.exceptions import MistralCommonException
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    if path is None:
        return MistralTokenizer.from_file(str(tokenizer_file(version)), mode=ValidationMode.finetuning)
    try:
        tokenizer = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
    except (MistralCommonException, ValueError, KeyError, OSError) as e:
        raise TokenizerFileError(f"{path}: not a tokenizer file mistral-common can read ({e})") from None
    found = file_version(tokenizer)
    if found != version:
        raise TokenizerFileError(f"{path} is a tokenizer {found} file, not {version}")
    return tokenizer


def file_version(tokenizer) -> str:
    """Our name for the version of a loaded `MistralTokenizer`: mistral-common's own
    (`TokenizerVersion`), with "-tekken" added for a v3 or v7 tekken file; a version mistral-align
    does not encode is named with "(not supported by mistral-align)"."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    raw = tokenizer.instruct_tokenizer.tokenizer
    version = raw.version.value
    tekken = isinstance(raw, Tekkenizer)
    name = f"{version}-tekken" if tekken and f"{version}-tekken" in TEKKEN_VERSIONS else version
    if name in TOKENIZER_VERSIONS and tekken == (name in TEKKEN_VERSIONS):
        return name
    return f"{version} {'tekken' if tekken else 'sentencepiece'} (not supported by mistral-align)"


class MistralEncoder:
    """Turns conversations into ids and labels exactly as mistral-common would tokenize them."""

    def __init__(self, version: str, path: str | Path | None = None):
        """`path`: the tokenizer file to encode with (a model repository's own); None: the one
        mistral-common ships for `version` (or the one derived from it)."""
        # Lazy (start-up time): mistral-common is slow to import, and the CLI imports this module
        # before it knows whether a command needs an encoder.
        import mistral_align.chat.to_mistral as to_mistral

        self._to_mistral = to_mistral
        self.version = version
        self.file = Path(path) if path is not None else tokenizer_file(version)
        self.own_file = path is not None  # False: mistral-common's shipped (or derived) file
        self.mistral = load_mistral_tokenizer(version, path)
        self.instruct = self.mistral.instruct_tokenizer  # InstructTokenizerV1 ... V13
        self.raw = self.instruct.tokenizer  # SentencePieceTokenizer or Tekkenizer
        self.mistral_version = self.raw.version.value  # mistral-common's name: v3-tekken is "v3"
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
        return {"version": self.version, "path": str(self.file) if self.own_file else None}

    def __setstate__(self, state):
        self.__init__(state["version"], state.get("path"))

    @cached_property
    def file_sha256(self) -> str:
        """The tokenizer file's SHA-256: what the ids depend on besides the version and the code."""
        return hashlib.sha256(self.file.read_bytes()).hexdigest()

    # -- pieces -------------------------------------------------------------------------------

    def text(self, s: str) -> list[int]:
        return self.raw.encode(s, bos=False, eos=False)

    def _message_ids(self, m: Message, i: int, first_user: int, last_user: int, system: str | None,
                     tools) -> list[int]:
        """Message i's ids, from the instruct tokenizer's encoder for its role, called as
        encode_instruct calls it."""
        mc, it = self._to_mistral, self.instruct
        if m.role == "system":  # before v7 the system prompt is written into a user message instead
            return it.encode_system_message(mc.system(m))[0] if self.system_block else []
        if m.role == "user":
            return it.encode_user_message(mc.user(m), tools, i == last_user, i == first_user, system_prompt=system,
                                          force_img_first=True, settings=mc.NO_SETTINGS)[0]
        if m.role == "assistant":
            return it.encode_assistant_message(mc.assistant(m), is_before_last_user_message=i < last_user)
        return it.encode_tool_message(mc.tool_result(m, self.mistral_version), i < last_user)[0]

    def _segments(self, messages: Sequence[Message], tools: Sequence[Tool] = ()) -> list[_Segment]:
        """Each message with its ids, in the order mistral-common encodes them; BOS is not included."""
        messages = self._to_mistral.in_encoding_order(messages, self.mistral_version)
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        first_user, last_user = (users[0], users[-1]) if users else (-1, -1)
        has_system = bool(messages) and messages[0].role == "system"
        system = messages[0].content if has_system and not self.system_block else None
        available = self._to_mistral.tools(tools)
        return [_Segment(m, self._message_ids(m, i, first_user, last_user, system, available))
                for i, m in enumerate(messages)]

    def encode_reply(self, m: Message) -> list[int]:
        """A reply after the last user message (a DPO side, a generated reply): its ids and EOS."""
        return self.instruct.encode_assistant_message(self._to_mistral.assistant(m), is_before_last_user_message=False)

    def _thinking_length(self, m: Message) -> int:
        """How many of an assistant message's first ids are its thinking ([THINK]...[/THINK])."""
        if not isinstance(m.content, tuple):
            return 0
        return sum(len(self.instruct.encode_think(self._to_mistral.think(c))) for c in m.content if isinstance(c, Thinking))

    def _labels(self, segment: _Segment, trained: bool, train_thinking: bool) -> list[int]:
        ids = segment.ids
        if not trained:
            return [IGNORE_INDEX] * len(ids)
        if train_thinking:
            return list(ids)
        # The schema keeps thinking ahead of a reply's text, so it is the start of the ids.
        masked = self._thinking_length(segment.message)
        return [IGNORE_INDEX] * masked + ids[masked:]

    @staticmethod
    def _dropped(segments: Sequence[_Segment]) -> dict[str, int]:
        return {"dropped_tool_calls": sum(s.dropped[0] for s in segments),
                "dropped_tool_results": sum(s.dropped[1] for s in segments)}

    # -- public encodings ---------------------------------------------------------------------

    def encode_sft(self, messages: Sequence[Message], train_on: TrainOn = "all", *, tools: Sequence[Tool] = (),
                   train_thinking: bool = True) -> SftEncoding:
        """Ids and labels of a conversation that ends with an assistant message. Trained: every
        assistant message of weight 1 (with "last", only the last one), its EOS included, and its
        thinking unless `train_thinking` is False."""
        if train_on not in ("all", "last"):
            raise ValueError(f"train_on must be 'all' or 'last', got {train_on!r}")
        segments = self._segments(messages, tools)
        last_assistant = max((i for i, s in enumerate(segments) if s.message.role == "assistant"), default=-1)
        input_ids = [self.bos_id]
        labels = [IGNORE_INDEX]
        for i, s in enumerate(segments):
            m = s.message
            trained = m.role == "assistant" and m.weight == 1 and (train_on == "all" or i == last_assistant)
            input_ids += s.ids
            labels += self._labels(s, trained, train_thinking)
        return SftEncoding(input_ids, labels, **self._dropped(segments))

    def encode_prompt(self, messages: Sequence[Message], *, tools: Sequence[Tool] = ()) -> list[int]:
        """A generation prompt: the conversation so far, ending with a user message (or tool results)."""
        return [self.bos_id, *(i for s in self._segments(messages, tools) for i in s.ids)]

    def encode_dpo(self, pair: Preference) -> DpoEncoding:
        # prompt + chosen is the full encoding of the conversation ending with the chosen reply:
        # the system prompt's host (first or last user) and the tools' lie inside the prompt, and
        # a reply after the last user message is encoded the same whatever follows.
        segments = self._segments(pair.prompt, pair.tools)
        return DpoEncoding(
            prompt_ids=[self.bos_id, *(i for s in segments for i in s.ids)],
            chosen_ids=self.encode_reply(pair.chosen),
            rejected_ids=self.encode_reply(pair.rejected),
            **self._dropped(segments),
        )

    def encode_unpaired(self, row: Unpaired) -> KtoEncoding:
        """A KTO row: the prompt and the reply exactly as encode_dpo encodes a pair's."""
        segments = self._segments(row.prompt, row.tools)
        return KtoEncoding(prompt_ids=[self.bos_id, *(i for s in segments for i in s.ids)],
                           completion_ids=self.encode_reply(row.completion), label=row.label, **self._dropped(segments))

    def decode(self, ids: Sequence[int]) -> str:
        from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

        return self.raw.decode(list(ids), special_token_policy=SpecialTokenPolicy.KEEP)

    def piece(self, token_id: int) -> str:
        """One token as text, for showing people their data (▁ marks a space in sentencepiece)."""
        return self.raw.id_to_piece(token_id)


def get_encoder(version: str, path: str | Path | None = None) -> MistralEncoder:
    """The encoder for `version`, with its tokenizer from `path` if given (one per file, cached)."""
    return _encoder(version, None if path is None else str(Path(path).absolute()))


@lru_cache(maxsize=None)
def _encoder(version: str, path: str | None) -> MistralEncoder:
    return MistralEncoder(version, path)
