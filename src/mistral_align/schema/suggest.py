"""Did you mean: the setting a misspelt or foreign key stands for.

    unknown_key_message("sft.train.learning_rate", RecipeConfig)
    # "sft.train.learning_rate: not a setting of mistral-align; did you mean `sft.train.lr`? (TRL's name)"
    unknown_option_message("model", "mistral-8b", options)
    # "model=mistral-8b: no such model config; did you mean `ministral-8b-instruct-2410`? ..."

Users type the names of the libraries they know (TRL's and transformers' `learning_rate`,
axolotl's `micro_batch_size`, peft's `lora_alpha`): FOREIGN_NAMES maps them to ours. Anything else
is matched by spelling (difflib) against the keys of the node it was written in, then against every
key of the schema (`train.lr` -> `sft.train.lr` or `dpo.train.lr`).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from functools import lru_cache

# name users type -> ours: a key of the same node ("lr"), a dotted path ("run.seed"), or a group
# choice ("quant=nf4"). Where a library spells it too, that library is named in the message.
FOREIGN_NAMES: dict[str, tuple[str, str]] = {
    "learning_rate": ("lr", "TRL's and transformers' name"),
    "num_train_epochs": ("epochs", "TRL's and transformers' name"),
    "num_epochs": ("epochs", "axolotl's name"),
    "gradient_accumulation_steps": ("grad_accum", "TRL's and transformers' name"),
    "per_device_train_batch_size": ("per_device_batch_size", "TRL's and transformers' name"),
    "micro_batch_size": ("per_device_batch_size", "axolotl's name"),
    "batch_size": ("per_device_batch_size", ""),
    "lr_scheduler_type": ("lr_scheduler", "TRL's and transformers' name"),
    "optimizer": ("optim", "axolotl's name"),
    "max_seq_length": ("max_length", "TRL's former name"),
    "sequence_len": ("max_length", "axolotl's name"),
    "cutoff_len": ("max_length", "LLaMA-Factory's name"),
    "warmup": ("warmup_ratio", ""),
    "fp16": ("bf16", "mixed precision here is bf16 or none"),
    "lora_r": ("peft.r", "peft's and axolotl's name"),
    "lora_rank": ("peft.r", "LLaMA-Factory's name"),
    "lora_alpha": ("peft.alpha", "peft's name"),
    "lora_dropout": ("peft.dropout", "peft's name"),
    "lora_target_modules": ("peft.target_modules", "axolotl's name"),
    "lora_target": ("peft.target_modules", "LLaMA-Factory's name"),
    "model_name_or_path": ("model.hub_id", "TRL's name; or pick a configs/model/ file with model=NAME"),
    "base_model": ("model.hub_id", "axolotl's name; or pick a configs/model/ file with model=NAME"),
    "torch_dtype": ("model.dtype", "transformers' name"),
    "load_in_4bit": ("quant=nf4", "transformers' name"),
    "load_in_8bit": ("quant=int8", "transformers' name"),
    "use_peft": ("peft=lora", "TRL's name"),
    "seed": ("run.seed", ""),
    "output_dir": ("run.output_dir", "TRL's name; run.dir names the run directory itself"),
    "report_to": ("run.report_to", ""),
    "resume_from_checkpoint": ("run.resume", "transformers' name"),
    "push_to_hub": ("hub.push", "transformers' name"),
    "hub_model_id": ("hub.repo_id", "transformers' name"),
    "hub_private_repo": ("hub.private", "transformers' name"),
    "beta": ("dpo.beta", ""),
    "rl_beta": ("dpo.beta", "axolotl's name"),
    "pref_beta": ("dpo.beta", "LLaMA-Factory's name"),
    "orpo_alpha": ("dpo.beta", "axolotl's name for ORPO's lambda; here dpo.beta with dpo.objective=orpo"),
    "rl": ("dpo.objective", "axolotl's name: dpo.objective=dpo|kto|orpo|simpo"),
    "pref_loss": ("dpo.objective", "LLaMA-Factory's name: dpo.objective=dpo|kto|orpo|simpo"),
    "kto_desirable_weight": ("desirable_weight", "axolotl's name"),
    "kto_undesirable_weight": ("undesirable_weight", "axolotl's name"),
    "kto_chosen_weight": ("desirable_weight", "LLaMA-Factory's name"),
    "kto_rejected_weight": ("undesirable_weight", "LLaMA-Factory's name"),
    "gamma_beta_ratio": ("simpo_gamma", "the SimPO paper's gamma/beta; here gamma itself, dpo.simpo_gamma"),
    "max_prompt_length": ("max_length", "TRL's name; here a pair is cut as a whole"),
    "dataset_name": ("data.train", "TRL's name: list sources as data.train=[{path: ID_OR_FILE}]"),
}


def _node_type(tp):
    """The dataclass a field's type holds (through Optional and list), or None for a leaf or a free dict."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Union:
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            tp = args[0] if len(args) == 1 else None
        elif origin is list:
            tp = typing.get_args(tp)[0]
        else:
            break
    return tp if dataclasses.is_dataclass(tp) else None


def _fields(cls) -> dict[str, object]:
    hints = typing.get_type_hints(cls)
    return {f.name: _node_type(hints[f.name]) for f in dataclasses.fields(cls)}


@lru_cache(maxsize=4)
def all_keys(root) -> tuple[str, ...]:
    """Every dotted key of the schema `root` (list elements: the list's key, then the element's fields)."""
    out: list[str] = []

    def walk(cls, prefix: str) -> None:
        for name, sub in _fields(cls).items():
            out.append(prefix + name)
            if sub is not None:
                walk(sub, f"{prefix}{name}.")

    walk(root, "")
    return tuple(out)


def _close(name: str, names, cutoff: float) -> list[str]:
    return difflib.get_close_matches(name, list(names), n=2, cutoff=cutoff)


def _elsewhere(root, name: str, top: str | None) -> list[str]:
    """Keys of the whole schema ending in `name`, or spelt like it; those under `top` first."""
    keys = all_keys(root)
    same = [k for k in keys if k.rsplit(".", 1)[-1] == name]
    if not same:
        leaves = {k.rsplit(".", 1)[-1] for k in keys}
        close = set(_close(name, leaves, 0.8))
        same = [k for k in keys if k.rsplit(".", 1)[-1] in close]
    near = [k for k in same if top is not None and k.split(".", 1)[0] == top]
    return (near or same)[:2]


def suggest_key(full_key: str, root) -> tuple[list[str], str]:
    """What `full_key` (dotted; list indices allowed) of the schema `root` (a dataclass) may have
    meant, and why (a library's name, or "")."""
    parts = [p for p in re.sub(r"\[\d*\]", "", full_key).split(".") if p]
    cls, prefix = root, []
    for i, part in enumerate(parts):
        fields = _fields(cls)
        if part in fields and fields[part] is not None:
            cls, prefix = fields[part], [*prefix, part]
            continue
        if part in fields:  # a leaf with something after it: `sft.train.lr.x`
            return [], ""
        rest = ".".join(parts[i:])
        if i + 1 < len(parts):  # `train.max_length`: a path that exists one node further down
            found = [k for k in all_keys(root) if k.endswith("." + rest) and k.startswith(".".join(prefix))]
            if found:
                return found[:2], ""
        return _suggest_at(root, prefix, part, fields)
    return [], ""


def _suggest_at(root, prefix: list[str], name: str, fields: dict) -> tuple[list[str], str]:
    here = ".".join(prefix) + "." if prefix else ""
    top = prefix[0] if prefix else None
    target, why = FOREIGN_NAMES.get(name.lower(), (None, ""))
    if target is not None:
        if "=" in target:
            return [target], why
        if "." in target:
            if target.split(".", 1)[0] in _fields(root):  # a shared node's key: run.seed
                return [target], why
            found = [k for k in all_keys(root) if k.endswith("." + target)]  # a stage's: data.train
            near = [k for k in found if top is not None and k.startswith(top + ".")]
            return (near or found)[:2], why
        if target in fields:
            return [here + target], why
        return _elsewhere(root, target, top), why
    close = _close(name, fields, 0.7)
    if close:
        return [here + c for c in close], ""
    return _elsewhere(root, name, top), ""


def _did_you_mean(candidates: list[str], why: str) -> str:
    if not candidates:
        return ""
    listed = " or ".join(f"`{c}`" for c in candidates)
    return f"; did you mean {listed}?" + (f" ({why})" if why else "")


def unknown_key_message(full_key: str, root) -> str:
    """One line for a key the schema `root` (schema/recipe.py's RecipeConfig) does not have."""
    candidates, why = suggest_key(full_key, root)
    hint = _did_you_mean(candidates, why) or "; `--cfg job` prints every setting"
    return f"{full_key}: not a setting of mistral-align{hint}"


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[-_.]", name.lower()) if t]


def _option_score(name: str, option: str) -> tuple[float, float]:
    """How many of `name`'s parts (split at - _ .) `option` has, spelt (nearly) alike, then how alike
    the whole names are: `mistral-8b` is nearest `ministral-8b-instruct-2410`, not `mixtral-8x7b`."""
    parts = _tokens(option)
    near = [max((difflib.SequenceMatcher(None, t, o).ratio() for o in parts), default=0.0) for t in _tokens(name)]
    shared = sum(r for r in near if r >= 0.85) / max(len(near), 1)
    return shared, difflib.SequenceMatcher(None, name.lower(), option.lower()).ratio()


def unknown_option_message(group: str, name: str, options: list[str]) -> str:
    """One line for `group=name` where configs/<group>/ has no `name`.yaml."""
    ranked = sorted(options, key=lambda o: _option_score(name, o), reverse=True)
    close = [o for o in ranked if _option_score(name, o)[0] > 0 or _option_score(name, o)[1] >= 0.6][:3]
    hint = f"; did you mean {' or '.join(f'`{group}={c}`' for c in close)}?" if close else ""
    return f"{group}={name}: no {group} config of that name{hint} (configs/{group}/ has {', '.join(options)})"
