"""Conversations and their exact Mistral encodings (ids and loss masks)."""

from mistral_align.chat.schema import (
    Conversation,
    ConversationError,
    Message,
    Preference,
    Tool,
    ToolCall,
    parse_preference,
    parse_sft_messages,
    parse_sft_row,
)
from mistral_align.chat.encoder import IGNORE_INDEX, TOKENIZER_VERSIONS, DpoEncoding, MistralEncoder, SftEncoding, get_encoder
from mistral_align.chat.tool_ids import regenerate_tool_call_ids

__all__ = [
    "IGNORE_INDEX",
    "TOKENIZER_VERSIONS",
    "Conversation",
    "ConversationError",
    "DpoEncoding",
    "Message",
    "MistralEncoder",
    "Preference",
    "SftEncoding",
    "Tool",
    "ToolCall",
    "get_encoder",
    "parse_preference",
    "parse_sft_messages",
    "parse_sft_row",
    "regenerate_tool_call_ids",
]
