"""The tables a run prints: what a stage gained on held-out data, and the pipeline's summary."""

from __future__ import annotations

from typing import Any

from mistral_align.schema.objectives import NAMES


def _bar(bar: dict | None, cleared: bool) -> str:
    """A skill's bar ({"bar", ...} or None) for the tables' last column, "!" where it fell short of it."""
    return "" if bar is None else f"{bar['bar']:6.0%}" + ("" if cleared else " !")


def missed_bars(bars: dict | None, when: str) -> list[str]:
    return [f"{skill} {b['exact_match']:.1%} {when} (bar {b['bar']:.0%})" for skill, b in (bars or {}).items()
            if not b["cleared"]]


def generation_table(before: dict[str, Any], after: dict[str, Any], loss_before: float | None, loss_after: float | None,
                     bars: dict | None = None) -> str:
    """Greedy exact match before/after (overall and per group), with the held-out loss if known, and
    each group's bar (`<stage>.synthetic.bars`) if it has one."""
    bars = bars or {}
    lines = [f"{'':<16}{'before':>10}{'after':>10}" + (f"{'bar':>7}" if bars else "")]
    if loss_before is not None or loss_after is not None:
        fmt = lambda v: f"{v:10.3f}" if v is not None else f"{'-':>10}"  # noqa: E731
        lines.append(f"{'eval loss':<16}{fmt(loss_before)}{fmt(loss_after)}")
    lines.append(f"{'exact match':<16}{before['exact_match']:10.1%}{after['exact_match']:10.1%}")
    for g in after.get("by_group", {}):
        lines.append(f"{'  ' + g:<16}{before['by_group'].get(g, 0):10.1%}{after['by_group'][g]:10.1%}"
                     + _bar(bars.get(g), bars.get(g, {}).get("cleared", True)))
    lines.append(f"(n = {after['n']} held-out prompts, greedy decoding)")
    missed = missed_bars(bars, "after")
    if missed:
        lines.append("below its bar: " + ", ".join(missed))
    examples = after["samples"][:4]
    for s_before, s in zip(before["samples"][:4], examples):
        lines.append(f"  {s['prompt']!r}: before {s_before['output'][:30]!r} -> after {s['output'][:30]!r}")
    return "\n".join(lines)


PREFERENCE_ROWS = (
    ("reward accuracy", "reward_accuracy", "{:10.1%}"),
    ("reward margin", "reward_margin", "{:10.3f}"),
    ("logp chosen", "logp_chosen", "{:10.2f}"),
    ("logp rejected", "logp_rejected", "{:10.2f}"),
    ("KL", "kl", "{:10.4f}"),
    ("NLL", "nll_loss", "{:10.4f}"),
    ("{name} loss", "loss", "{:10.4f}"),
)


def preference_table(before: dict, after: dict, labels: tuple[str, str] = ("before", "after"),
                     objective: str = "dpo") -> str:
    """Held-out reward accuracy and margin, log-probs of chosen (KTO: desirable) and rejected replies,
    the objective's loss."""
    name = NAMES.get(objective, objective.upper())
    lines = [f"{'held-out ' + ('rows' if objective == 'kto' else 'pairs'):<16}{labels[0]:>12}{labels[1]:>12}"]
    lines += [f"{label.format(name=name):<16}  {fmt.format(before[key])}  {fmt.format(after[key])}"
              for label, key, fmt in PREFERENCE_ROWS if key in before and key in after]
    return "\n".join(lines)


def pipeline_summary(sft: dict, dpo: dict) -> dict:
    """The pipeline's summary from its two stages' summaries: exact match at base, after SFT, after DPO."""
    summary = {"sft": sft["sft"], "dpo": dpo["dpo"], "eval": {}}
    if sft.get("eval") and dpo.get("eval"):
        em = {"before": sft["eval"]["exact_match"]["before"], "after_sft": sft["eval"]["exact_match"]["after"],
              "after_dpo": dpo["eval"]["exact_match"]["after"]}
        em["after"] = em["after_dpo"]
        summary["eval"] = {"exact_match": em, "n": dpo["eval"]["n"], "samples_after": dpo["eval"]["samples_after"]}
        if sft["eval"].get("by_skill") and dpo["eval"].get("by_skill"):
            summary["eval"]["by_skill"] = {"before": sft["eval"]["by_skill"]["before"],
                                           "after_sft": sft["eval"]["by_skill"]["after"],
                                           "after_dpo": dpo["eval"]["by_skill"]["after"]}
        bars = {"after_sft": sft["eval"].get("bars"), "after_dpo": dpo["eval"].get("bars")}
        if any(bars.values()):
            summary["eval"]["bars"] = {k: v for k, v in bars.items() if v}
    return summary


def pipeline_table(summary: dict, objective: str = "dpo") -> str:
    """SFT's gain, then the preference stage's, on the same held-out prompts."""
    name = NAMES.get(objective, objective.upper())
    lines = [f"SFT -> {name} on held-out data"]
    em = summary["eval"].get("exact_match")
    bars = summary["eval"].get("bars", {})
    if em:
        lines.append(f"{'':<18}{'base':>10}{'after SFT':>11}{'after ' + name:>11}" + (f"{'bar':>7}" if bars else ""))
        lines.append(f"{'exact match':<18}{em['before']:10.1%}{em['after_sft']:11.1%}{em['after_dpo']:11.1%}")
        s = summary["eval"].get("by_skill")
        for skill in (s or {}).get("after_dpo", {}):
            # the bar column shows the SFT stage's bar (the DPO stage's where SFT has none), "!" if either was missed
            b = (bars.get("after_sft") or {}).get(skill) or (bars.get("after_dpo") or {}).get(skill)
            cleared = all(v[skill]["cleared"] for v in bars.values() if skill in v)
            lines.append(f"{'  ' + skill:<18}{s['before'].get(skill, 0):10.1%}{s['after_sft'].get(skill, 0):11.1%}"
                         f"{s['after_dpo'][skill]:11.1%}" + _bar(b, cleared))
        missed = missed_bars(bars.get("after_sft"), "after SFT") + missed_bars(bars.get("after_dpo"), "after DPO")
        if missed:
            lines.append("below its bar: " + ", ".join(missed))
        elif bars:
            lines.append("every skill cleared its bar" + (" after SFT and after DPO" if len(bars) == 2 else ""))
    sft = summary["sft"]
    if "loss" in sft.get("before", {}) and "loss" in sft.get("after", {}):
        lines.append(f"{'SFT eval loss':<18}{sft['before']['loss']:10.3f}{sft['after']['loss']:11.3f}")
    dpo = summary["dpo"]
    if dpo.get("before") and dpo.get("after"):
        lines.append("")
        lines.append(preference_table(dpo["before"], dpo["after"], labels=("after SFT", f"after {name}"), objective=objective))
    lines.append(f"wall time {summary.get('wall_seconds', 0):.0f}s")
    return "\n".join(lines)
