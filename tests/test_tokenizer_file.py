"""The real file for a real model (model/tokenizer_file.py): a Hub model encodes with its repository's
own tokenizer file, fetched by mistral-common's own `download_tokenizer_from_hf_hub` through
huggingface_hub's cache; a local model folder with the file in it; `model.tokenizer_file`; the
derived and shipped files only as the fallback (said in one warning line) and for inline models;
a file of another version refused in one line. Nothing is mocked: the Hub is stood in for by a
cache laid out as huggingface_hub writes one, read offline, and by local folders."""

from __future__ import annotations

import hashlib
import json
import logging
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
from hub_standin import COMMIT, hub_cache, own_tekken
from mistral_common.protocol.instruct.messages import UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.tool_calls import Function, Tool
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from tool_rows import TOOLS

import mistral_align.model.tokenizer_file as tf
from mistral_align.chat.encoder import TokenizerFileError, get_encoder, tokenizer_file
from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from mistral_align.chat.schema import Message, parse_tools
from mistral_align.errors import ConfigError


def model_node(**kw):
    node = {"tokenizer_version": "v7-tekken", "tokenizer_file": None, "hub_id": None, "revision": None,
            "architecture": None}
    node.update(kw)
    return SimpleNamespace(**node)


@pytest.fixture(autouse=True)
def _fresh_resolver():
    tf._resolve.cache_clear()
    tf._warned.clear()
    yield
    tf._resolve.cache_clear()
    tf._warned.clear()


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """huggingface_hub reading only this cache, as with HF_HUB_OFFLINE=1 and HF_HUB_CACHE set."""
    cache = tmp_path / "hub"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_inline_model_uses_mistral_commons_file():
    source = tf.resolve_tokenizer_file(model_node(architecture={"hidden_size": 64}, hub_id=None))
    assert source.path == tokenizer_file("v7-tekken") and source.origin == "derived" and not source.fallback
    v3 = tf.resolve_tokenizer_file(model_node(tokenizer_version="v3", architecture={}))
    assert v3.origin == "mistral-common" and v3.sha256 == sha(tokenizer_file("v3"))


def test_a_hub_model_gets_its_repositorys_own_file_from_the_cache(offline_cache, tmp_path):
    own = own_tekken(tmp_path / "own" / "tekken.json", "v7-tekken")
    snapshot = hub_cache(offline_cache, "mistralai/Small-Standin", {"tekken.json": own, "config.json": "{}",
                                                                    "tokenizer.model.v7": "not read: tekken wins"})
    source = tf.resolve_tokenizer_file(model_node(hub_id="mistralai/Small-Standin"))
    assert source.path == snapshot / "tekken.json" and source.sha256 == sha(own) and not source.fallback
    assert source.origin == "hub:mistralai/Small-Standin@main" and source.own_file
    pinned = tf.resolve_tokenizer_file(model_node(hub_id="mistralai/Small-Standin", revision=COMMIT))
    assert pinned.path == source.path and pinned.origin == f"hub:mistralai/Small-Standin@{COMMIT}"


def test_the_encoder_uses_the_given_file_exactly(tmp_path):
    own = own_tekken(tmp_path / "tekken.json", "v7-tekken")
    ours, derived = get_encoder("v7-tekken", own), get_encoder("v7-tekken")
    assert ours.file == own and ours.file_sha256 == sha(own) and derived.file_sha256 != ours.file_sha256
    messages, tools = [Message("user", "Weather in Paris?")], parse_tools(TOOLS)
    ids = ours.encode_prompt(messages, tools=tools)
    reference = MistralTokenizer.from_file(str(own)).encode_chat_completion(ChatCompletionRequest(
        messages=[UserMessage(content="Weather in Paris?")],
        tools=[Tool(function=Function(**{k: v for k, v in t["function"].items()})) for t in TOOLS])).tokens
    assert ids == reference != derived.encode_prompt(messages, tools=tools)
    assert ours.text("Paris") == [i + 24 for i in derived.text("Paris")]  # the file's own text ids


def test_a_local_model_folder_is_its_own_repository(tmp_path):
    folder = tmp_path / "Small-local"
    own_tekken(folder / "tekken.json", "v7-tekken")
    (folder / "config.json").write_text("{}")
    source = tf.resolve_tokenizer_file(model_node(hub_id=str(folder)))
    assert source.path == folder / "tekken.json" and source.origin == f"folder:{folder}"
    explicit = tf.resolve_tokenizer_file(model_node(architecture={}, tokenizer_file=str(folder / "tekken.json")))
    assert explicit.path == folder / "tekken.json" and explicit.origin == f"file:{folder / 'tekken.json'}"


def test_a_file_that_cannot_be_had_falls_back_in_one_warning_line(offline_cache, tmp_path, caplog):
    bare = tmp_path / "no-tokenizer"
    bare.mkdir()
    (bare / "config.json").write_text("{}")
    for hub_id in ("mistralai/Not-Cached", str(bare)):
        tf._resolve.cache_clear()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="mistral_align"):
            tf.resolve_tokenizer_file(model_node(hub_id=hub_id), warn=False)  # another rank: finds it, says nothing
            assert not caplog.records
            source = tf.resolve_tokenizer_file(model_node(hub_id=hub_id))
            tf.resolve_tokenizer_file(model_node(hub_id=hub_id))  # a second stage: neither fetched nor said again
        assert source.path == tokenizer_file("v7-tekken") and source.fallback and not source.own_file
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "\n" not in warnings[0], warnings
        assert warnings[0].startswith(f"model: {hub_id}'s own tokenizer file could not be had (")
        assert "encoding with the one derived from mistral-common's Nemo tekken file for v7-tekken file" in warnings[0]


def test_a_file_of_another_version_is_refused_naming_both(offline_cache, tmp_path):
    own = own_tekken(tmp_path / "tekken.json", "v11")
    hub_cache(offline_cache, "mistralai/Other-Version", {"tekken.json": own})
    with pytest.raises(ConfigError) as e:
        tf.resolve_tokenizer_file(model_node(hub_id="mistralai/Other-Version"))
    message = str(e.value)
    assert message.startswith("model.tokenizer_version: ") and "is a tokenizer v11 file, not v7-tekken" in message
    assert "hub:mistralai/Other-Version@main" in message and "\n" not in message
    with pytest.raises(ConfigError, match=r"^model.tokenizer_file: /no/such/tekken.json: no such file$"):
        tf.resolve_tokenizer_file(model_node(tokenizer_file="/no/such/tekken.json"))
    (tmp_path / "bad" ).mkdir()
    (tmp_path / "bad" / "tekken.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a tokenizer file mistral-common can read"):
        tf.resolve_tokenizer_file(model_node(tokenizer_file=str(tmp_path / "bad" / "tekken.json")))
    with pytest.raises(TokenizerFileError):
        get_encoder("v3-tekken", own)


def test_the_saved_tokenizer_is_the_runs_own_file_and_encodes_tools_alike(tmp_path):
    own = own_tekken(tmp_path / "src" / "tekken.json", "v13")
    folder = save_hf_tokenizer("v13", tmp_path / "tokenizer", source=own)
    assert sha(folder / "tekken.json") == sha(own)
    save_hf_tokenizer("v13", folder, source=folder / "tekken.json")  # re-saving a folder from its own file
    assert sha(folder / "tekken.json") == sha(own)
    tok, enc = load_hf_tokenizer(folder), get_encoder("v13", folder / "tekken.json")
    prompt = [{"role": "user", "content": "Weather in 東京?"}]
    assert tok.apply_chat_template(prompt, tools=TOOLS, add_generation_prompt=True)["input_ids"] == \
        enc.encode_prompt([Message("user", "Weather in 東京?")], tools=parse_tools(TOOLS))
    assert json.loads((folder / "tokenizer_config.json").read_text())["mistral_tokenizer_version"] == "v13"
