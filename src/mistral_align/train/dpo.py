"""The preference stage (`dpo.*`): where the SFT adapter (or model) comes from, the data, the held-out report.

`dpo.objective` picks the loss (dpo, kto, orpo, simpo); train/objectives.py maps it to TRL's config
and our trainer for it, everything else here is the same for all four. For DPO and KTO the
reference policy is the SFT model, never the bare base model: the SFT adapter is loaded as the
trainable "default" adapter, and the trainer keeps an exact frozen copy of it as the "ref" adapter
(or, with `dpo.precompute_ref_log_probs`, scores every row with it once up front). SimPO and ORPO
have no reference; ORPO starts from the base model (its loss holds the SFT term).

Full fine-tuning (peft=none) continues the SFT run's whole model (its model/ folder): the policy is
that model, trainable, and the reference (DPO, KTO) a second copy loaded from the same folder, frozen
and in eval mode (the trainer prepares it for inference: no gradients, no optimizer state; about one
more copy of the weights in memory). With `dpo.precompute_ref_log_probs` no copy is kept: TRL scores
every row with the policy before its first step, when it still is the SFT model.
"""

from __future__ import annotations

import json
import logging
import tempfile
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
from mistral_align.model.mixtral_unfused import UnfusedMixtralForCausalLM, is_stock_adapter, write_unfused_adapter
from mistral_align.model.trust import require_safetensors
from mistral_align.model.weights import adapter_problem, model_problem
from mistral_align.names import FULL_MODEL_FOLDER
from mistral_align.schema.objectives import NAMES, WITH_REFERENCE
from mistral_align.train.objectives import objective_facts, preference_args, preference_trainer
from mistral_align.train.report import generation_table, preference_table
from mistral_align.train.sft import keeps_float32
from mistral_align.train.stage import Stage

log = logging.getLogger("mistral_align.dpo")


def resolve_init_from(init_from: str, peft_method: str | None = None) -> tuple[str, Path | None]:
    """(the SFT adapter or whole model to continue, the SFT run directory if there is one).

    Accepts an SFT run directory (its `adapter/`, or `model/` after full fine-tuning), a pipeline run
    directory (`sft/adapter/`, `sft/model/`), a local adapter folder (holding adapter_config.json), a
    local model folder (config.json: a full fine-tune, a merged model), or a Hub adapter id. With
    `peft_method`, one that method cannot continue is refused (`check_continues`).
    """
    found = _find_init_from(init_from)
    if peft_method is not None:
        check_continues(found[0], peft_method)
    return found


def _find_init_from(init_from: str) -> tuple[str, Path | None]:
    path = Path(init_from).expanduser()
    for stage_dir in (path, path / "sft"):
        for folder in (stage_dir / "adapter", stage_dir / FULL_MODEL_FOLDER):
            if _is_adapter(folder) or _is_whole_model(folder):
                check_files(folder)
                # The run's config.yaml sits in the run directory: `path`, or its parent for a
                # pipeline's sft/ stage directory.
                run_dir = next((d for d in (path, path.parent) if (d / "config.yaml").is_file()), None)
                return str(folder), run_dir
    if _is_adapter(path) or _is_whole_model(path):
        check_files(path)
        return str(path), None
    if path.exists():
        raise ConfigError(
            f"dpo.init_from: {init_from} holds no adapter or model (no adapter_config.json or config.json in it, "
            "in adapter/, model/, sft/adapter/ or sft/model/)"
        )
    if init_from.count("/") == 1 and not init_from.startswith((".", "/", "~")):
        return init_from, None  # a Hub adapter id; peft downloads it
    raise ConfigError(f"dpo.init_from: {init_from} does not exist")


def _is_adapter(folder: Path) -> bool:
    return (folder / "adapter_config.json").is_file()


def _is_whole_model(folder: Path) -> bool:
    return (folder / "config.json").is_file() and not _is_adapter(folder)


def is_whole_model(init_from: str) -> bool:
    """Whether a resolved `dpo.init_from` is a whole model (a full fine-tune) rather than an adapter."""
    return _is_whole_model(Path(init_from))


def check_continues(init_from: str, peft_method: str) -> None:
    """An adapter continues as an adapter, a whole model as a whole model: the other pairings are
    refused in one line before anything loads."""
    if is_whole_model(init_from) and peft_method != "none":
        raise ConfigError(
            f"dpo.init_from: {init_from} is a whole model (a full fine-tune), not an adapter; DPO continues it "
            "with peft=none (full fine-tuning)"
        )
    if not is_whole_model(init_from) and peft_method == "none":
        where = "a Hub id is read as an adapter" if not Path(init_from).exists() else f"{init_from} is a LoRA adapter"
        raise ConfigError(
            f"peft.method: 'none' (full fine-tuning) continues a whole model, but dpo.init_from: {where}; merge it "
            "first (mistral-align merge RUN --out DIR) and give that folder, or use peft=lora"
        )


def check_files(folder: Path) -> None:
    """A local adapter or model that cannot load (a copy cut short, a corrupt config) is refused naming
    the file, before the base model loads: peft and transformers would fail only after it, with
    safetensors' message and no file name."""
    what = "adapter" if _is_adapter(folder) else "model"
    bad = adapter_problem(folder) if what == "adapter" else model_problem(folder)
    if bad is not None:
        file, why = bad
        raise ConfigError(f"dpo.init_from: {file}: {why}; copy the {what} again or point dpo.init_from at a whole one")


def same_base_as_sft_run(cfg):
    """Take model, quant, peft and run.seed from the SFT run that `dpo.init_from` names, if it is a run
    directory: the adapter is only meaningful on the exact base it was trained on (for an inline
    random-init model that means the same seed), and what SFT trained (an adapter, or the whole
    model) is what DPO continues. Then refuse an init_from that the peft method cannot continue."""
    _, run_dir = resolve_init_from(cfg.dpo.init_from)
    if run_dir is not None:  # else an adapter or model folder, or a Hub id: no run config to follow
        sft = OmegaConf.load(run_dir / "config.yaml")
        for key in ("model", "quant", "peft"):
            if OmegaConf.to_container(cfg[key]) != OmegaConf.to_container(sft[key]):
                log.info("%s: using the SFT run's (%s) instead of the one configured here", key, run_dir)
            cfg[key] = OmegaConf.merge(cfg[key], sft[key])  # keeps the typed schema
        cfg.run.seed = sft.run.seed
    resolve_init_from(cfg.dpo.init_from, cfg.peft.method)
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
    """The SFT model as a trainable PeftModel (adapter "default"); the trainer adds the frozen "ref" copy.
    A Mixtral adapter pushed in stock transformers' layout (hub/push.py) goes back to the per-expert
    one our Mixtral class takes, exactly."""
    folder = safe_adapter(adapter, allow_pickle)
    if not (isinstance(base_model, UnfusedMixtralForCausalLM) and is_stock_adapter(folder)):
        return attach_adapter(base_model, folder, is_trainable=True)
    with tempfile.TemporaryDirectory(prefix="mistral_align_unfused_") as tmp:
        log.info("dpo.init_from: a stock-layout Mixtral adapter, attached as per-expert LoRA")
        return attach_adapter(base_model, str(write_unfused_adapter(folder, Path(tmp))), is_trainable=True)


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
    """Preference optimisation (`dpo.objective`): of the SFT adapter or, peft=none, the SFT model (DPO
    and KTO: a frozen copy of it is the reference; SimPO: none), or of the base model (ORPO)."""

    name = "dpo"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.full = self.cfg.peft.method == "none"
        init_from = self.node.init_from
        # The SFT adapter, or with full fine-tuning the SFT model's folder; known before anything loads.
        self.start = resolve_init_from(init_from, self.cfg.peft.method)[0] if init_from else None
        self.adapter = self.start if self.start is not None and not self.full else None
        if self.start is not None and Path(self.start).is_dir():
            what = "dpo.init_from " + ("model" if self.full else "adapter")
            require_safetensors(self.start, what, bool(self.cfg.model.allow_pickle))

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

    def load_start(self):
        """The model DPO starts from, as it was saved: the SFT model (full fine-tuning), else the base."""
        c = self.cfg
        where = dict(folder=self.start) if self.full and self.start else dict(inline_base=self.inline_base())
        return build_model(c.model, c.quant, vocab_size=self.encoder.vocab_size, seed=c.run.seed, **where)

    def build_model(self):
        c = self.cfg
        quantized = c.quant.mode != "none"
        base = self.load_start()
        if self.full:
            log.info("policy: %s, trained in full; reference: a frozen copy of it", self.start or c.model.name)
            return apply_peft(base, c.peft, quantized=False, gradient_checkpointing=self.node.train.gradient_checkpointing)
        if self.adapter is None:
            if self.node.objective in WITH_REFERENCE:
                log.warning("dpo.init_from is not set: training a new adapter; the reference is the bare base model")
            return apply_peft(base, c.peft, quantized=quantized, gradient_checkpointing=self.node.train.gradient_checkpointing)
        base = prepare_for_adapter(base, quantized, self.node.train.gradient_checkpointing)
        log.info("policy%s: the SFT adapter %s", " and reference" if self.node.objective in WITH_REFERENCE else "",
                 self.adapter)
        return load_policy(base, self.adapter, allow_pickle=bool(c.model.allow_pickle))

    def reference_model(self):
        """Full fine-tuning: the frozen reference, loaded again from where the policy came from. None
        with an adapter (TRL keeps the frozen "ref" adapter beside the trained one), and with
        dpo.precompute_ref_log_probs, where TRL scores every pair with the policy before its first step
        (unless the batches are packed: our packing hooks then need a model of their own to attach to)."""
        if not self.full or self.node.objective not in WITH_REFERENCE:
            return None
        if self.node.precompute_ref_log_probs and not (self.node.padding_free or self.node.shared_prompt):
            return None
        ref = self.load_start()
        ref.requires_grad_(False)
        return ref.eval()

    def model_facts(self) -> dict[str, Any]:
        if self.node.objective not in WITH_REFERENCE:
            reference = f"none ({NAMES[self.node.objective]} has no reference model)"
        elif self.full:
            reference = f"frozen copy of the {'SFT model' if self.start else 'base model'}"
        else:
            reference = "frozen copy of the SFT adapter" if self.adapter else "base model"
        return {"init_from": self.start, "objective": self.node.objective, "reference": reference}

    def trainer_args(self, report_to: list[str], has_eval: bool, eval_on_start: bool):
        return preference_args(self.node, self.cfg.run.seed, self.out_dir, report_to, has_eval, eval_on_start)

    def trainer_facts(self, args) -> dict[str, Any]:
        return objective_facts(self.node, args)

    def build_trainer(self, model, tokenizer, args, data: LoadedData, callbacks: list):
        return preference_trainer(self.node, model, tokenizer, args, data.train, data.eval, callbacks,
                                  keeps_float32(self.cfg), ref_model=self.reference_model())

    def held_out_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        return preference_metrics(metrics)

    def generation_rows(self, data: LoadedData):
        return as_generation_rows(data.eval)

    def report(self, summary: dict, gen_before: dict | None, gen_after: dict | None) -> str | None:
        parts, name = [], NAMES[self.node.objective]
        if gen_after is not None:
            table = generation_table(gen_before, gen_after, None, None, bars=summary["eval"].get("bars"))
            parts.append(f"{name} before / after (held-out prompts)\n" + table)
        d = summary["dpo"]
        if d.get("before") and d.get("after"):
            parts.append(preference_table(d["before"], d["after"], objective=self.node.objective))
        return "\n".join(parts) or None
