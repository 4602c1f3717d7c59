"""Names and constants more than one layer spells: one definition each.

Every value here is plain data (no imports), so the config schema can check a choice against the
same list the code that acts on it uses, without importing that code.
"""

from __future__ import annotations

import re

# The stages a recipe can run, in pipeline order; each has its own config node (`sft.*`, `dpo.*`).
STAGES = ("sft", "dpo")
# What a finished stage keeps of its training, in its directory (rundir/layout.py): a LoRA adapter
# (peft adapter folder), or with peft=none (full fine-tuning) the whole model (a plain transformers folder).
ADAPTER_FOLDER = "adapter"
FULL_MODEL_FOLDER = "model"
# The recipes (recipes/NAME.py) and the stages each runs.
RECIPE_STAGES = {"sft": ("sft",), "dpo": ("dpo",), "sft_dpo": ("sft", "dpo")}

# The Mistral tokenizer versions mistral-align encodes exactly (chat/encoder.py): the five whose
# files mistral-common ships, then the three whose tekken files are derived (chat/tekken_files.py).
SHIPPED_TOKENIZER_VERSIONS = ("v1", "v2", "v3", "v7", "v3-tekken")
DERIVED_TOKENIZER_VERSIONS = ("v7-tekken", "v11", "v13")
TOKENIZER_VERSIONS = (*SHIPPED_TOKENIZER_VERSIONS, *DERIVED_TOKENIZER_VERSIONS)
TEKKEN_VERSIONS = frozenset({"v3-tekken", *DERIVED_TOKENIZER_VERSIONS})

# How a run is spread over several GPUs, as `mistral-align estimate --parallel` names it (what each
# splits among the GPUs: model/estimate.py SHARDED).
PARALLEL_KINDS = ("ddp", "zero1", "zero2", "zero3", "fsdp")

# `<stage>.data.tool_call_ids`: keep a row's tool call ids, or regenerate them in the version's form
# (chat/tool_ids.py).
TOOL_CALL_IDS = ("keep", "regenerate")

# The demo's synthetic skills (data/synthetic.py generates each).
SYNTHETIC_SKILLS = ("copy", "reverse", "add", "upper", "tool_call")

# A Hugging Face Hub repository id, OWNER/NAME (`hub.repo_id`, `mistral-align push --repo-id`).
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}$")

# Weight files that torch.load unpickles (and so may run code): never loaded without an explicit
# yes (model.allow_pickle / --allow-pickle), never uploaded.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
