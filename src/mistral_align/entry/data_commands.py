"""`mistral-align validate` and `preview`: a data file checked, and shown as training will encode it.

Both read rows with the training loader's own code (data/read.py, data/encode.py), so what they
call valid is exactly what training accepts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

from mistral_align.chat.encoder import IGNORE_INDEX, get_encoder
from mistral_align.errors import EXIT_BAD_ROWS, EXIT_OK, DataError, UsageError
from mistral_align.names import TOKENIZER_VERSIONS, TOOL_CALL_IDS
from mistral_align.schema.data import SFTDataConfig, SourceConfig


def _require_file(path: str) -> None:
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a directory; name a .jsonl, .json or .parquet file in it")
    if not os.path.isfile(path):
        raise UsageError(f"{path}: no such file")


def add_validate(sub) -> None:
    p = sub.add_parser(
        "validate",
        help="check every row of a data file before training",
        description="Check every row (JSON, fields, roles, turn order, lengths) with the same code "
        "training uses. Exit 0 when every row is valid, 1 otherwise.",
    )
    p.add_argument("--kind", choices=KINDS, required=True, help=KIND_HELP)
    p.add_argument("--data", required=True, metavar="FILE", help=".jsonl, .json or .parquet")
    p.add_argument("--tokenizer", choices=TOKENIZER_VERSIONS, default="v3")
    p.add_argument("--max-length", type=int, default=2048, metavar="N")
    p.add_argument("--train-on", choices=("all", "last"), default="all", help="SFT: which replies are trained")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    _add_ignore_fields(p)
    _add_tool_options(p)
    p.set_defaults(func=_cmd_validate)


KINDS = ("sft", "dpo", "kto")
KIND_HELP = ("sft: conversations; dpo: preference pairs; kto: rows of prompt, completion and a true/false label "
             "(dpo.objective=kto), or preference pairs, each split into a desirable and an undesirable row")


def _add_ignore_fields(p) -> None:
    p.add_argument("--ignore-fields", default="", metavar="KEY,KEY",
                   help="top-level keys to drop from every row first (a source's ignore_fields)")


def _add_tool_options(p) -> None:
    """The data node's tool keys (<stage>.data.tool_call_ids, sft.data.train_thinking) as options."""
    p.add_argument("--tool-call-ids", choices=TOOL_CALL_IDS, default="keep",
                   help="keep the rows' tool call ids (one the tokenizer refuses is a bad row), or regenerate them "
                   "in the tokenizer's form (<stage>.data.tool_call_ids)")
    p.add_argument("--train-thinking", action=argparse.BooleanOptionalAction, default=True,
                   help="SFT, v13: train each reply's thinking block (default), or mask it (sft.data.train_thinking)")


def _source(args):
    return SourceConfig(path=args.data, ignore_fields=[k.strip() for k in args.ignore_fields.split(",") if k.strip()])


def _cmd_validate(args) -> int:
    from mistral_align.data.load import load_data  # lazy: imports datasets (start-up time)

    _require_file(args.data)
    if args.max_length <= 0:
        raise UsageError(f"--max-length must be positive, got {args.max_length}")
    # Skip mode on both counts collects every problem instead of stopping at the first batch;
    # the loader is the training loader, so validate and training cannot disagree.
    cfg = SFTDataConfig(
        train=[_source(args)],
        max_length=args.max_length,
        train_on=args.train_on,
        train_thinking=args.train_thinking,
        tool_call_ids=args.tool_call_ids,
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
        # How the rows were read (data/read.py FORMATS): the shape of the file's first rows.
        "format": r["sources"][0]["format"],
        "rows": r["rows_read"],
        "valid_rows": r["rows_read"] - len(problems),
        "bad_rows": [_split_problem(p, args.data) for p in problems],
        "over_length_rows": sum(1 for p in problems if "over max_length" in p),
        "tokens": r["tokens"],
        "trained_tokens": r["trained_tokens"],
        "packing_efficiency": r["packing_efficiency"],
        # Valid rows with tools or thinking, and the calls and results their encoding leaves out (v2:
        # those before the last user message; mistral-common encodes them as nothing).
        "tool_rows": r["tool_rows"],
        "thinking_rows": r["thinking_rows"],
        "dropped_tool_calls": r["dropped_tool_calls"],
        "dropped_tool_results": r["dropped_tool_results"],
    }
    if args.kind == "kto":
        # The replies KTO will train on (a pair gives one of each) and TRL's advice on their balance.
        from mistral_align.data.kto import balance_advice

        report.update(desirable=r["desirable"], undesirable=r["undesirable"],
                      balance_warning=balance_advice(r["desirable"], r["undesirable"]) if report["valid_rows"] else None)
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


# Bad rows printed one per line for each kind of reason; the rest of that kind are counted in one
# line (500 rows missing the same field are 3 lines and a count, not 500 lines). --json lists all.
SHOWN_PER_REASON = 3


def _print_problems(problems: list[str], bad_rows: list[dict]) -> None:
    from mistral_align.data.encode import categorize  # lazy: start-up time

    shown: Counter = Counter()
    hidden: dict[str, list[int]] = {}
    for problem, row in zip(problems, bad_rows):
        kind = categorize(row["reason"])
        kind = row["reason"] if kind == "other" else kind  # "other" is no kind: keep each reason apart
        if shown[kind] < SHOWN_PER_REASON:
            print(problem)
            shown[kind] += 1
        else:
            hidden.setdefault(kind, []).append(row["line"])
    for kind, lines in hidden.items():
        where = f"line {lines[0]}" if len(lines) == 1 else f"lines {lines[0]} to {lines[-1]}"
        print(f"... and {len(lines)} more bad row(s) of the kind '{kind}' ({where}); --json lists every row")


def _shape(fmt: str) -> str:
    from mistral_align.data.read import SHAPE_TEXT

    return f"{fmt} ({SHAPE_TEXT[fmt]})" if fmt in SHAPE_TEXT else "no known shape (each bad row says why)"


def _print_validate_report(report: dict, problems: list[str]) -> None:
    _print_problems(problems, report["bad_rows"])
    eff = report["packing_efficiency"]
    lines = [
        f"{report['file']}: {report['rows']} rows, {report['valid_rows']} valid, {len(problems)} bad "
        f"({report['over_length_rows']} over max_length {report['max_length']})",
        f"rows read as: {_shape(report['format'])}",
        f"tokens: {report['tokens']}  trained tokens: {report['trained_tokens']}  (valid rows, tokenizer {report['tokenizer']})",
    ]
    if eff is not None:
        lines.append(f"packing efficiency (TRL bfd, max_length {report['max_length']}): {eff:.1%}")
    if report["tool_rows"] or report["thinking_rows"]:
        lines.append(f"tool rows: {report['tool_rows']}  thinking rows: {report['thinking_rows']}")
    if report["kind"] == "kto":
        lines.append(f"KTO replies: {report['desirable']} desirable, {report['undesirable']} undesirable")
        if report["balance_warning"]:
            lines.append(f"warning: {report['balance_warning']}")
    if report["dropped_tool_calls"] or report["dropped_tool_results"]:
        lines.append(f"left out by tokenizer {report['tokenizer']} (as mistral-common encodes it): "
                     f"{report['dropped_tool_calls']} tool call(s) and {report['dropped_tool_results']} tool result(s) "
                     "before the last user message of their row")
    lines.append("OK: every row is valid" if report["valid"] else "FAILED: fix or drop the rows above")
    print("\n".join(lines))


# -- preview ------------------------------------------------------------------------------------


def add_preview(sub) -> None:
    p = sub.add_parser(
        "preview",
        help="show the exact tokens and loss mask of each row",
        description="Encode rows exactly as training will. --jsonl prints one JSON object per row, "
        "in order; an invalid row prints 'FILE:LINE: reason' on stderr, gets no JSON line, and "
        "makes the exit status 1 (the other rows are still printed). Without --jsonl, trained "
        "tokens are shown inside {+ +} (and green on a terminal), masked ones as they are.",
    )
    p.add_argument("--tokenizer", choices=TOKENIZER_VERSIONS, required=True)
    p.add_argument("--kind", choices=KINDS, required=True, help=KIND_HELP + "; --jsonl prints a pair's two rows")
    p.add_argument("--data", required=True, metavar="FILE")
    p.add_argument("--jsonl", action="store_true", help="machine-readable ids, one JSON object per row")
    p.add_argument("--max-rows", type=int, default=None, metavar="N", help="stop after N rows")
    p.add_argument("--train-on", choices=("all", "last"), default="all", help="SFT: which replies are trained")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    _add_ignore_fields(p)
    _add_tool_options(p)
    p.set_defaults(func=_cmd_preview)


def _cmd_preview(args) -> int:
    from mistral_align.data.encode import check_row
    from mistral_align.data.read import SourceError, read_source

    _require_file(args.data)
    if args.max_rows is not None and args.max_rows < 0:
        raise UsageError(f"--max-rows must be >= 0, got {args.max_rows}")
    try:
        raw = read_source(_source(args))
    except SourceError as e:
        raise UsageError(str(e)) from None
    encoder = get_encoder(args.tokenizer)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty() and "NO_COLOR" not in os.environ)
    if not args.jsonl and raw.format not in ("messages", "preference"):  # (--jsonl: the ids and nothing else)
        print(f"{raw.label}: rows read as {_shape(raw.format)}\n")
    status = EXIT_OK
    rows = list(zip(raw.lines, raw.rows, raw.read_errors))
    for line, text, err in rows[: args.max_rows] if args.max_rows is not None else rows:
        r = check_row(args.kind, text, encoder, train_on=args.train_on, read_error=err,
                      tool_call_ids=args.tool_call_ids, train_thinking=args.train_thinking)
        if r.error:
            print(f"{raw.label}:{line}: {r.error}", file=sys.stderr)
            status = EXIT_BAD_ROWS
            continue
        if args.jsonl:
            for ids in _jsonl_rows(args.kind, r.ids):
                print(json.dumps(ids))
        else:
            print(_render_row(f"{raw.label}:{line}", args.kind, r, encoder, color))
    sys.stdout.flush()
    return status


def _jsonl_rows(kind: str, ids: dict) -> list[dict]:
    """What --jsonl prints for one valid row: its ids; KTO: {prompt_ids, completion_ids, label}, a
    pair as its two rows (desirable, then undesirable), as training splits it."""
    if kind != "kto":
        return [ids]
    rows = [{"prompt_ids": ids["prompt_ids"], "completion_ids": ids["completion_ids"], "label": ids["label"]}]
    if ids["rejected_ids"]:
        rows.append({"prompt_ids": ids["prompt_ids"], "completion_ids": ids["rejected_ids"], "label": False})
    return rows


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


def _left_out(r) -> str:
    """What the version's encoding leaves out of the row (v2: calls and results before the last user message)."""
    if not (r.dropped_tool_calls or r.dropped_tool_results):
        return ""
    return f"  left out: {r.dropped_tool_calls} tool call(s), {r.dropped_tool_results} tool result(s)"


def _render_row(where: str, kind: str, r, encoder, color: bool) -> str:
    if kind == "sft":
        ids, labels = r.ids["input_ids"], r.ids["labels"]
        body = _render_tokens(ids, [x != IGNORE_INDEX for x in labels], encoder, color)
        return f"── {where}  tokens: {r.tokens}  trained: {r.trained}  masked: {r.tokens - r.trained}{_left_out(r)}\n{body}\n"
    if kind == "kto":
        p = r.ids["prompt_ids"]
        lines = [f"── {where}  prompt: {len(p)} tokens (masked){_left_out(r)}",
                 f"prompt:      {_render_tokens(p, [False] * len(p), encoder, color)}"]
        for row in _jsonl_rows(kind, r.ids):
            c = row["completion_ids"]
            verdict = "desirable:  " if row["label"] else "undesirable:"
            lines.append(f"{verdict} {_render_tokens(c, [True] * len(c), encoder, color)}")
        return "\n".join(lines) + "\n"
    p, c, rej = r.ids["prompt_ids"], r.ids["chosen_ids"], r.ids["rejected_ids"]
    return (
        f"── {where}  prompt: {len(p)} tokens (masked)  chosen: {len(c)}  rejected: {len(rej)} (trained){_left_out(r)}\n"
        f"prompt:   {_render_tokens(p, [False] * len(p), encoder, color)}\n"
        f"chosen:   {_render_tokens(c, [True] * len(c), encoder, color)}\n"
        f"rejected: {_render_tokens(rej, [True] * len(rej), encoder, color)}\n"
    )
