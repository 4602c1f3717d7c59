"""SFT then DPO on tiny Mixtral with every expert in 4-bit (issue 9): the real recipe, one run directory."""

from __future__ import annotations

import json

import pytest

from test_pipeline import pipeline

pytestmark = pytest.mark.slow


def test_sft_then_dpo_on_tiny_mixtral_every_expert_4bit(tmp_path):
    run_dir = tmp_path / "run"
    pipeline(tmp_path, run_dir, "model=tiny-mixtral", "sft.train.max_steps=4")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    for stage in ("sft", "dpo"):
        facts = manifest[stage]["model"]
        # 2 layers x (4 attention + 4 experts x 3) linears, all 4-bit; lm_head full precision
        assert facts["model_type"] == "mixtral" and facts["linear_4bit"] == 32 and facts["linear_full"] == 1
        by_kind = facts["parameter_bytes"]["by_kind"]
        assert {"attention", "experts", "router", "embeddings", "norms", "lora"} <= set(by_kind)
        assert "nf4 (packed)" in facts["parameter_bytes"]["by_dtype"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["sft"]["after"]["loss"] < summary["sft"]["before"]["loss"]
    assert summary["dpo"]["steps"] == 4
