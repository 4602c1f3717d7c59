"""`mistral-align` command line: one subcommand per function, each small.

Adding a subcommand: write `_add_NAME(subparsers)` that registers its arguments and sets
`func=_cmd_NAME`, and `_cmd_NAME(args) -> int` (the exit code); list it in `SUBCOMMANDS`.

Exit codes: 0 success, 1 the data has bad rows, 2 a usage error (missing file, bad option).
User mistakes end with a one-line message on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from mistral_align.chat.encoder import TOKENIZER_VERSIONS as TOKENIZER_CHOICES  # light: mistral-common loads lazily
from mistral_align.errors import EXIT_USER_ERROR, UserError

EXIT_OK, EXIT_BAD_ROWS, EXIT_USAGE = 0, 1, EXIT_USER_ERROR


class UsageError(UserError):
    """A mistake in how the command was called; printed as one line, exit 2."""


def _quiet_libraries() -> None:
    # Progress bars are for people watching a terminal; in a log or a pipe they are noise.
    if not sys.stderr.isatty():
        import datasets

        datasets.disable_progress_bars()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _require_file(path: str) -> None:
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory; name a .jsonl, .json or .parquet file in it")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")


# -- validate -----------------------------------------------------------------------------------


def _add_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check every row of a data file before training",
        description="Check every row (JSON, fields, roles, turn order, lengths) with the same code "
        "training uses. Exit 0 when every row is valid, 1 otherwise.",
    )
    p.add_argument("--kind", choices=("sft", "dpo"), required=True)
    p.add_argument("--data", required=True, metavar="FILE", help=".jsonl, .json or .parquet")
    p.add_argument("--tokenizer", choices=TOKENIZER_CHOICES, default="v3")
    p.add_argument("--max-length", type=int, default=2048, metavar="N")
    p.add_argument("--train-on", choices=("all", "last"), default="all", help="SFT: which replies are trained")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    _add_ignore_fields(p)
    p.set_defaults(func=_cmd_validate)


def _add_ignore_fields(p) -> None:
    p.add_argument("--ignore-fields", default="", metavar="KEY,KEY",
                   help="top-level keys to drop from every row first (a source's ignore_fields)")


def _source(args):
    from mistral_align.data.config import SourceConfig

    return SourceConfig(path=args.data, ignore_fields=[k.strip() for k in args.ignore_fields.split(",") if k.strip()])


def _cmd_validate(args) -> int:
    from mistral_align.chat.encoder import get_encoder
    from mistral_align.data.config import SFTDataConfig
    from mistral_align.data.load import load_data
    from mistral_align.errors import DataError

    _require_file(args.data)
    if args.max_length <= 0:
        raise UsageError(f"--max-length must be positive, got {args.max_length}")
    # Skip mode on both counts collects every problem instead of stopping at the first batch;
    # the loader is the training loader, so validate and training cannot disagree.
    cfg = SFTDataConfig(
        train=[_source(args)],
        max_length=args.max_length,
        train_on=args.train_on,
        on_bad_rows="skip",
        on_long_rows="skip",
    )
    encoder = get_encoder(args.tokenizer)
    try:
        loaded = load_data(args.kind, cfg, encoder, warn=False, allow_empty=True)
    except DataError as e:
        # With skip on both counts only a file that cannot be read as this kind of data gets
        # here (not JSON Lines, SFT rows checked as DPO, ...): invalid data, so exit 1.
        return _validate_failed(args, str(e))
    problems, r = loaded.problems, loaded.report
    if r["rows_read"] == 0:
        return _validate_failed(args, f"{args.data}: no rows")
    report = {
        "file": args.data,
        "kind": args.kind,
        "tokenizer": args.tokenizer,
        "max_length": args.max_length,
        "valid": not problems,
        "rows": r["rows_read"],
        "valid_rows": r["rows_read"] - len(problems),
        "bad_rows": [_split_problem(p, args.data) for p in problems],
        "over_length_rows": sum(1 for p in problems if "over max_length" in p),
        "tokens": r["tokens"],
        "trained_tokens": r["trained_tokens"],
        "packing_efficiency": r["packing_efficiency"],
    }
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        _print_validate_report(report, problems)
    return EXIT_OK if not problems else EXIT_BAD_ROWS


def _validate_failed(args, message: str) -> int:
    if args.json:
        print(json.dumps({"file": args.data, "kind": args.kind, "valid": False, "error": message}, ensure_ascii=False))
    else:
        print(f"FAILED: {message}")
    return EXIT_BAD_ROWS


def _split_problem(problem: str, path: str) -> dict:
    line, _, reason = problem[len(path) + 1 :].partition(": ")
    return {"where": f"{path}:{line}", "line": int(line), "reason": reason}


def _print_validate_report(report: dict, problems: list[str]) -> None:
    for p in problems:
        print(p)
    eff = report["packing_efficiency"]
    lines = [
        f"{report['file']}: {report['rows']} rows, {report['valid_rows']} valid, {len(problems)} bad "
        f"({report['over_length_rows']} over max_length {report['max_length']})",
        f"tokens: {report['tokens']}  trained tokens: {report['trained_tokens']}  (valid rows, tokenizer {report['tokenizer']})",
    ]
    if eff is not None:
        lines.append(f"packing efficiency (TRL bfd, max_length {report['max_length']}): {eff:.1%}")
    lines.append("OK: every row is valid" if report["valid"] else "FAILED: fix or drop the rows above")
    print("\n".join(lines))


# -- preview ------------------------------------------------------------------------------------


def _add_preview(sub) -> None:
    p = sub.add_parser(
        "preview",
        help="show the exact tokens and loss mask of each row",
        description="Encode rows exactly as training will. --jsonl prints one JSON object per row, "
        "in order; an invalid row prints 'FILE:LINE: reason' on stderr, gets no JSON line, and "
        "makes the exit status 1 (the other rows are still printed). Without --jsonl, trained "
        "tokens are shown inside {+ +} (and green on a terminal), masked ones as they are.",
    )
    p.add_argument("--tokenizer", choices=TOKENIZER_CHOICES, required=True)
    p.add_argument("--kind", choices=("sft", "dpo"), required=True)
    p.add_argument("--data", required=True, metavar="FILE")
    p.add_argument("--jsonl", action="store_true", help="machine-readable ids, one JSON object per row")
    p.add_argument("--max-rows", type=int, default=None, metavar="N", help="stop after N rows")
    p.add_argument("--train-on", choices=("all", "last"), default="all", help="SFT: which replies are trained")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    _add_ignore_fields(p)
    p.set_defaults(func=_cmd_preview)


def _cmd_preview(args) -> int:
    from mistral_align.chat.encoder import get_encoder
    from mistral_align.data.read import SourceError, read_source
    from mistral_align.data.encode import check_row

    _require_file(args.data)
    if args.max_rows is not None and args.max_rows < 0:
        raise UsageError(f"--max-rows must be >= 0, got {args.max_rows}")
    try:
        raw = read_source(_source(args))
    except SourceError as e:
        raise UsageError(str(e)) from None
    encoder = get_encoder(args.tokenizer)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ)
    status = EXIT_OK
    rows = list(zip(raw.lines, raw.rows, raw.read_errors))
    for line, text, err in rows[: args.max_rows] if args.max_rows is not None else rows:
        r = check_row(args.kind, text, encoder, train_on=args.train_on, read_error=err)
        if r.error:
            print(f"{raw.label}:{line}: {r.error}", file=sys.stderr)
            status = EXIT_BAD_ROWS
            continue
        if args.jsonl:
            print(json.dumps(r.ids))
        else:
            print(_render_row(f"{raw.label}:{line}", args.kind, r, encoder, color))
    sys.stdout.flush()
    return status


_GREEN, _DIM, _RESET = "\x1b[32m", "\x1b[2m", "\x1b[0m"


def _visible(piece: str) -> str:
    # Tekken pieces carry real spaces and newlines (sentencepiece writes ▁ and <0x0A>); show them
    # the sentencepiece way so tokens stay apart and each row stays on one line.
    return piece.replace(" ", "▁").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


def _render_tokens(ids: list[int], trained: list[bool], encoder, color: bool) -> str:
    """Pieces separated by spaces; each run of trained tokens wrapped in {+ +} (wdiff's 'added'
    marker, readable in logs) and, with colour, green while masked tokens are dim."""
    out, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and trained[j] == trained[i]:
            j += 1
        text = " ".join(_visible(encoder.piece(t)) for t in ids[i:j])
        if trained[i]:
            out.append(f"{_GREEN}{{+{text}+}}{_RESET}" if color else f"{{+{text}+}}")
        else:
            out.append(f"{_DIM}{text}{_RESET}" if color else text)
        i = j
    return " ".join(out)


def _render_row(where: str, kind: str, r, encoder, color: bool) -> str:
    from mistral_align.chat.encoder import IGNORE_INDEX

    if kind == "sft":
        ids, labels = r.ids["input_ids"], r.ids["labels"]
        body = _render_tokens(ids, [x != IGNORE_INDEX for x in labels], encoder, color)
        return f"── {where}  tokens: {r.tokens}  trained: {r.trained}  masked: {r.tokens - r.trained}\n{body}\n"
    p, c, rej = r.ids["prompt_ids"], r.ids["chosen_ids"], r.ids["rejected_ids"]
    return (
        f"── {where}  prompt: {len(p)} tokens (masked)  chosen: {len(c)}  rejected: {len(rej)} (trained)\n"
        f"prompt:   {_render_tokens(p, [False] * len(p), encoder, color)}\n"
        f"chosen:   {_render_tokens(c, [True] * len(c), encoder, color)}\n"
        f"rejected: {_render_tokens(rej, [True] * len(rej), encoder, color)}\n"
    )


# -- push / merge / export-gguf / chat ----------------------------------------------------------


def _add_push(sub) -> None:
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
    from mistral_align.hub.push import push_run

    r = push_run(args.run_dir, args.repo_id, stage=args.stage, private=args.private, revision=args.revision,
                 dry_run=args.dry_run, license=args.license)
    if r.dry_run:
        print(f"dry run: wrote {len(r.files)} files to {r.folder} (nothing uploaded)")
        for f in r.files:
            print(f"  {f}")
    else:
        print(f"pushed {len(r.files)} files to https://huggingface.co/{r.repo_id}" + (f" ({r.commit_url})" if r.commit_url else ""))
    return EXIT_OK


def _add_merge(sub) -> None:
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
    from mistral_align.export.rundir import resolve_source

    resolve_source(args.run_dir, args.stage, args.allow_pickle)  # user mistakes before any model loads
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UsageError(f"--out {args.out}: exists and is not an empty directory")
    from mistral_align.export.merge import merge_run

    out = merge_run(args.run_dir, args.out, dtype=args.dtype, base=args.base, stage=args.stage,
                    allow_pickle=args.allow_pickle)
    print(f"merged model written to {out}")
    return EXIT_OK


def _add_export_gguf(sub) -> None:
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
    from mistral_align.export.gguf import export_gguf

    path = export_gguf(args.source, args.out, gguf_type=args.gguf_type, stage=args.stage, base=args.base,
                       allow_pickle=args.allow_pickle)
    print(f"{path}: {os.path.getsize(path)} bytes ({args.gguf_type})")
    return EXIT_OK


def _add_chat(sub) -> None:
    p = sub.add_parser(
        "chat",
        help="talk to a run (base + adapter) or a merged model",
        description="Interactive (history kept; /reset, /system TEXT, /exit) or one-shot with --prompt. Prompts are "
        "built by the exact Mistral encoder: typing [INST] gives the text, never the control token.",
    )
    p.add_argument("source", metavar="RUN_DIR|MERGED_DIR")
    p.add_argument("--prompt", default=None, metavar="TEXT", help="one-shot: print the reply and exit")
    p.add_argument("--system", default=None, metavar="TEXT")
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


def _cmd_chat(args) -> int:
    from mistral_align.chat.session import ChatSession, Sampling, interactive, load_for_chat
    from mistral_align.export.rundir import resolve_source

    sampling = Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty, args.max_new_tokens, args.seed)
    sampling.check()
    resolve_source(args.source, args.stage, args.allow_pickle)
    model, encoder = load_for_chat(args.source, quant=args.quant, stage=args.stage, dtype=args.dtype,
                                   allow_pickle=args.allow_pickle)
    session = ChatSession(model, encoder, sampling, system=args.system)
    if args.prompt is not None:
        if args.no_stream:
            print(session.say(args.prompt), flush=True)
        else:
            session.say(args.prompt, stream=lambda s: print(s, end="", flush=True))
            print(flush=True)
        return EXIT_OK
    interactive(session, stream=not args.no_stream)
    return EXIT_OK


# -- estimate -----------------------------------------------------------------------------------

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


def _add_estimate(sub) -> None:
    p = sub.add_parser(
        "estimate",
        help="GPU memory of a training run, before anything loads",
        description="Estimate per-GPU memory (weights, LoRA, gradients, optimizer, activations) from the "
        "same Hydra config and overrides the recipes take; no download, no model built.",
    )
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides, e.g. model=mixtral-8x7b-v0.1 quant=nf4")
    p.add_argument("--config-name", default="sft_dpo", help="primary config under configs/ (sft, dpo, sft_dpo)")
    p.add_argument("--stage", choices=("sft", "dpo"), default=None, help="which stage's train node (default: sft)")
    p.add_argument("--num-gpus", type=int, default=1, metavar="N")
    p.add_argument("--parallel", choices=("ddp", "fsdp", "zero3"), default="ddp")
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON object")
    p.set_defaults(func=_cmd_estimate)


def compose_config(config_name: str, overrides: list[str]):
    """The recipes' resolved config, composed from configs/ with `overrides` (no Hydra app, no run)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from mistral_align.config import register_configs

    register_configs()
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name, overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        cause = e.__cause__ or e
        raise UsageError(" ".join(str(cause).split())) from None


def _cmd_estimate(args) -> int:
    from mistral_align.config import check_config
    from mistral_align.model.estimate import estimate_memory, format_estimate

    if args.num_gpus < 1:
        raise UsageError(f"--num-gpus must be >= 1, got {args.num_gpus}")
    cfg = compose_config(args.config_name, list(args.overrides))
    stage = args.stage or "sft"
    check_config(cfg, stages=(stage,), need_data=False)
    report = estimate_memory(cfg, num_gpus=args.num_gpus, parallel=args.parallel, stage=stage)
    print(json.dumps(report) if args.json else format_estimate(report))
    return EXIT_OK


# -- entry point --------------------------------------------------------------------------------

SUBCOMMANDS = (_add_validate, _add_preview, _add_estimate, _add_chat, _add_merge, _add_export_gguf, _add_push)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mistral-align",
        description="SFT then DPO for Mistral models, with tokens byte-identical to mistral-common.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_libraries()
    try:
        return args.func(args)
    except UserError as e:  # usage, config, data, run directory or Hub: one line, never a traceback
        print(f"mistral-align {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # `mistral-align preview ... | head` closes the pipe early
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
