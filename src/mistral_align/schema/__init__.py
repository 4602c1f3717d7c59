"""The typed configuration every Hydra config under `configs/` is checked against.

One shape for every recipe: the shared nodes `model`, `quant`, `peft`, `run`, `hub` at the top and
one node per stage, each with its own schema, so `sft.train.lr=1e-4` and `dpo.beta=0.1` are spelt
the same in every recipe that runs that stage:

    schema/model.py    model (+ architecture, shape), quant, peft      and their checks
    schema/run.py      run, hub                                        and their checks
    schema/data.py     <stage>.data and its sources                    and their checks
    schema/train.py    <stage>.train, <stage>.eval, <stage>.synthetic  and their checks
    schema/stages.py   the sft and dpo stage nodes                     and their checks
    schema/recipe.py   the root (RecipeConfig), the ConfigStore, check_config(cfg, stages)

Each node's rules sit beside its fields; `check_config` runs the rules of the nodes a recipe uses,
before anything loads, raising `ConfigError("sft.train.lr: must be > 0, got 0.0")`.
"""
