"""Conversations and their exact Mistral encodings (ids and loss masks)."""

from mistral_align.chat.schema import (
    ConversationError,
    Message,
    Preference,
    parse_preference,
    parse_sft_messages,
    parse_sft_row,
)
from mistral_align.chat.encoder import IGNORE_INDEX, TOKENIZER_VERSIONS, DpoEncoding, MistralEncoder, SftEncoding, get_encoder

__all__ = [
    "IGNORE_INDEX",
    "TOKENIZER_VERSIONS",
    "ConversationError",
    "DpoEncoding",
    "Message",
    "MistralEncoder",
    "Preference",
    "SftEncoding",
    "get_encoder",
    "parse_preference",
    "parse_sft_messages",
    "parse_sft_row",
]
