"""A Hugging Face tokenizer directory that is byte-exact with mistral-common.

`save_hf_tokenizer(version, dir)` writes the native tokenizer file that mistral-common ships
(`tokenizer.model.v1|v2|v3|v7`, or `tekken.json` for v3-tekken; for v7-tekken, v11 and v13 the
tekken file made from the shipped one, see `tekken_files.py`), or, with `source=`, the file a run
encoded with (its model repository's own, model/tokenizer_file.py), and a `tokenizer_config.json`
naming `MistralCommonBackend`, so `AutoTokenizer.from_pretrained(dir)` loads transformers'
wrapper around mistral-common itself. A fast tokenizer converted from the sentencepiece file is
not used because it is not exact in transformers 5 (leading and double spaces, and a user typing
`[INST]` gets the control token); with this backend `apply_chat_template(...,
add_generation_prompt=True)` equals `MistralEncoder.encode_prompt` for every version.

What the loaded tokenizer exposes (transformers 5.23, mistral-common 1.13):

- `bos_token_id` 1, `eos_token_id` 2 for every version.
- Padding: `AutoTokenizer` ignores everything in `tokenizer_config.json` except the class, so a
  plain `AutoTokenizer.from_pretrained(dir)` always pads on the left (the class default, right for
  batched generation) and has an unbounded `model_max_length`. `load_hf_tokenizer` reads the
  `padding_side` / `model_max_length` written here and passes them on; the default written is
  "left" so both ways of loading agree.
- Pad token: tekken (every tekken version) has a real `<pad>` (id 11). The sentencepiece versions (v1, v2, v3, v7) have
  none: the backend names `<pad>`, which is not in their vocabulary and silently maps to id 0,
  the `<unk>` piece. TRL's trainers reject a pad token that is not in the vocabulary, so
  `load_hf_tokenizer` renames it `<unk>`: the same id 0, now a real token. It is deliberately
  not EOS: code that masks labels where `input_ids == pad_token_id` would otherwise stop the
  model learning to end its turns. Pad positions never reach the loss either way (TRL masks them
  with the attention mask / -100 labels).

TRL 1.16 with this tokenizer as `processing_class` (data already tokenized by `MistralEncoder`):

- `SFTTrainer` works with an `input_ids` + `labels` dataset: it sees `input_ids`, skips its own
  tokenization and keeps our labels as they are (only truncation to `max_length`, packing if
  asked). Needs a pad token that is in the vocabulary: load with `load_hf_tokenizer`, or pass
  `SFTConfig(pad_token="<unk>")` when using a plain `AutoTokenizer`.
- `DPOTrainer` has no pre-tokenized path: its `_prepare_dataset` always extracts prompts and
  tokenizes text (`chosen`/`rejected` columns), so a dataset of only `prompt_ids` / `chosen_ids`
  / `rejected_ids` fails there, whatever the tokenizer. Its collator, `DataCollatorForPreference`,
  consumes exactly those columns, so the minimal fix is a subclass whose `_prepare_dataset`
  returns the dataset unchanged; the tokenizer is then only used for `pad_token_id`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from mistral_align.chat.encoder import TOKENIZER_VERSIONS, tokenizer_file

# The names mistral-common's `get_one_valid_tokenizer_file` recognises in a directory: the shipped
# file names (e.g. `mistral_instruct_tokenizer_240323.model.v3`) carry the version suffix too, but
# the conventional Hub names are what other tools (vLLM, mistral-inference) look for.
NATIVE_FILE_NAMES = {
    "v1": "tokenizer.model.v1",
    "v2": "tokenizer.model.v2",
    "v3": "tokenizer.model.v3",
    "v7": "tokenizer.model.v7",
    "v3-tekken": "tekken.json",
    "v7-tekken": "tekken.json",
    "v11": "tekken.json",
    "v13": "tekken.json",
}
CONFIG_NAME = "tokenizer_config.json"
BACKEND_CLASS = "MistralCommonBackend"


def native_file(folder: str | Path, version: str) -> Path | None:
    """The tokenizer file of `version` in a folder written by `save_hf_tokenizer`, if it holds one."""
    path = Path(folder) / NATIVE_FILE_NAMES[version]
    return path if path.is_file() else None


def save_hf_tokenizer(
    version: str,
    out_dir: str | Path,
    *,
    source: str | Path | None = None,
    model_max_length: int | None = None,
    padding_side: str = "left",
) -> Path:
    """Write a tokenizer directory for `version` that `AutoTokenizer` loads exactly; returns it.
    `source`: the tokenizer file to copy (the run's own); None: mistral-common's for `version`."""
    if version not in TOKENIZER_VERSIONS:
        raise ValueError(f"unknown tokenizer version {version!r}; expected one of {', '.join(TOKENIZER_VERSIONS)}")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Another version's file left in the directory would be picked instead (tekken.json wins,
    # otherwise the last name in sorted order), so the directory must hold exactly one.
    for name in NATIVE_FILE_NAMES.values():
        if name != NATIVE_FILE_NAMES[version]:
            (out / name).unlink(missing_ok=True)
    target = out / NATIVE_FILE_NAMES[version]
    source = Path(source) if source is not None else tokenizer_file(version)
    if not (target.exists() and source.samefile(target)):  # a folder re-saved from its own file
        shutil.copyfile(source, target)
    config: dict = {
        "tokenizer_class": BACKEND_CLASS,
        # Read by `load_hf_tokenizer`; AutoTokenizer itself ignores them for this backend.
        "padding_side": padding_side,
        "mistral_tokenizer_version": version,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out


def load_hf_tokenizer(path: str | Path, **overrides):
    """Load a directory written by `save_hf_tokenizer` as a `MistralCommonBackend`.

    Honours the saved `padding_side` and `model_max_length` (keyword arguments override them) and
    gives the sentencepiece versions a pad token that exists in their vocabulary (see the module
    docstring). Raises if AutoTokenizer picked any other class, since that would not be exact.
    """
    from transformers import AutoTokenizer

    path = Path(path)
    config_file = path / CONFIG_NAME
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    kwargs = {k: config[k] for k in ("padding_side", "model_max_length") if k in config}
    kwargs.update(overrides)
    # Our own tokenizer folders: never the folder's Python code, whatever its config names.
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False, **kwargs)
    if type(tok).__name__ != BACKEND_CLASS:
        raise TypeError(
            f"{path}: AutoTokenizer loaded {type(tok).__name__}, not {BACKEND_CLASS}; its ids would not match "
            "mistral-common. Write the directory with save_hf_tokenizer."
        )
    if tok.pad_token not in tok.get_vocab():
        tok.pad_token = tok.unk_token
    return tok
