"""`asap bench`'s report: the JSON schema (checked by `validate_report`), the terminal/Markdown
table, the latency plot, and writing them (`write_reports`, after `check_report_outputs` said,
before any measuring, that nothing would be lost). engines/bench.py measures and builds the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asap_deploy.export.stages import KEYS as STAGES

SCHEMA = "asap-deploy/bench"
SCHEMA_VERSION = 1


def validate_report(rep: dict) -> None:
    """Check a report's structure (the JSON schema, written as code); ValueError naming the field."""
    def need(obj, key, typ, where):
        if key not in obj or not isinstance(obj[key], typ):
            raise ValueError(f"{where}.{key}: missing or not {typ}")

    for k, t in (("schema", str), ("schema_version", int), ("machine", dict), ("model", dict), ("options", dict),
                 ("baseline", str), ("rows", list), ("timing", str)):
        need(rep, k, t, "report")
    if rep["schema"] != SCHEMA or rep["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"report.schema: {rep['schema']} v{rep['schema_version']}")
    for k, t in (("cpu", str), ("cores", int), ("gpu", dict), ("libraries", dict)):
        need(rep["machine"], k, t, "machine")
    for i, r in enumerate(rep["rows"]):
        where = f"rows[{i}]"
        for k, t in (("backend", str), ("precision", str), ("size", list), ("batch", int), ("stage", str),
                     ("status", str)):
            need(r, k, t, where)
        if r["status"] == "ok":
            for k in ("min_ms", "max_ms", "mean_ms", "std_ms", "median_ms", "p90_ms", "p95_ms", "p99_ms",
                      "throughput_ips", "total_s"):
                need(r, k, (int, float), where)
            need(r, "iterations", int, where)
            if not r["min_ms"] <= r["median_ms"] <= r["p90_ms"] <= r["p95_ms"] <= r["p99_ms"] <= r["max_ms"]:
                raise ValueError(f"{where}: statistics out of order")
            for k in ("vs_authors", "speedup_vs_authors", "peak_host_mib", "peak_device_mib"):
                if k not in r or not (r[k] is None or isinstance(r[k], (int, float))):
                    raise ValueError(f"{where}.{k}: missing or not a number/null")
            ph = r.get("phases_ms")
            if ph is not None and not (isinstance(ph, dict) and all(isinstance(v, (int, float)) for v in ph.values())):
                raise ValueError(f"{where}.phases_ms: not null or a mapping of phase -> ms")


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


def table_rows(rep: dict) -> list[list[str]]:
    """Rows of the terminal/Markdown table: backend, precision, size, batch, stage, status, stats."""
    out = []
    for r in rep["rows"]:
        size = f"{r['size'][0]}x{r['size'][1]}"
        if r["status"] != "ok":
            out.append([r["backend"], r["precision"], size, str(r["batch"]), r["stage"], r["status"]] + ["-"] * 10)
            continue
        out.append([r["backend"], r["precision"], size, str(r["batch"]), r["stage"], "ok",
                    _fmt(r["min_ms"]), _fmt(r["mean_ms"]), _fmt(r["median_ms"]), _fmt(r["p90_ms"]), _fmt(r["p95_ms"]),
                    _fmt(r["p99_ms"]), _fmt(r["throughput_ips"], ".2f"), _fmt(r["peak_host_mib"], ".0f"),
                    _fmt(r["vs_authors"], ".3f"), _fmt(r["speedup_vs_authors"], ".2f") + ("x" if r["speedup_vs_authors"] else "")])
    return out


COLUMNS = ["backend", "precision", "size", "batch", "stage", "status", "min ms", "mean ms", "median ms", "p90 ms",
           "p95 ms", "p99 ms", "images/s", "peak MiB", "time vs authors", "speed-up"]


def machine_text(rep: dict) -> str:
    from asap_deploy.engines.machine import machine_line

    m = dict(rep["machine"])
    m["load_avg"] = m.get("load_avg_start")
    return machine_line(m).replace(", load ", ", load at start ", 1)


REPORT_FILES = ("report.json", "report.md", "latency.png")
REPORT_KIND = "bench report"  # the ownership marker kind of a folder that only `bench` wrote to


def check_report_outputs(out_dir: Path, json_file: Path | None, overwrite: bool, inputs=()) -> None:
    """OutputError (before measuring) if writing the reports would lose a file: an existing report
    file is replaced only with --overwrite and only if asap wrote it (listed in its folder's
    ownership marker); never an input."""
    from asap_deploy.io import check_file_replaceable

    for p in [Path(out_dir) / n for n in REPORT_FILES] + ([Path(json_file)] if json_file is not None else []):
        check_file_replaceable(p, "report", overwrite, inputs)


def write_reports(rep: dict, out_dir: Path, json_file: Path | None = None) -> dict[str, Path]:
    """report.json, report.md and latency.png in `out_dir` (+ the JSON at `json_file`), atomically,
    each recorded in its folder's ownership marker (io.claim_files) so a later run may replace it."""
    from asap_deploy.io import claim_files, write_json, write_text

    out_dir = Path(out_dir)
    claim_files(out_dir, REPORT_KIND, REPORT_FILES)
    if json_file is not None:
        claim_files(Path(json_file).parent, REPORT_KIND, [Path(json_file).name])
    paths = {"json": write_json(out_dir / "report.json", rep), "markdown": write_text(out_dir / "report.md", to_markdown(rep))}
    try:
        paths["plot"] = plot(rep, out_dir / "latency.png")
    except ImportError:
        paths["plot"] = None  # matplotlib is optional (the [torch] extra)
    if json_file is not None:
        paths["json_file"] = write_json(Path(json_file), rep)
    return paths


def to_markdown(rep: dict) -> str:
    o = rep["options"]
    lines = ["# asap bench", "",
             f"Machine: {machine_text(rep)}", "",
             f"Model: {rep['model'].get('description') or rep['model'].get('bundle', '')} (S={rep['model'].get('S')})", "",
             f"Timing: {rep['timing']}. Warm-up {o['warmup_s']} s, then >= {o['min_iters']} iterations and "
             f">= {o['min_seconds']} s per row. Baseline: the authors' forward, measured in the same run; "
             "'time vs authors' = median / authors' median (lower is better), speed-up = its inverse. "
             "Peak MiB: resident high-water mark growth during the row (lower bound).", "",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table_rows(rep):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    split = [r for r in rep["rows"] if r.get("phases_ms")]
    if split:  # GPU engines: the wall-clock latency above includes these transfers
        lines += ["", "GPU phases per call (median ms, CUDA events): host->device | GPU compute | device->host", "",
                  "| backend | precision | size | batch | stage | H2D ms | GPU compute ms | D2H ms |", "|" + "---|" * 8]
        for r in split:
            ph = r["phases_ms"]
            lines.append(f"| {r['backend']} | {r['precision']} | {r['size'][0]}x{r['size'][1]} | {r['batch']} | "
                         f"{r['stage']} | {ph.get('h2d_ms', 0):.3f} | {ph.get('gpu_compute_ms', 0):.3f} | "
                         f"{ph.get('d2h_ms', 0):.3f} |")
    lines += ["", f"Total benchmark time {rep.get('seconds', 0):.0f} s; load average (1, 5, 15 min) at the start "
              f"{rep['machine'].get('load_avg_start')}, at the end {rep['machine'].get('load_avg_end')} (a shared "
              "CPU makes rows noisy).", ""]
    return "\n".join(lines)


def plot(rep: dict, path: Path) -> Path:
    """PNG bar chart: median latency (log scale) per backend, grouped by stage, one panel per size/batch/precision."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from asap_deploy.io import atomic_path

    ok = [r for r in rep["rows"] if r["status"] == "ok"]
    groups = sorted({(tuple(r["size"]), r["batch"], r["precision"]) for r in ok})
    backends = list(dict.fromkeys(r["backend"] for r in ok))
    stages = [s for s in STAGES if any(r["stage"] == s for r in ok)]
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.5 * max(1, len(groups)), 4.2), squeeze=False)
    for ax, (size, batch, prec) in zip(axes[0], groups):
        width = 0.8 / max(1, len(backends))
        for bi, b in enumerate(backends):
            vals = []
            for s in stages:
                r = next((r for r in ok if r["backend"] == b and r["stage"] == s and tuple(r["size"]) == size
                          and r["batch"] == batch and r["precision"] == prec), None)
                vals.append(r["median_ms"] if r else 0)
            xs = np.arange(len(stages)) + bi * width
            ax.bar(xs, vals, width, label=b)
            for x, v in zip(xs, vals):
                if v:
                    ax.text(x, v, f"{v:.3g}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(np.arange(len(stages)) + width * (len(backends) - 1) / 2)
        ax.set_xticklabels(stages)
        ax.set_yscale("log")
        ax.set_ylabel("median latency (ms, log scale)")
        ax.set_title(f"{size[0]}x{size[1]}, batch {batch}, {prec}", fontsize=10)
        ax.legend(fontsize=8)
    if not groups:
        axes[0][0].text(0.5, 0.5, "no successful rows", ha="center")
    fig.suptitle(machine_text(rep)[:110], fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
