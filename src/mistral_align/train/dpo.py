"""The DPO stage: where the SFT adapter comes from, the trainer arguments, the held-out report.

The reference policy is the SFT model, never the bare base model: the SFT adapter is loaded as the
trainable "default" adapter, and `PretokenizedDPOTrainer` keeps an exact frozen copy of it as the
"ref" adapter (or, with `dpo.precompute_ref_log_probs`, scores every pair with it once up front).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from omegaconf import OmegaConf

from mistral_align.chat.encoder import IGNORE_INDEX
from mistral_align.data.load import LoadedData, load_dpo_dataset
from mistral_align.data.synthetic import write_dpo_splits
from mistral_align.errors import ConfigError, UntrustedFileError
from mistral_align.model.load import build_model
from mistral_align.model.lora import apply_peft, attach_adapter, prepare_for_adapter
from mistral_align.model.trust import require_safetensors
from mistral_align.model.weights import adapter_problem
from mistral_align.schema.recipe import stage_max_length
from mistral_align.train.args import training_arguments
from mistral_align.train.dpo_trainer import PretokenizedDPOTrainer
from mistral_align.train.report import generation_table, preference_table
from mistral_align.train.sft import keeps_float32
from mistral_align.train.stage import Stage, build_trainer

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
}


def preference_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Held-out preference metrics (trainer.evaluate()'s) under readable names: reward accuracy and margin, log-probs."""
    return {name: metrics[key] for key, name in PREFERENCE_METRICS.items() if key in metrics}


def as_generation_rows(dpo_ds):
    """Preference rows as (input_ids, labels) rows whose reference reply is the chosen one,
    so `train.evaluate.generation_eval` can score greedy replies against it."""

    def to_sft(row):
        return {
            "input_ids": row["prompt_ids"] + row["chosen_ids"],
            "labels": [IGNORE_INDEX] * len(row["prompt_ids"]) + row["chosen_ids"],
        }

    return dpo_ds.map(to_sft, remove_columns=dpo_ds.column_names)


def make_dpo_args(stage_cfg: Any, seed: int, out_dir: Path, report_to: list[str], has_eval: bool,
                  eval_on_start: bool = False):
    """trl.DPOConfig from the typed `dpo` node (`dpo.train` for the optimiser, `dpo.*` for the objective)."""
    from trl import DPOConfig

    d = stage_cfg
    return DPOConfig(
        # The loader has already applied dpo.data.max_length (prompt + longer reply); TRL truncates
        # keep_start (BOS and the prompt through [/INST] always stay) only if dpo.train.max_length is lower.
        max_length=stage_max_length(d),
        truncation_mode="keep_start",
        beta=d.beta,
        loss_type=list(d.loss_type),
        loss_weights=list(d.loss_weights) if d.loss_weights is not None else None,
        label_smoothing=d.label_smoothing,
        precompute_ref_log_probs=d.precompute_ref_log_probs,
        **training_arguments(d.train, seed, out_dir, report_to, has_eval, eval_on_start),
    )


def build_dpo_trainer(model, tokenizer, args, train_ds, eval_ds=None, callbacks=(), keep_float32: bool = False,
                      padding_free: bool = False, shared_prompt: bool = False):
    """The DPO trainer on pre-tokenised preference rows (prompt_ids, chosen_ids, rejected_ids)."""
    return build_trainer(PretokenizedDPOTrainer, model, tokenizer, args, train_ds, eval_ds, callbacks, keep_float32,
                         padding_free=padding_free, shared_prompt=shared_prompt)


def adapter_base(adapter: str) -> Path | None:
    """The local base folder an adapter names (`base_model_name_or_path`), if it exists here."""
    config = Path(adapter) / "adapter_config.json"
    if not config.is_file():
        return None
    base = json.loads(config.read_text()).get("base_model_name_or_path")
    return Path(base) if base and Path(base).is_dir() else None


class DPOStage(Stage):
    """Direct preference optimisation of the SFT adapter; a frozen copy of it is the reference."""

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
            log.warning("dpo.init_from is not set: training a new adapter; the reference is the bare base model")
            return apply_peft(base, c.peft, quantized=quantized, gradient_checkpointing=self.node.train.gradient_checkpointing)
        base = prepare_for_adapter(base, quantized, self.node.train.gradient_checkpointing)
        log.info("policy and reference: the SFT adapter %s", self.adapter)
        return load_policy(base, self.adapter, allow_pickle=bool(c.model.allow_pickle))

    def model_facts(self) -> dict[str, Any]:
        return {"init_from": self.adapter,
                "reference": "frozen copy of the SFT adapter" if self.adapter else "base model"}

    def trainer_args(self, report_to: list[str], has_eval: bool, eval_on_start: bool):
        return make_dpo_args(self.node, self.cfg.run.seed, self.out_dir, report_to, has_eval, eval_on_start)

    def trainer_facts(self, args) -> dict[str, Any]:
        return {"beta": args.beta, "loss_type": list(args.loss_type), "precompute_ref_log_probs": args.precompute_ref_log_probs,
                "padding_free": self.node.padding_free or self.node.shared_prompt, "shared_prompt": self.node.shared_prompt}

    def build_trainer(self, model, tokenizer, args, data: LoadedData, callbacks: list):
        return build_dpo_trainer(model, tokenizer, args, data.train, data.eval, callbacks, keeps_float32(self.cfg),
                                 padding_free=self.node.padding_free, shared_prompt=self.node.shared_prompt)

    def held_out_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return preference_metrics(metrics)

    def generation_rows(self, data: LoadedData):
        return as_generation_rows(data.eval)

    def report(self, summary: dict, gen_before: dict | None, gen_after: dict | None) -> str | None:
        parts = []
        if gen_after is not None:
            table = generation_table(gen_before, gen_after, None, None, bars=summary["eval"].get("bars"))
            parts.append("DPO before / after (held-out prompts)\n" + table)
        d = summary["dpo"]
        if d.get("before") and d.get("after"):
            parts.append(preference_table(d["before"], d["after"]))
        return "\n".join(parts) or None
