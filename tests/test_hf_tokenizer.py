"""The tokenizer directory we ship with adapters: AutoTokenizer must load mistral-common's own
backend, and its chat template must give exactly our generation-prompt ids."""

from __future__ import annotations

import json

import pytest

from mistral_align.chat.encoder import TOKENIZER_VERSIONS, get_encoder
from mistral_align.chat.hf_tokenizer import NATIVE_FILE_NAMES, load_hf_tokenizer, save_hf_tokenizer
from mistral_align.chat.schema import parse_messages
from mistral_align.names import TEKKEN_VERSIONS

TRICKY = "[INST] x [/INST] <s></s> [SYSTEM_PROMPT] [THINK] [ARGS] [CALL_ID]"

GENERATION_PROMPTS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "user", "content": "  leading and trailing  "}],
    [{"role": "user", "content": "double  spaces\n\nand newlines\n"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Why?"}],
    [
        {"role": "system", "content": " system with spaces \n"},
        {"role": "user", "content": TRICKY},
        {"role": "assistant", "content": "reply  "},
        {"role": "user", "content": "你好 🎉 héllo 👨‍👩‍👧"},
    ],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": TRICKY},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three [/INST]"},
    ],
]


@pytest.fixture(scope="module", params=TOKENIZER_VERSIONS)
def saved(request, tmp_path_factory):
    version = request.param
    return version, save_hf_tokenizer(version, tmp_path_factory.mktemp(version.replace("-", "_")))


def test_directory_holds_the_native_file_and_a_config(saved):
    version, path = saved
    assert sorted(p.name for p in path.iterdir()) == sorted([NATIVE_FILE_NAMES[version], "tokenizer_config.json"])
    config = json.loads((path / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "MistralCommonBackend"
    assert config["mistral_tokenizer_version"] == version


def test_autotokenizer_chat_template_equals_encode_prompt(saved):
    from transformers import AutoTokenizer

    version, path = saved
    tok = AutoTokenizer.from_pretrained(str(path))
    assert type(tok).__name__ == "MistralCommonBackend"
    enc = get_encoder(version)
    for raw in GENERATION_PROMPTS:
        ids = tok.apply_chat_template(raw, add_generation_prompt=True, tokenize=True)["input_ids"]
        assert ids == enc.encode_prompt(parse_messages(raw)), raw
    assert tok.bos_token_id == enc.bos_id and tok.eos_token_id == enc.eos_id


def test_load_hf_tokenizer_ids_and_padding(saved):
    version, path = saved
    tok = load_hf_tokenizer(path)
    enc = get_encoder(version)
    raw = GENERATION_PROMPTS[4]
    assert tok.apply_chat_template(raw, add_generation_prompt=True)["input_ids"] == enc.encode_prompt(
        parse_messages(raw)
    )
    assert tok.padding_side == "left"
    # A pad token TRL accepts (it must be in the vocabulary), and never EOS.
    assert tok.pad_token in tok.get_vocab()
    assert tok.pad_token_id == (11 if version in TEKKEN_VERSIONS else 0)
    assert tok.pad_token_id != tok.eos_token_id
    batch = tok.pad([{"input_ids": [5, 6, 7]}, {"input_ids": [5]}])
    assert batch["input_ids"][1] == [tok.pad_token_id, tok.pad_token_id, 5]
    assert batch["attention_mask"][1] == [0, 0, 1]


def test_saved_padding_side_and_max_length_are_honoured_by_load_only(tmp_path):
    from transformers import AutoTokenizer

    path = save_hf_tokenizer("v3", tmp_path, model_max_length=4096, padding_side="right")
    tok = load_hf_tokenizer(path)
    assert (tok.padding_side, tok.model_max_length) == ("right", 4096)
    assert load_hf_tokenizer(path, padding_side="left").padding_side == "left"
    # transformers passes nothing from tokenizer_config.json to this backend; if that changes,
    # the module docstring (and maybe the default written) should change with it.
    plain = AutoTokenizer.from_pretrained(str(path))
    assert plain.padding_side == "left" and plain.model_max_length > 10**20


def test_resaving_another_version_replaces_the_file(tmp_path):
    save_hf_tokenizer("v3-tekken", tmp_path)
    save_hf_tokenizer("v1", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model.v1", "tokenizer_config.json"]
    tok = load_hf_tokenizer(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True)[
        "input_ids"
    ] == get_encoder("v1").encode_prompt(parse_messages([{"role": "user", "content": "hi"}]))


@pytest.mark.parametrize("version", ["v1", "v3-tekken", "v13"])
def test_a_model_config_beside_it_does_not_change_the_class(tmp_path, version):
    # Adapters and merged models are saved in the same directory as a Mistral config.json.
    from transformers import MistralConfig

    path = save_hf_tokenizer(version, tmp_path)
    MistralConfig(vocab_size=get_encoder(version).vocab_size).save_pretrained(path)
    assert type(load_hf_tokenizer(path)).__name__ == "MistralCommonBackend"


def test_unknown_version_and_padding_side_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown tokenizer version"):
        save_hf_tokenizer("v4", tmp_path)
    with pytest.raises(ValueError, match="padding_side"):
        save_hf_tokenizer("v3", tmp_path, padding_side="middle")


# ---------------------------------------------------------------------------------------------
# TRL 1.16: the tokenizer as processing_class with data we already tokenized
# ---------------------------------------------------------------------------------------------


def _tiny_model(vocab_size: int):
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    return MistralForCausalLM(config)


@pytest.mark.slow
def test_trl_sft_trainer_keeps_our_ids_and_labels(tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from mistral_align.chat.schema import parse_sft_messages

    enc = get_encoder("v3")
    path = save_hf_tokenizer("v3", tmp_path / "tok")
    rows = []
    for n in (1, 3):
        e = enc.encode_sft(
            parse_sft_messages([{"role": "user", "content": "hi " * n}, {"role": "assistant", "content": "yo " * n}])
        )
        rows.append({"input_ids": e.input_ids, "labels": e.labels})
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True, max_length=64)

    # A plain AutoTokenizer names "<pad>", which the sentencepiece vocabularies lack: TRL refuses it.
    with pytest.raises(ValueError, match="pad_token"):
        SFTTrainer(
            model=_tiny_model(enc.vocab_size),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(str(path)),
        )

    trainer = SFTTrainer(
        model=_tiny_model(enc.vocab_size),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=load_hf_tokenizer(path),
    )
    prepared = [trainer.train_dataset[i] for i in range(len(rows))]
    assert [(p["input_ids"], p["labels"]) for p in prepared] == [(r["input_ids"], r["labels"]) for r in rows]
    batch = trainer.data_collator(prepared)
    short = len(rows[0]["input_ids"])
    assert batch["input_ids"][0, :short].tolist() == rows[0]["input_ids"]
    assert batch["labels"][0, :short].tolist() == rows[0]["labels"]
    assert set(batch["labels"][0, short:].tolist()) == {-100}
    assert set(batch["input_ids"][0, short:].tolist()) == {0}


@pytest.mark.slow
def test_trl_dpo_trainer_needs_a_pretokenized_subclass(tmp_path):
    import copy

    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from mistral_align.chat.schema import parse_preference

    enc = get_encoder("v1")
    tok = load_hf_tokenizer(save_hf_tokenizer("v1", tmp_path / "tok"))
    rows = []
    for n in (1, 2):
        p = enc.encode_dpo(parse_preference({"prompt": "q" * n, "chosen": "good", "rejected": "bad " * n}))
        rows.append({"prompt_ids": p.prompt_ids, "chosen_ids": p.chosen_ids, "rejected_ids": p.rejected_ids})
    args = DPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, report_to=[], use_cpu=True, max_length=64)

    def build(cls):
        model = _tiny_model(enc.vocab_size)
        return cls(
            model=model,
            ref_model=copy.deepcopy(model),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tok,
        )

    # DPOTrainer always re-derives prompts from text columns: ids alone are not accepted.
    with pytest.raises(KeyError, match="chosen"):
        build(DPOTrainer)

    class PretokenizedDPOTrainer(DPOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset

    trainer = build(PretokenizedDPOTrainer)
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    first = rows[0]
    chosen = first["prompt_ids"] + first["chosen_ids"]
    assert batch["input_ids"][0, : len(chosen)].tolist() == chosen
    assert batch["completion_mask"][0].tolist()[: len(chosen)] == [0] * len(first["prompt_ids"]) + [1] * len(
        first["chosen_ids"]
    )
