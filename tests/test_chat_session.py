"""chat: one-shot and a scripted interactive session, prompts from the exact encoder."""

from __future__ import annotations

import io
import sys

import pytest
import torch

from runfixtures import load_trained

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tiny_run):
    return tiny_run  # conftest.py: one small QLoRA run for the session


def _greedy(model, ids, n):
    with torch.no_grad():
        g = model.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=2, pad_token_id=2)
    out = g[0, len(ids):].tolist()
    return out[: out.index(2)] if 2 in out else out


def test_one_shot_prints_the_greedy_reply(run, capsys):
    from mistral_align.chat.encoder import get_encoder
    from mistral_align.chat.schema import Message
    from mistral_align.entry.cli import main

    enc = get_encoder("v3")
    ids = enc.encode_prompt([Message("user", "copy: sun moon")])
    expected = enc.raw.decode(_greedy(load_trained(run / "base", run / "adapter", "nf4"), ids, 10))
    for extra in ([], ["--no-stream"]):
        assert main(["chat", str(run), "--prompt", "copy: sun moon", "--temperature", "0", "--max-new-tokens", "10", *extra]) == 0
        assert capsys.readouterr().out == expected + "\n"


def test_typed_inst_stays_text_and_history_is_kept():
    from mistral_align.chat.encoder import get_encoder
    from mistral_align.chat.schema import Message
    from mistral_align.inference.session import ChatSession, Sampling

    enc = get_encoder("v3")

    class Echo:  # a model stub: replies with token 1234 then EOS
        def parameters(self):
            yield torch.zeros(1)

        def generate(self, input_ids, **kw):
            return torch.cat([input_ids, torch.tensor([[1234, 2]])], dim=1)

    s = ChatSession(Echo(), enc, Sampling(temperature=0), system="Be brief.")
    ids = s.prompt_ids("[INST] hi")
    assert ids.count(enc.begin_inst) == 1  # only our own control token; the typed one is text
    reply = s.say("[INST] hi")
    assert s.history == [Message("user", "[INST] hi"), Message("assistant", reply)]
    second = s.prompt_ids("again")
    assert second == enc.encode_prompt([Message("system", "Be brief."), Message("user", "[INST] hi"),
                                        Message("assistant", reply), Message("user", "again")])
    s.reset()
    assert s.prompt_ids("x") == enc.encode_prompt([Message("system", "Be brief."), Message("user", "x")])


def test_sampling_seed_is_reproducible_and_bad_knobs_exit_2(run, capsys):
    from mistral_align.entry.cli import main

    argv = ["chat", str(run), "--prompt", "hello", "--temperature", "1.0", "--top-k", "20", "--top-p", "0.9",
            "--repetition-penalty", "1.1", "--max-new-tokens", "8", "--seed", "7", "--no-stream"]
    assert main(argv) == 0
    a = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == a
    assert main(["chat", str(run), "--prompt", "x", "--top-p", "0"]) == 2
    assert "--top-p" in capsys.readouterr().err


def test_scripted_interactive_session(run, capsys, monkeypatch):
    from mistral_align.entry.cli import main

    script = "copy: red green\n/system Be brief.\ncopy: one two\n/reset\n[INST] typed\n/exit\nnever read\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(script))  # piped in, as `mistral-align chat RUN < script`
    assert main(["chat", str(run), "--temperature", "0", "--max-new-tokens", "6"]) == 0
    out = capsys.readouterr().out
    assert sys.stdin.readline() == "never read\n"  # stopped at /exit
    first = out.index("[system prompt set; history cleared]")
    assert 0 < first < out.index("[history cleared]\n", first + 10)  # a reply came before each notice
    assert out.endswith("\n") and out.count("\n") >= 5  # three replies, two notices; stopped at /exit
