"""One stage of training, in the one order every stage runs:

    data -> tokenizer and model -> evaluate before -> train -> save -> evaluate after -> summary

`run_stage(stage)` holds that order; `Stage` subclasses hold what differs (train/sft.py,
train/dpo.py): how data is loaded, how the model and trainer are built, which held-out metrics are
reported. A fix to the order is a fix to both stages.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from transformers import PrinterCallback

from mistral_align.chat.encoder import get_encoder
from mistral_align.chat.hf_tokenizer import load_hf_tokenizer, save_hf_tokenizer
from mistral_align.data.load import LoadedData
from mistral_align.data.synthetic import skill_of
from mistral_align.files import follow_umask, write_json
from mistral_align.model.estimate import warn_if_wont_fit
from mistral_align.model.facts import model_facts
from mistral_align.model.inline import ensure_inline_base
from mistral_align.model.plain_folder import make_plain
from mistral_align.model.tokenizer_file import resolve_tokenizer_file
from mistral_align.rundir.drift import stages_started
from mistral_align.rundir.layout import trained_folder_name
from mistral_align.schema.data import SourceConfig
from mistral_align.train.evaluate import check_bars, generation_eval
from mistral_align.train.metrics import FirstEvaluation, MetricsJsonl
from mistral_align.train.nonfinite import NonFinitePolicy, RowNames
from mistral_align.train.ranks import check_ranks_agree
from mistral_align.train.resume import recorded_facts, resume_point, train_from
from mistral_align.train.run import Run
from mistral_align.train.sharded_saves import whole_adapter_saves
from mistral_align.train.signals import StopOnSignal
from mistral_align.train.tracking import setup_tracking

log = logging.getLogger("mistral_align")


class Stage:
    """What one stage (`cfg.<name>`) does differently; `run_stage` calls these in order."""

    name = "stage"

    def __init__(self, cfg: Any, run: Run, out_dir: Path | None = None, section: str | None = None):
        self.cfg = cfg
        self.run = run
        self.node = cfg[self.name]
        self.out_dir = Path(out_dir or run.dir)  # a pipeline gives each stage its own sub-directory
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.section = section  # ... and its own section of the run's one manifest
        # What it trained, saved once training ends: adapter/, or model/ with full fine-tuning.
        self.trained_dir = self.out_dir / trained_folder_name(cfg.peft.method)
        # The model repository's own tokenizer file where it has one (model/tokenizer_file.py).
        self.tokenizer_source = source = resolve_tokenizer_file(cfg.model, warn=run.state.is_main_process)
        self.encoder = get_encoder(cfg.model.tokenizer_version, source.path if source.own_file else None)

    # -- what each stage defines --------------------------------------------------------------

    def write_synthetic_data(self, data_dir: Path) -> tuple[Path, Path]:
        raise NotImplementedError

    def load_data(self) -> LoadedData:
        raise NotImplementedError

    def build_model(self):
        raise NotImplementedError

    def trainer_args(self, report_to: list[str], has_eval: bool, eval_on_start: bool):
        raise NotImplementedError

    def build_trainer(self, model, tokenizer, args, data: LoadedData, callbacks: list):
        raise NotImplementedError

    def held_out_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """The stage's held-out metrics, under readable names, from trainer.evaluate()'s."""
        raise NotImplementedError

    def generation_rows(self, data: LoadedData):
        """Held-out rows as (input_ids, labels) whose last trained run is the reference reply."""
        raise NotImplementedError

    def model_facts(self) -> dict[str, Any]:
        """Facts about where the model came from, for the manifest (DPO: the SFT adapter it continues)."""
        return {}

    def trainer_facts(self, args) -> dict[str, Any]:
        """The stage's own trainer settings, for the manifest (DPO: beta, loss types)."""
        return {}

    def report(self, summary: dict, gen_before: dict | None, gen_after: dict | None) -> str | None:
        """The table printed at the end of a stage run on its own."""
        return None

    # -- shared by both ----------------------------------------------------------------------

    def inline_base(self) -> Path | None:
        """An inline (random-init) model's base folder in the run directory, made once by the main
        process; None for a Hub model."""
        if self.cfg.model.architecture is None:
            return None
        path = self.run.dir / "base"
        with self.run.state.main_process_first():
            if self.run.state.is_main_process:
                # A base left by a launch that trained nothing may be made again (rundir/drift.py).
                ensure_inline_base(self.cfg.model, self.encoder.vocab_size, self.cfg.run.seed, path,
                                   remake_other=not stages_started(self.run.dir, self.run.stages))
        return path

    def use_synthetic_data(self) -> None:
        """Generate the demo data (main process) and point the stage's data at it; config.yaml follows."""
        data_dir = self.out_dir / "data"
        with self.run.state.main_process_first():
            if self.run.state.is_main_process:
                self.write_synthetic_data(data_dir)
        self.node.data.train = [SourceConfig(path=str(data_dir / "train.jsonl"))]
        self.node.data.eval = [SourceConfig(path=str(data_dir / "eval.jsonl"))]
        self.run.write_config()


def run_stage(stage: Stage, print_report: bool = True) -> dict:
    """Train one stage into `stage.out_dir`; returns its summary (also written to summary.json there).

    SIGTERM / SIGUSR1 / Ctrl-C stop it cleanly (exit code 3) from its first line on: during training
    at the next step boundary with a checkpoint, before training at the next `stop.stop_here`, which
    every rank passes (train/signals.py)."""
    stop = StopOnSignal()
    stop.install()
    try:
        return _run_stage(stage, stop, print_report)
    finally:
        stop.uninstall()


def _run_stage(stage: Stage, stop: StopOnSignal, print_report: bool) -> dict:
    cfg, run, node, state = stage.cfg, stage.run, stage.node, stage.run.state
    record = lambda facts: run.record(facts, stage.section)  # noqa: E731
    if node.synthetic.enabled:
        stage.use_synthetic_data()
    report_to = setup_tracking(cfg.run, stage.out_dir, is_main=state.is_main_process)

    # 1. Data: exact mistral-common ids and loss masks, every row checked before the model loads.
    with state.main_process_first():
        data = stage.load_data()
    log.info("%s data: %d train rows, %d eval rows", stage.name.upper(), len(data.train),
             len(data.eval) if data.eval is not None else 0)
    # Resuming (train/resume.py): the newest complete checkpoint of this stage, if any, trained on this data.
    resume = resume_point(stage, data.fingerprint)
    stop.stop_here(stage, "before training, after loading the data")

    # 2. Tokenizer and model (each rank's copy on its own device) with its adapter; the trainer.
    with state.main_process_first():  # written once; the other ranks read it whole
        if state.is_main_process:
            save_hf_tokenizer(cfg.model.tokenizer_version, stage.out_dir / "tokenizer", source=stage.encoder.file)
        tokenizer = load_hf_tokenizer(stage.out_dir / "tokenizer")
    # On a GPU, a warning before loading when the estimate says the model will not fit.
    warn_if_wont_fit(cfg, num_gpus=state.num_processes, stage=stage.name)
    model = stage.build_model()
    facts = model_facts(model)
    log.info("model: %s, %d trainable of %d params, %d linear layers in 4-bit", cfg.model.name,
             facts["trainable_params"], facts["total_params"], facts["linear_4bit"])
    record({"model": {"name": cfg.model.name, **facts}, "tokenizer_version": cfg.model.tokenizer_version,
            "tokenizer": stage.tokenizer_source.facts(),
            "data": {"fingerprint": data.fingerprint, "report": data.report}, **stage.model_facts()})
    # The held-out metrics before training are measured by the trainer as its first act (eval_on_start,
    # train/hooks.py), on a stage's first launch; a resumed launch reports what the first one recorded.
    wants_before = data.eval is not None and node.eval.loss_before
    args = stage.trainer_args(report_to, has_eval=data.eval is not None,
                              eval_on_start=wants_before and resume.checkpoint is None)
    record({"trainer": {"world_size": args.world_size, "parallel_mode": str(args.parallel_mode),
                        "global_batch_rows": args.world_size * args.per_device_train_batch_size
                        * args.gradient_accumulation_steps, **stage.trainer_facts(args)}})
    metrics = MetricsJsonl(run.dir / "metrics.jsonl", stage.name, resume.step, state.is_main_process)
    before = FirstEvaluation(lambda m: record({"held_out_before": stage.held_out_metrics(m)}))
    trainer = stage.build_trainer(model, tokenizer, args, data, [metrics, before])
    # A NaN/Inf step stops the stage naming its rows, or is skipped (train/nonfinite.py).
    trainer.nonfinite = NonFinitePolicy(node.train.on_nonfinite, f"{stage.name}.train.on_nonfinite",
                                        RowNames(stage.name, data.train, data.train_rows, args.max_length),
                                        checkpoint_dir=stage.out_dir / "checkpoints")
    stop.stop_here(stage, "before training, after building the model")

    # 3. Greedy exact match on held-out prompts before training, if asked (main process).
    summary: dict = {stage.name: {}, "eval": {}}
    gen_rows = stage.generation_rows(data) if node.eval.generate and data.eval is not None else None
    gen = dict(max_prompts=node.eval.max_prompts, max_new_tokens=node.eval.max_new_tokens,
               batch_size=node.eval.batch_size, group=skill_of if node.synthetic.enabled else None)
    on_main = state.is_main_process
    gen_before = generation_eval(trainer.model, stage.encoder, gen_rows, **gen) if gen_rows is not None and on_main else None
    stop.stop_here(stage, "before training, just before it started")

    # 4. Train (held-out metrics first), then save the adapter (or the whole model: peft=none) as
    #    safetensors, with the exact tokenizer beside it.
    t_train = time.time()
    result = train_from(resume, trainer, stage, stop)  # a signal stops it cleanly (exit 3)
    train_seconds = time.time() - t_train
    check_ranks_agree(trainer)  # several processes trained one model, not one each
    save_adapter(trainer, stage.trained_dir, cfg.model.tokenizer_version, stage.encoder.file)
    # A signal in the last step or while saving: the stage is not finished (no summary.json), so a
    # rerun resumes it from its newest checkpoint.
    stop.stop_here(stage, f"after training, before evaluating ({stage.trained_dir.name} saved in {stage.trained_dir})")

    # 5. Evaluate after, and report.
    if wants_before:
        measured = stage.held_out_metrics(before.metrics) if before.metrics is not None else None
        summary[stage.name]["before"] = measured or recorded_facts(run.dir, stage.section).get("held_out_before")
    if data.eval is not None:
        summary[stage.name]["after"] = stage.held_out_metrics(trainer.evaluate())
    summary[stage.name].update(train_loss=result.training_loss, steps=result.global_step,
                               train_seconds=round(train_seconds, 1), nonfinite_skipped=trainer.nonfinite.skipped)
    gen_after = generation_eval(trainer.model, stage.encoder, gen_rows, **gen) if gen_before is not None else None
    if gen_after is not None:
        summary["eval"] = {"exact_match": {"before": gen_before["exact_match"], "after": gen_after["exact_match"]},
                           "n": gen_after["n"], "samples_after": gen_after["samples"][:16]}
        if gen_after["by_group"]:
            summary["eval"]["by_skill"] = {"before": gen_before["by_group"], "after": gen_after["by_group"]}
            if node.synthetic.bars:  # what the demo promises each skill reaches
                summary["eval"]["bars"] = check_bars(gen_after["by_group"], dict(node.synthetic.bars), stage.name)
    if on_main:
        write_json(stage.out_dir / "summary.json", summary)
        table = stage.report(summary, gen_before, gen_after) if print_report else None
        if table:
            print("\n" + table, flush=True)
    record({"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "train_seconds": round(train_seconds, 1),
            "global_step": result.global_step,
            # Where what it trained is: "adapter" (LoRA), "trained_model" (full fine-tuning: "model" holds its facts).
            "trained_model" if stage.cfg.peft.method == "none" else "adapter": str(stage.trained_dir.relative_to(run.dir))})
    state.wait_for_everyone()
    return summary


def build_trainer(trainer_class, model, tokenizer, args, train_ds, eval_ds=None, callbacks=(), keep_float32=False,
                  **options):
    """One of our TRL trainers on already-tokenised rows (train/sft.py, train/dpo_trainer.py)."""
    trainer = trainer_class(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                            processing_class=tokenizer, callbacks=list(callbacks), keep_float32=keep_float32, **options)
    if not trainer.accelerator.is_main_process:
        # The Trainer prints its logs on the first process of every node; the run logs once, from rank 0.
        trainer.remove_callback(PrinterCallback)
    return trainer


def save_adapter(trainer, out_dir: Path, tokenizer_version: str | None = None, tokenizer_file: Path | None = None) -> Path:
    """The final adapter (adapter_model.safetensors + adapter_config.json naming its base), or the
    whole model with peft=none (a plain transformers folder: safetensors, config.json naming the
    stock class), plus the exact tokenizer (the file the run encoded with) so the folder loads (and
    pushes) on its own.
    Collective under FSDP/DeepSpeed: call it on every rank."""
    with whole_adapter_saves(trainer):  # FSDP: one whole file, also when checkpoints are sharded
        trainer.save_model(str(out_dir))
    if trainer.accelerator.is_main_process:
        # The trainer also pickles its arguments there; a folder meant to be shared holds no pickles
        # (checkpoints keep theirs, for resuming).
        (Path(out_dir) / "training_args.bin").unlink(missing_ok=True)
        if not (Path(out_dir) / "adapter_config.json").is_file():  # the whole model, as stock transformers reads it
            make_plain(out_dir)
    if tokenizer_version and trainer.accelerator.is_main_process:
        save_hf_tokenizer(tokenizer_version, out_dir, source=tokenizer_file)
    if trainer.accelerator.is_main_process:
        follow_umask(out_dir)  # safetensors writes 0600; the folder is meant to be shared
    return Path(out_dir)
