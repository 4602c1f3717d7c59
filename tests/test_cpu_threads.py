"""`run.cpu_threads`: the CPU thread count torch trains with, set before anything trains and
capped (with a warning) at the cores the process may use. A float sum split among another number of
threads rounds differently, so the same CPU run on a machine with another core count trains
different weights (measured: the demo's adapter after 30 steps differs between 1 and 2 threads and
is bit-identical between two 1-thread runs); a fixed count makes the demo repeat exactly."""

from __future__ import annotations

import logging
import os

import torch

from mistral_align.train.run import set_cpu_threads


def test_cpu_threads_sets_torchs_thread_count_capped_at_the_cores(caplog):
    cores = len(os.sched_getaffinity(0))
    before = torch.get_num_threads()
    try:
        set_cpu_threads(1)
        assert torch.get_num_threads() == 1
        with caplog.at_level(logging.WARNING, logger="mistral_align"):
            set_cpu_threads(cores + 1)
        assert torch.get_num_threads() == cores
        assert f"run.cpu_threads={cores + 1}, but this process may use {cores} core(s)" in caplog.text
        torch.set_num_threads(1)
        set_cpu_threads(None)  # torch's own choice stays
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
