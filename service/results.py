"""Evaluation metrics as a compact table: one row per network (the encoder, then the
baselines), one column per protocol, top-1 on the held-out split. Shared by
``selfsup job status``, ``selfsup eval`` and ``selfsup encoder list``; no torch.

Metric names follow ``{subject}.{protocol}.top1[.mean|.std]`` (see pipelines/evaluate.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

SUBJECTS = {"eval": "encoder", "baseline.raw": "raw pixels", "baseline.random": "random init"}
LEGEND = "top-1 on the test split"
SEMI_LEGEND = (
    "; N%: share of training labels, mean±std over seeds; lin: linear probe, ft: fine-tuned"
)


def _parse(key: str) -> tuple[str, str] | None:
    """``baseline.raw.semi.0.1.linear.top1.mean`` -> (``baseline.raw``, ``semi.0.1.linear``);
    None for top-5 and for anything that is not an evaluation metric."""
    for subject in SUBJECTS:
        if key.startswith(subject + "."):
            protocol, found, statistic = key[len(subject) + 1 :].partition(".top1")
            if found and statistic in ("", ".mean", ".std"):
                return subject, protocol
    return None


def _column_order(protocol: str) -> tuple[int, float, str]:
    if protocol.startswith("semi."):
        fraction, _, kind = protocol.removeprefix("semi.").rpartition(".")
        return 2, float(fraction), {"linear": "0", "finetune": "1"}.get(kind, kind)
    return {"linear": 0, "knn": 1}.get(protocol, 3), 0.0, protocol


def column_title(protocol: str) -> str:
    """``linear`` -> ``linear``; ``semi.0.01.finetune`` -> ``1% ft``."""
    if not protocol.startswith("semi."):
        return protocol
    fraction, _, kind = protocol.removeprefix("semi.").rpartition(".")
    short = {"linear": "lin", "finetune": "ft"}.get(kind, kind)
    return f"{float(fraction) * 100:g}% {short}"


def protocols_in(keys: Iterable[str]) -> list[str]:
    """The protocols (table columns) that some key measures, in reading order."""
    found = {parsed[1] for key in keys if (parsed := _parse(key))}
    return sorted(found, key=_column_order)


def cell(values: Mapping[str, object], subject: str, protocol: str) -> str:
    """One table cell from metrics (numbers, or numeric strings as version tags hold them):
    ``0.962``, ``0.712±0.031``, or ``-``."""
    base = f"{subject}.{protocol}.top1"
    if base in values:
        return f"{float(values[base]):.3f}"
    if f"{base}.mean" not in values:
        return "-"
    mean = float(values[f"{base}.mean"])
    std = values.get(f"{base}.std")
    return f"{mean:.3f}" if std is None else f"{mean:.3f}±{float(std):.3f}"


def results_table(metrics: Mapping[str, object], indent: str = "  ") -> list[str]:
    """The table's lines (empty when there are no evaluation metrics)."""
    protocols = protocols_in(metrics)
    if not protocols:
        return []
    measured = {parsed[0] for key in metrics if (parsed := _parse(key))}
    subjects = [subject for subject in SUBJECTS if subject in measured]
    rows = [["", *(column_title(protocol) for protocol in protocols)]]
    rows += [
        [SUBJECTS[subject], *(cell(metrics, subject, protocol) for protocol in protocols)]
        for subject in subjects
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        indent + "  ".join(text.ljust(width) for text, width in zip(row, widths, strict=True))
        for row in rows
    ]
    semi = any(protocol.startswith("semi.") for protocol in protocols)
    return [line.rstrip() for line in lines] + [f"{indent}({LEGEND}{SEMI_LEGEND if semi else ''})"]
