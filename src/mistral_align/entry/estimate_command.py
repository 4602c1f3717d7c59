"""`mistral-align estimate`: GPU memory of a training run from the recipes' own config, before anything loads."""

from __future__ import annotations

import json

from mistral_align.errors import EXIT_OK, UsageError
from mistral_align.files import CONFIG_DIR
from mistral_align.names import PARALLEL_KINDS
from mistral_align.schema.recipe import check_config, register_configs


def add_estimate(sub) -> None:
    p = sub.add_parser(
        "estimate",
        help="GPU memory of a training run, before anything loads",
        description="Estimate per-GPU memory (weights, LoRA, gradients, optimizer, activations) from the "
        "same Hydra config and overrides the recipes take; no download, no model built.",
    )
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides, e.g. model=mixtral-8x7b-v0.1 quant=nf4")
    p.add_argument("--config-name", default="sft_dpo", help="primary config under configs/ (sft, dpo, sft_dpo)")
    p.add_argument("--stage", choices=("sft", "dpo"), default=None, help="which stage's train node (default: sft)")
    p.add_argument("--num-gpus", type=int, default=None, metavar="N", help="default: the accelerate config's, else 1")
    p.add_argument("--parallel", choices=PARALLEL_KINDS, default=None,
                   help="what is split over the GPUs: zero1 the optimizer state, zero2 also gradients, zero3 and fsdp "
                   "also weights (default: the accelerate config's, else ddp)")
    p.add_argument("--accelerate-config", metavar="FILE", default=None,
                   help="the `accelerate launch --config_file` YAML the run will use: DeepSpeed stage (or FSDP) and GPUs")
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON object")
    p.set_defaults(func=_cmd_estimate)


def compose_config(config_name: str, overrides: list[str]):
    """The recipes' resolved config, composed from the package's configs with `overrides` (no Hydra app, no run)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    register_configs()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            return compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        cause = e.__cause__ or e
        raise UsageError(" ".join(str(cause).split())) from None


def _cmd_estimate(args) -> int:
    # lazy: start-up time
    from mistral_align.model.estimate import estimate_memory, format_estimate, parallel_from_accelerate_config

    parallel, num_gpus = "ddp", 1
    if args.accelerate_config is not None:
        parallel, num_gpus = parallel_from_accelerate_config(args.accelerate_config)
    parallel = args.parallel or parallel
    num_gpus = args.num_gpus if args.num_gpus is not None else num_gpus
    if num_gpus < 1:
        raise UsageError(f"--num-gpus must be >= 1, got {num_gpus}")
    cfg = compose_config(args.config_name, list(args.overrides))
    stage = args.stage or "sft"
    check_config(cfg, stages=(stage,), need_data=False)
    report = estimate_memory(cfg, num_gpus=num_gpus, parallel=parallel, stage=stage)
    print(json.dumps(report) if args.json else format_estimate(report))
    return EXIT_OK
