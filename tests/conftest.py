"""What every test shares: one load of each tekken tokenizer file, a clean os.environ, and the tiny
runs several test files read.

Session fixtures (ask for them by name; each is built once, on first use):

    tiny_run           make_run(arch="mistral-small", quant="nf4", steps=24): a finished single-stage
                       run directory (base/, adapter/, tokenizer/, config.yaml, ...) whose LoRA changed
                       the greedy outputs. Read it, never write into it: copy it first (runfixtures.copy_run).
    tiny_pipeline_run  make_run(arch="mistral-small", quant="none", pipeline=True, steps=8): sft/adapter
                       and dpo/adapter in one run directory.
    tiny_mixtral_run   make_run(arch="mixtral", quant="none", steps=6, lr=1e-2): a Mixtral run whose
                       LoRA on every expert moved the logits by more than 1e-2 (push, merge).

The tekken cache: mistral-common builds a `Tekkenizer` from its JSON file in about a second of CPU
(it decodes all 131,072 pieces), and mistral-common, transformers' MistralCommonBackend and our
encoder each load one per call. The suite loaded them some hundred times. `Tekkenizer.from_file` is
wrapped so that a file whose bytes were loaded before gives a copy of that tokenizer (its own object,
with this path) instead of a new parse: the same bytes give the same tokenizer, so no test sees a
difference, and a file that changed (other bytes) is parsed again. Subprocesses load their own.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import logging
import os
from pathlib import Path

import pytest
from hypothesis import settings

# One torch thread in the test process, as in every process the tests launch (their ENV sets it):
# the models are tiny, and two threads on the 2-core machine the suite is budgeted for cost several
# times one (the tiny-Mixtral QLoRA test: 7.1 s with two, 1.0 s with one, load 3.9). Set before
# torch is first imported (test modules are imported after this file); a value in the shell wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _cache_tekken_loads() -> None:
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    original = Tekkenizer.from_file.__func__
    loaded: dict[tuple[str, str], Tekkenizer] = {}

    def from_file(cls, path):
        path = Path(path)
        key = (hashlib.sha256(path.read_bytes()).hexdigest(), path.name)
        if key not in loaded:
            loaded[key] = original(cls, path)
        tokenizer = copy.copy(loaded[key])  # its own attributes; the vocabulary tables are shared, read-only
        tokenizer._file_path = path
        return tokenizer

    Tekkenizer.from_file = classmethod(from_file)


# `make test` runs every property test with the examples it asks for; `make test-fast`, the edit
# loop, loads this profile (--hypothesis-profile=edit-loop) and runs a quarter of them
# (chat_reference.examples).
settings.register_profile("edit-loop", max_examples=25)


def pytest_configure(config):
    _cache_tekken_loads()
    # A run directory fixed in the shell would be every in-process run's (tests name their own).
    os.environ.pop("MISTRAL_ALIGN_RUN_DIR", None)


@contextlib.contextmanager
def one_drill_at_a_time(item):
    """`make test` runs two pytest workers, each taking whole files (`-n 2 --dist loadfile`, so a
    module fixture is built once). A test marked `ranks` (two ranks or two nodes, several processes
    each, some with gloo timeouts and timed exits) holds a lock the workers share, in the folder that
    holds their temporary folders, for its setup, call and teardown: one drill at a time on the
    2-core machine, never two at once."""
    if not hasattr(item.config, "workerinput") or item.get_closest_marker("ranks") is None:
        yield
        return
    with open(Path(item.config.getoption("basetemp")).parent / "ranks.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Recipes run in this process (runfixtures.run_recipe_script, run_recipe) set WANDB_*,
    TENSORBOARD_LOGGING_DIR, ... and point the root logger at the stream they printed to
    (logging.basicConfig(force=True) in train/process.py): each test starts from the environment and
    the logging the session started with. A handler left behind is bound to a stream pytest swaps
    or closes: after a test whose recipe printed to capsys (test_tool_training's v13 run), every later
    warning printed '--- Logging error ---' into the next test's stderr
    (test_hub_push.py::test_push_failure_names_the_step_and_exits_2). Saved around the test's whole
    protocol, not in a function fixture: a module or session fixture that runs a recipe is set up
    before any function fixture, so a fixture's restore would keep that run's handler and environment.
    Hydra's job config too (below)."""
    from hydra.core.hydra_config import HydraConfig

    saved_env = dict(os.environ)
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    job_config = HydraConfig.instance().cfg
    with one_drill_at_a_time(item):
        yield
    os.environ.clear()
    os.environ.update(saved_env)
    root.handlers[:] = saved_handlers
    root.setLevel(saved_level)
    # A recipe run through @hydra.main leaves its job's config behind; a later `main(cfg)` read that
    # job's command line as its own (train/preflight.py refused test_full_finetune's SFT run with
    # test_config's `--cfg job` overrides).
    HydraConfig.instance().cfg = job_config


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from runfixtures import make_run

    run = make_run(tmp_path_factory.mktemp("tiny") / "run", arch="mistral-small", quant="nf4", steps=24)
    before = _files(run)
    yield run
    assert _files(run) == before, "a test wrote into the shared tiny_run: copy it first (runfixtures.copy_run)"


@pytest.fixture(scope="session")
def tiny_pipeline_run(tmp_path_factory):
    from runfixtures import make_run

    run = make_run(tmp_path_factory.mktemp("tiny_pipeline") / "run", arch="mistral-small", quant="none",
                   pipeline=True, steps=8)  # fmt: skip
    before = _files(run)
    yield run
    assert _files(run) == before, "a test wrote into the shared tiny_pipeline_run: copy it first (runfixtures.copy_run)"


@pytest.fixture(scope="session")
def tiny_mixtral_run(tmp_path_factory):
    from runfixtures import make_run

    run = make_run(tmp_path_factory.mktemp("tiny_mixtral") / "run", arch="mixtral", quant="none", steps=6, lr=1e-2)
    before = _files(run)
    yield run
    assert _files(run) == before, "a test wrote into the shared tiny_mixtral_run: copy it first (runfixtures.copy_run)"
