"""The verbs on a finished run: `push`, `merge`, `export-gguf`, `chat`.

Each checks what it can (the folder, the options) before any model loads; the heavy modules are
imported inside each command, so `mistral-align --help` and a mistyped path answer at once.
"""

from __future__ import annotations

import json
import os

from mistral_align.errors import EXIT_OK, UsageError
from mistral_align.rundir.finished import resolve_source


def add_push(sub) -> None:
    p = sub.add_parser(
        "push",
        help="push a run's adapter, tokenizer and model card to the Hugging Face Hub",
        description="Upload the adapter (safetensors), adapter_config.json naming the base, the exact tokenizer, "
        "config.yaml, loss.png, summary.json and a model card. Token: HF_TOKEN or the stored login "
        "(`hf auth login`); it is written nowhere. A second push of the same run makes a new commit.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--repo-id", required=True, metavar="OWNER/NAME")
    p.add_argument("--stage", choices=("sft", "dpo"), default=None, help="pipeline runs: which adapter (default: the last, dpo)")
    p.add_argument("--private", action="store_true", help="create the repository private (an existing one is left as it is)")
    p.add_argument("--revision", default=None, metavar="BRANCH", help="push to this branch (created if missing)")
    p.add_argument("--license", default="apache-2.0", help="model card licence (default apache-2.0)")
    p.add_argument("--dry-run", default=None, metavar="DIR", help="write exactly the folder that would be uploaded, upload nothing")
    p.set_defaults(func=_cmd_push)


def _cmd_push(args) -> int:
    from mistral_align.hub.push import push_run  # lazy: start-up time

    r = push_run(args.run_dir, args.repo_id, stage=args.stage, private=args.private, revision=args.revision,
                 dry_run=args.dry_run, license=args.license)
    if r.dry_run:
        print(f"dry run: wrote {len(r.files)} files to {r.folder} (nothing uploaded)")
        for f in r.files:
            print(f"  {f}")
    else:
        print(f"pushed {len(r.files)} files to https://huggingface.co/{r.repo_id}" + (f" ({r.commit_url})" if r.commit_url else ""))
    return EXIT_OK


def add_merge(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge the adapter into its base: a plain transformers model folder",
        description="Write safetensors shards, config.json, generation_config.json and the exact tokenizer. "
        "QLoRA runs: --base dequantized (default) merges into the NF4-dequantized base the adapter was "
        "trained against; --base original into the full-precision base. Never merges into 4-bit weights.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--base", choices=("dequantized", "original"), default="dequantized")
    p.add_argument("--stage", choices=("sft", "dpo"), default=None)
    p.add_argument("--allow-pickle", action="store_true",
                   help="load weights from pickle files (.bin/.pt), which can run code when loaded (default: safetensors only)")
    p.set_defaults(func=_cmd_merge)


def _cmd_merge(args) -> int:
    resolve_source(args.run_dir, args.stage, args.allow_pickle)  # user mistakes before any model loads
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UsageError(f"--out {args.out}: exists and is not an empty directory")
    from mistral_align.export.merge import merge_run  # lazy: start-up time

    out = merge_run(args.run_dir, args.out, dtype=args.dtype, base=args.base, stage=args.stage,
                    allow_pickle=args.allow_pickle)
    print(f"merged model written to {out}")
    return EXIT_OK


def add_export_gguf(sub) -> None:
    p = sub.add_parser(
        "export-gguf",
        help="write a GGUF file for llama.cpp (f16, q8_0, q4_k_m)",
        description="Export a run (merged on the fly, --base dequantized) or a merged folder to GGUF: llama "
        "architecture metadata, the sentencepiece vocabulary with scores and token types, BOS/EOS/UNK, the chat "
        "template. q8_0 and q4_k_m need llama-cpp-python (pip install 'mistral-align[gguf]').",
    )
    p.add_argument("source", metavar="RUN_DIR|MERGED_DIR")
    p.add_argument("--out", required=True, metavar="FILE.gguf")
    p.add_argument("--type", choices=("f16", "q8_0", "q4_k_m"), default="f16", dest="gguf_type")
    p.add_argument("--stage", choices=("sft", "dpo"), default=None)
    p.add_argument("--base", choices=("dequantized", "original"), default="dequantized", help="runs only: the merge base")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load weights from pickle files (.bin/.pt), which can run code when loaded (default: safetensors only)")
    p.set_defaults(func=_cmd_export_gguf)


def _cmd_export_gguf(args) -> int:
    from mistral_align.export.gguf import export_gguf  # lazy: start-up time

    path = export_gguf(args.source, args.out, gguf_type=args.gguf_type, stage=args.stage, base=args.base,
                       allow_pickle=args.allow_pickle)
    print(f"{path}: {os.path.getsize(path)} bytes ({args.gguf_type})")
    return EXIT_OK


def add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="talk to a run (base + adapter) or a merged model",
        description="Interactive (history kept; /reset, /system TEXT, /tool ID RESULT, /exit) or one-shot with "
        "--prompt. Prompts are built by the exact Mistral encoder: typing [INST] gives the text, never the control "
        "token. With --tools FILE the prompt offers those tools as mistral-common encodes them, and a reply that "
        "calls tools is read by mistral-common's own decoding and printed as one JSON line "
        '{"tool_calls": [{"id", "type": "function", "function": {"name", "arguments"}}]}; in interactive mode '
        "answer each call with /tool ID RESULT (RESULT: the tool's output, any text), and the model replies once "
        "every call of its message has a result.",
    )
    p.add_argument("source", metavar="RUN_DIR|MERGED_DIR")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="one-shot: print the reply and exit")
    p.add_argument("--system", default=None, metavar="TEXT")
    p.add_argument("--tools", default=None, metavar="FILE",
                   help='tools the model may call: a JSON file holding a list [{"type": "function", "function": '
                   '{"name", "description", "parameters"}}, ...] (or {"tools": [...]}), as in a data row')
    p.add_argument("--stage", choices=("sft", "dpo"), default=None)
    p.add_argument("--quant", choices=("auto", "none", "nf4", "fp4", "int8"), default="auto",
                   help="load the base quantised (auto: as the run was trained; merged folders: none)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--no-stream", action="store_true", help="print each reply when it is complete")
    p.add_argument("--allow-pickle", action="store_true",
                   help="load weights from pickle files (.bin/.pt), which can run code when loaded (default: safetensors only)")
    p.set_defaults(func=_cmd_chat)


def _read_tools(path: str | None, version: str | None):
    """--tools FILE as the schema's tools, refused in one line before the model loads."""
    from mistral_align.chat.schema import ConversationError, parse_tools
    from mistral_align.chat.tool_rules import TOOL_VERSIONS

    if path is None:
        return ()
    if not os.path.isfile(path):
        raise UsageError(f"--tools {path}: no such file")
    try:
        raw = json.loads(open(path, encoding="utf-8").read())
        tools = parse_tools(raw["tools"] if isinstance(raw, dict) and set(raw) == {"tools"} else raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"--tools {path}: not a JSON file ({e})") from None
    except ConversationError as e:
        raise UsageError(f"--tools {path}: {e}") from None
    if not tools:
        raise UsageError(f"--tools {path}: lists no tools")
    if version not in TOOL_VERSIONS:
        raise UsageError(f"--tools: tokenizer {version} has no tool calling (tools need v2 or later)")
    return tools


def _cmd_chat(args) -> int:
    # lazy: start-up time (torch, transformers)
    from mistral_align.inference.load import load_for_chat
    from mistral_align.inference.session import ChatSession, Sampling, interactive, show_reply

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.max_new_tokens, args.seed)
    sampling.check()
    src = resolve_source(args.source, args.stage, args.allow_pickle)
    tools = _read_tools(args.tools, src.tokenizer_version)
    model, encoder = load_for_chat(args.source, quant=args.quant, stage=args.stage, dtype=args.dtype,
                                   allow_pickle=args.allow_pickle)
    session = ChatSession(model, encoder, sampling, system=args.system, tools=tools)
    if args.prompt is not None:
        show_reply(session, args.prompt, stream=not args.no_stream)
        return EXIT_OK
    interactive(session, stream=not args.no_stream)
    return EXIT_OK
