"""Weight files: a cut-short or corrupt safetensors file is named before any model loads, and saved
weights are readable like every other file of a run (the umask, not safetensors' private 0600)."""

from __future__ import annotations

import json
import os
import stat
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from mistral_align.errors import ConfigError
from mistral_align.files import follow_umask
from mistral_align.model.weights import adapter_problem, model_problem, safetensors_problem
from mistral_align.train.dpo import resolve_init_from


def _adapter(folder):
    folder.mkdir(parents=True, exist_ok=True)
    save_file({"a.lora_A.weight": torch.randn(8, 64), "a.lora_B.weight": torch.zeros(64, 8)},
              str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    return folder


def test_a_whole_file_has_no_problem_and_every_cut_is_named(tmp_path):
    path = _adapter(tmp_path / "ad") / "adapter_model.safetensors"
    assert safetensors_problem(path) is None and set(load_file(str(path)))
    whole = path.read_bytes()
    (n,) = struct.unpack("<Q", whole[:8])
    cases = {
        len(whole) // 2: f"truncated: {len(whole) // 2} bytes, but its header describes {len(whole)}",
        len(whole) - 1: f"truncated: {len(whole) - 1} bytes, but its header describes {len(whole)}",
        8 + n // 2: f"truncated: {8 + n // 2} bytes, but its header alone needs {8 + n}",
        5: "only 5 bytes: not a safetensors file",
    }
    for size, reason in cases.items():
        path.write_bytes(whole[:size])
        assert safetensors_problem(path).startswith(reason), size
    path.write_bytes(whole + b"\0" * 10)
    assert safetensors_problem(path) == f"corrupt: {len(whole) + 10} bytes, 10 more than its header describes"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 100)  # a zip (torch.save) renamed .safetensors
    assert safetensors_problem(path).startswith("not a safetensors file")


def test_a_truncated_adapter_in_init_from_is_refused_naming_the_file(tmp_path):
    folder = _adapter(tmp_path / "sft" / "adapter")
    assert resolve_init_from(str(tmp_path / "sft")) == (str(folder), None)
    weights = folder / "adapter_model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises(ConfigError, match=rf"^dpo.init_from: {weights}: truncated: \d+ bytes"):
        resolve_init_from(str(tmp_path / "sft"))
    (folder / "adapter_config.json").write_text("{")
    assert adapter_problem(folder)[0] == folder / "adapter_config.json"
    (folder / "adapter_config.json").write_text("{}")
    weights.unlink()
    assert adapter_problem(folder) == (weights, "is missing (the adapter folder holds no weights)")


def test_a_truncated_full_model_in_init_from_is_refused_naming_the_file(tmp_path):
    folder = tmp_path / "sft" / "model"  # a full fine-tune's model/ in its run directory
    folder.mkdir(parents=True)
    (tmp_path / "sft" / "config.yaml").write_text("model: {}\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    weights = folder / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(weights))
    assert resolve_init_from(str(tmp_path / "sft")) == (str(folder), tmp_path / "sft")
    os.truncate(weights, weights.stat().st_size - 1)
    with pytest.raises(ConfigError, match=rf"^dpo.init_from: {weights}: truncated: \d+ bytes.*copy the model again"):
        resolve_init_from(str(tmp_path / "sft"))
    weights.unlink()
    assert model_problem(folder) == (folder, "holds no weights (no *.safetensors)")


def test_follow_umask_gives_safetensors_files_the_mode_of_every_other_file(tmp_path):
    folder = _adapter(tmp_path / "ad")
    old = os.umask(0o022)
    try:
        (folder / "sub").mkdir()
        save_file({"x": torch.zeros(2)}, str(folder / "sub" / "model.safetensors"))
        follow_umask(folder)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in folder.rglob("*") if p.is_file()}
    assert modes == {"adapter_model.safetensors": 0o644, "adapter_config.json": 0o644, "model.safetensors": 0o644}
    assert not list(folder.glob(".mode-probe-*"))
