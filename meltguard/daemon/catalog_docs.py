"""Render docs/metrics.md from the metric catalogue.

    python -m meltguard.daemon.catalog_docs > docs/metrics.md

tests/dashboards checks that the committed file equals this output, so the reference can not
drift from the exporter.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence

from meltguard.daemon.catalog import CATALOG, PREFIX, MetricSpec

REGENERATE = "python -m meltguard.daemon.catalog_docs > docs/metrics.md"

# What each label means and which values it takes. Every label used in CATALOG must be here:
# render() refuses to produce a reference with an undocumented label.
LABEL_DOCS: dict[str, str] = {
    "tier": "Policy tier of the caller (`free`, `plus`, `pro` with the default policy; "
    "whatever the policy's `tiers` name).",
    "decision": "`admit`, `degrade`, `queue`, `reject`; in shadow mode `would_reject` and "
    "`would_degrade` (the request was admitted unchanged).",
    "reason": "The error code behind the decision (`rate_limit_exceeded`, "
    "`daily_quota_exceeded`, `server_overloaded`, `queue_timeout`, `gpu_out_of_memory`, "
    "`quota_store_unavailable`), `fail_open` when the quota store failed and the request was "
    "let through, `ok` otherwise. For `gpu_throttle_active` it is the NVML clocks-event reason, "
    "named as in the policy's `throttle` list (`sw_thermal`, `hw_thermal`, ...).",
    "code": "HTTP status code of the response (`200`, `429`, `503`, ...).",
    "endpoint": "The images route the request came to: `generations` "
    "(`/v1/images/generations`, and decisions made outside a request) or `edits` "
    "(`/v1/images/edits`).",
    "model": "Model the engine runs (`tiny`, `sim`, a path or a Hugging Face id).",
    "gpu": "GPU index as a string (`0`, `1`, ...); `pressure_level` also has `gpu=\"all\"`, the "
    "level admission acts on.",
    "level": "Pressure level name: `elevated`, `high`, `critical`.",
    "error": "Telemetry error kind (for example the NVML error name).",
    "source": "Telemetry source in use: `nvml`, `simulated`, `replay`.",
    "requested": "Telemetry source asked for on the command line: `auto`, `nvml`, `sim`, "
    "`replay`.",
    "result": "`success` or `failure`; for `quota_refunds_total` also `retry`, `dropped` and "
    "`abandoned`. `power_limit_changes`: `success`, `shadow` (logged, not set), `unreadable` "
    "(no default limit to scale), or the NVML refusal (`nvml_no_permission`, "
    "`nvml_not_supported`, `nvml_gpu_is_lost`, ...).",
    "mode": "Policy mode: `enforce` or `shadow`.",
    "sha256": "SHA-256 of the policy file in force.",
    "store": "Quota store backend: `memory`, `sqlite`, `redis`.",
}


def _cell(text: str) -> str:
    """Escape a table cell: a `|` would end the cell, a newline the row."""
    return text.replace("|", "\\|").replace("\n", " ")


def _code(names: Iterable[str]) -> str:
    return ", ".join(f"`{name}`" for name in names)


def query_name(spec: MetricSpec) -> str:
    """The series name to put in a query: `_total` for counters, the base name otherwise."""
    return spec.full_name + "_total" if spec.kind == "counter" else spec.full_name


def _series(spec: MetricSpec) -> str:
    if spec.kind == "histogram":
        names = (name for name in spec.exported_names if not name.endswith("_created"))
        return ", ".join(f"`{name}`" for name in names)
    return f"`{query_name(spec)}`"


def _buckets(spec: MetricSpec) -> str:
    return ", ".join(f"{bound:g}" for bound in spec.buckets)


def render(catalog: Sequence[MetricSpec] = CATALOG) -> str:
    labels = sorted({label for spec in catalog for label in spec.labels})
    undocumented = [label for label in labels if label not in LABEL_DOCS]
    if undocumented:
        raise ValueError(f"labels without documentation in LABEL_DOCS: {undocumented}")

    out: list[str] = [
        "# meltguard metrics",
        "",
        "<!-- Generated from meltguard/daemon/catalog.py; do not edit by hand. Regenerate with:",
        f"     {REGENERATE} -->",
        "",
        f"Every metric carries the `{PREFIX}` prefix and is in Prometheus base units (seconds, "
        "bytes, watts, ratios 0-1). Counters are exported with the `_total` suffix (plus "
        "`_created`), histograms as `_bucket`, `_sum` and `_count`. Dashboards and alert rules "
        "may name only these series and the recording rules of `dashboards/prometheus/rules.yml`; "
        "`tests/dashboards` checks it.",
        "",
        "| Series | Type | Labels | Unit | Meaning |",
        "|---|---|---|---|---|",
    ]
    for spec in catalog:
        row = (
            _series(spec),
            spec.kind,
            _code(spec.labels) if spec.labels else "-",
            spec.unit,
            _cell(spec.help),
        )
        out.append("| " + " | ".join(row) + " |")

    histograms = [spec for spec in catalog if spec.kind == "histogram"]
    if histograms:
        out += ["", "## Histogram buckets", "", "| Histogram | Upper bounds (`le`) |", "|---|---|"]
        out += [f"| `{spec.full_name}` | {_buckets(spec)} |" for spec in histograms]

    out += ["", "## Labels", "", "| Label | Values |", "|---|---|"]
    out += [f"| `{label}` | {_cell(LABEL_DOCS[label])} |" for label in labels]
    out.append("")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        sys.stderr.write(f"usage: {REGENERATE}\n")
        return 2
    sys.stdout.write(render())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
