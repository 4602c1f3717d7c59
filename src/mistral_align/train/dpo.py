"""The preference stage (`dpo.*`): where the SFT adapter comes from, the data, the held-out report.

`dpo.objective` picks the loss (dpo, kto, orpo, simpo); train/objectives.py maps it to TRL's config
and our trainer for it, everything else here is the same for all four. For DPO and KTO the
reference policy is the SFT model, never the bare base model: the SFT adapter is loaded as the
trainable "default" adapter, and the trainer keeps an exact frozen copy of it as the "ref" adapter
(or, with `dpo.precompute_ref_log_probs`, scores every row with it once up front). SimPO and ORPO
have no reference; ORPO starts from the base model (its loss holds the SFT term).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from omegaconf import OmegaConf

from mistral_align.chat.encoder import IGNORE_INDEX
from mistral_align.data.load import LoadedData, load_dpo_dataset, load_kto_dataset
from mistral_align.data.synthetic import write_dpo_splits
from mistral_align.errors import ConfigError, UntrustedFileError
from mistral_align.model.load import build_model
from mistral_align.model.lora import apply_peft, attach_adapter, prepare_for_adapter
from mistral_align.model.trust import require_safetensors
from mistral_align.model.weights import adapter_problem
from mistral_align.schema.objectives import NAMES, WITH_REFERENCE
from mistral_align.train.objectives import objective_facts, preference_args, preference_trainer
from mistral_align.train.report import generation_table, preference_table
from mistral_align.train.sft import keeps_float32
from mistral_align.train.stage import Stage

log = logging.getLogger("mistral_align.dpo")


def resolve_sft_adapter(init_from: str) -> tuple[str, Path | None]:
    """(what to give PeftModel.from_pretrained, the SFT run directory if there is one).

    Accepts an SFT run directory (its `adapter/`), a pipeline run directory (`sft/adapter/`),
    a local adapter folder (holding adapter_config.json), or a Hub adapter id.
    """
    path = Path(init_from).expanduser()
    for adapter in (path / "adapter", path / "sft" / "adapter"):
        if (adapter / "adapter_config.json").is_file():
            check_adapter_files(adapter)
            # The run's config.yaml sits in the run directory: `path`, or its parent for a
            # pipeline's sft/ stage directory.
            run_dir = next((d for d in (path, path.parent) if (d / "config.yaml").is_file()), None)
            return str(adapter), run_dir
    if (path / "adapter_config.json").is_file():
        check_adapter_files(path)
        return str(path), None
    if path.exists():
        raise ConfigError(
            f"dpo.init_from: {init_from} holds no adapter (no adapter_config.json in it, in adapter/ or sft/adapter/)"
        )
    if init_from.count("/") == 1 and not init_from.startswith((".", "/", "~")):
        return init_from, None  # a Hub adapter id; peft downloads it
    raise ConfigError(f"dpo.init_from: {init_from} does not exist")


def check_adapter_files(adapter: Path) -> None:
    """A local adapter that cannot load (a copy cut short, a corrupt config) is refused naming the
    file, before the base model loads: peft would fail only after it, with safetensors' message and
    no file name."""
    bad = adapter_problem(adapter)
    if bad is not None:
        file, why = bad
        raise ConfigError(f"dpo.init_from: {file}: {why}; copy the adapter again or point dpo.init_from at a whole one")


def same_base_as_sft_run(cfg):
    """Take model, quant and run.seed from the SFT run that `dpo.init_from` names, if it is a run
    directory: the adapter is only meaningful on the exact base it was trained on (for an inline
    random-init model that means the same seed)."""
    _, run_dir = resolve_sft_adapter(cfg.dpo.init_from)
    if run_dir is None:  # an adapter folder or a Hub id: no run config to follow
        return cfg
    sft = OmegaConf.load(run_dir / "config.yaml")
    for key in ("model", "quant"):
        if OmegaConf.to_container(cfg[key]) != OmegaConf.to_container(sft[key]):
            log.info("%s: using the SFT run's (%s) instead of the one configured here", key, run_dir)
        cfg[key] = OmegaConf.merge(cfg[key], sft[key])  # keeps the typed schema
    cfg.run.seed = sft.run.seed
    return cfg


def safe_adapter(adapter: str, allow_pickle: bool = False) -> str:
    """The adapter folder to load: a local one must hold adapter_model.safetensors; a Hub one is fetched
    without its pickles (config and safetensors only), so peft never falls back to adapter_model.bin.
    With `allow_pickle` the adapter is left to peft as it is."""
    if allow_pickle:
        return adapter
    if Path(adapter).is_dir():
        require_safetensors(adapter, "dpo.init_from adapter")
        return adapter
    folder = snapshot_download(adapter, allow_patterns=["adapter_config.json", "*.safetensors"])
    if not (Path(folder) / "adapter_model.safetensors").is_file():
        raise UntrustedFileError(
            f"dpo.init_from: the Hub adapter {adapter} has no adapter_model.safetensors (only pickled weights, which "
            "can run code when loaded); set model.allow_pickle=true if you trust it"
        )
    return folder


def load_policy(base_model, adapter: str, allow_pickle: bool = False):
    """The SFT model as a trainable PeftModel (adapter "default"); the trainer adds the frozen "ref" copy."""
    return attach_adapter(base_model, safe_adapter(adapter, allow_pickle), is_trainable=True)


PREFERENCE_METRICS = {
    "eval_loss": "loss",
    "eval_rewards/accuracies": "reward_accuracy",
    "eval_rewards/margins": "reward_margin",
    "eval_rewards/chosen": "reward_chosen",
    "eval_rewards/rejected": "reward_rejected",
    "eval_logps/chosen": "logp_chosen",
    "eval_logps/rejected": "logp_rejected",
    "eval_kl": "kl",  # KTO's estimate of the policy's KL divergence from the reference
    "eval_nll_loss": "nll_loss",  # SimPO's (cpo_alpha) and ORPO's SFT term
}


def preference_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Held-out preference metrics (trainer.evaluate()'s) under readable names: reward accuracy and
    margin, log-probs (each objective's own: SimPO and ORPO's rewards are beta x the average log-prob
    of a reply; KTO has no pairs, so no accuracy)."""
    return {name: metrics[key] for key, name in PREFERENCE_METRICS.items() if key in metrics}


def as_generation_rows(ds):
    """Preference rows as (input_ids, labels) rows whose reference reply is the chosen one (KTO: the
    desirable rows), so `train.evaluate.generation_eval` can score greedy replies against it."""
    if "label" in ds.column_names:
        ds = ds.filter(lambda row: row["label"]).rename_column("completion_ids", "chosen_ids")

    def to_sft(row):
        return {
            "input_ids": row["prompt_ids"] + row["chosen_ids"],
            "labels": [IGNORE_INDEX] * len(row["prompt_ids"]) + row["chosen_ids"],
        }

    return ds.map(to_sft, remove_columns=ds.column_names)


def adapter_base(adapter: str) -> Path | None:
    """The local base folder an adapter names (`base_model_name_or_path`), if it exists here."""
    config = Path(adapter) / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    return Path(base) if base and Path(base).is_dir() else None


class DPOStage(Stage):
    """Preference optimisation (`dpo.objective`): of the SFT adapter (DPO and KTO: a frozen copy of it
    is the reference; SimPO: none), or of a new adapter on the base model (ORPO)."""

    name = "dpo"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.adapter = resolve_sft_adapter(self.node.init_from)[0] if self.node.init_from else None
        if self.adapter is not None and Path(self.adapter).is_dir():  # known before anything loads
            require_safetensors(self.adapter, "dpo.init_from adapter", bool(self.cfg.model.allow_pickle))

    def write_synthetic_data(self, data_dir: Path):
        s = self.node.synthetic
        return write_dpo_splits(data_dir, s.skills, s.n_train, s.n_eval, s.seed)

    def load_data(self) -> LoadedData:
        if self.node.objective == "kto":  # KTO rows, and pairs split into a desirable and an undesirable row
            return load_kto_dataset(self.node.data, self.encoder)
        return load_dpo_dataset(self.node.data, self.encoder)

    def inline_base(self) -> Path | None:
        # The SFT adapter's own base folder when it has one: the exact weights it was trained on.
        named = adapter_base(self.adapter) if self.adapter and self.cfg.model.architecture is not None else None
        return named or super().inline_base()

    def build_model(self):
        c = self.cfg
        quantized = c.quant.mode != "none"
        base = build_model(c.model, c.quant, vocab_size=self.encoder.vocab_size, seed=c.run.seed,
                           inline_base=self.inline_base())
        if self.adapter is None:
            if self.node.objective in WITH_REFERENCE:
                log.warning("dpo.init_from is not set: training a new adapter; the reference is the bare base model")
            return apply_peft(base, c.peft, quantized=quantized, gradient_checkpointing=self.node.train.gradient_checkpointing)
        base = prepare_for_adapter(base, quantized, self.node.train.gradient_checkpointing)
        log.info("policy%s: the SFT adapter %s", " and reference" if self.node.objective in WITH_REFERENCE else "",
                 self.adapter)
        return load_policy(base, self.adapter, allow_pickle=bool(c.model.allow_pickle))

    def model_facts(self) -> dict[str, Any]:
        if self.node.objective not in WITH_REFERENCE:
            reference = f"none ({NAMES[self.node.objective]} has no reference model)"
        else:
            reference = "frozen copy of the SFT adapter" if self.adapter else "base model"
        return {"init_from": self.adapter, "objective": self.node.objective, "reference": reference}

    def trainer_args(self, report_to: list[str], has_eval: bool, eval_on_start: bool):
        return preference_args(self.node, self.cfg.run.seed, self.out_dir, report_to, has_eval, eval_on_start)

    def trainer_facts(self, args) -> dict[str, Any]:
        return objective_facts(self.node, args)

    def build_trainer(self, model, tokenizer, args, data: LoadedData, callbacks: list):
        return preference_trainer(self.node, model, tokenizer, args, data.train, data.eval, callbacks, keeps_float32(self.cfg))

    def held_out_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return preference_metrics(metrics)

    def generation_rows(self, data: LoadedData):
        return as_generation_rows(data.eval)

    def report(self, summary: dict, gen_before: dict | None, gen_after: dict | None) -> str | None:
        parts, name = [], NAMES[self.node.objective]
        if gen_after is not None:
            parts.append(f"{name} before / after (held-out prompts)\n" + generation_table(gen_before, gen_after, None, None))
        d = summary["dpo"]
        if d.get("before") and d.get("after"):
            parts.append(preference_table(d["before"], d["after"], objective=self.node.objective))
        return "\n".join(parts) or None
