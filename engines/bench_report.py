"""`asap bench`'s report: the JSON schema (checked by `validate_report`), the terminal/Markdown
table, the latency plot, and writing them (`write_reports`, after `check_report_outputs` said,
before any measuring, that nothing would be lost). engines/bench.py measures and builds the report.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from asap_deploy.export.stages import KEYS as STAGES

SCHEMA = "asap-deploy/bench"
# 2: cv/noisy, threads, fidelity per row; noisy_cv, threads, warnings per report
# 3 (issue 16): speedup_vs_authors_best, baseline_noisy, pixelwise_gflop / sgemm_floor_ms / vs_sgemm_floor
#   per row; machine.cpu_flags and machine.sgemm; skipped (backend, precision, reason) per report
SCHEMA_VERSION = 3
NOISY_CV = 0.10  # a row whose coefficient of variation (std / mean) is above this is flagged noisy
BUSY_LOAD_PER_CORE = 0.5  # load average (1 min) of other work per core above which the machine was busy


def report_warnings(rep: dict) -> list[str]:
    """What makes the figures less trustworthy, in words: noisy rows, a busy machine (load average
    at the start; at the end beyond this run's own threads), outputs below the fidelity threshold."""
    out = []
    ok = [r for r in rep["rows"] if r["status"] == "ok"]
    noisy = [r for r in ok if r.get("noisy")]
    if noisy:
        worst = max(noisy, key=lambda r: r["cv"])
        out.append(f"{len(noisy)} of {len(ok)} row(s) are noisy (coefficient of variation above "
                   f"{rep['noisy_cv']:.0%}, marked '!'; worst {worst['cv']:.0%}: {row_name(worst)}): their medians "
                   "are not reliable; rerun on an idle machine or with a longer --duration")
    m = rep["machine"]
    cores = m.get("cores") or 1
    start, end = m.get("load_avg_start"), m.get("load_avg_end")
    if start and start[0] >= BUSY_LOAD_PER_CORE * cores:
        out.append(f"the machine was busy: load average (1 min) {start[0]:g} at the start on {cores} cores (other "
                   "work was running before this run began); rows are slower and noisier than on an idle machine")
    threads = rep.get("threads") or 0
    if end and end[0] - threads >= BUSY_LOAD_PER_CORE * cores:
        out.append(f"the machine was busy: load average (1 min) {end[0]:g} at the end, above this run's own "
                   f"{threads} thread(s) on {cores} cores (other work ran meanwhile)")
    shaky = [r for r in ok if r["backend"] == "authors" and r.get("noisy")]
    for r in shaky:
        out.append(f"the authors' baseline is noisy at {r['size'][0]}x{r['size'][1]} batch {r['batch']} {r['stage']} "
                   f"(cv {r['cv']:.0%}; median {r['median_ms']:.1f} ms, min {r['min_ms']:.1f} ms): every speed-up against "
                   f"it is marked '{NOISY_BASELINE_MARK}' and is not reliable (the best-time speed-up suffers less); "
                   "rerun on an idle machine or with a longer --duration")
    wrong = [r for r in ok if (r.get("fidelity") or {}).get("below_threshold")]
    for r in wrong:
        f = r["fidelity"]
        got = f"PSNR {f['psnr_db']:.1f} dB" if f.get("psnr_db") is not None else f"cosine {f['cosine']:.6f}"
        out.append(f"{row_name(r)}: output differs from the torch fp32 reference ({got}, required {f['threshold']}); "
                   "its speed is not comparable")
    return out


def row_name(r: dict) -> str:
    return f"{r['backend']} {r['precision']} {r['size'][0]}x{r['size'][1]} batch {r['batch']} {r['stage']}"


def row_line(r: dict, done: int | None = None, total: int | None = None) -> str:
    """One plain line for a finished row (progress when the output is not a terminal)."""
    head = (f"[{done}/{total}] " if done is not None else "") + row_name(r)
    if r["status"] != "ok":
        return f"{head}: {r['status']}"
    parts = [f"median {r['median_ms']:.1f} ms", f"min {r['min_ms']:.1f} ms", f"{r['iterations']} calls"]
    if r.get("cv") is not None:
        parts.append(f"cv {r['cv']:.1%}" + (" NOISY" if r.get("noisy") else ""))
    if r.get("speedup_vs_authors") is not None:
        mark = NOISY_BASELINE_MARK + " (noisy baseline)" if r.get("baseline_noisy") else ""
        parts.append(f"{r['speedup_vs_authors']:.2f}x the authors' speed (median), "
                     f"{r['speedup_vs_authors_best']:.2f}x (best){mark}")
    if r.get("vs_sgemm_floor") is not None:
        parts.append(f"{r['vs_sgemm_floor']:.2f}x the sgemm floor")
    f = r.get("fidelity")
    if f:
        parts.append((f"PSNR {_psnr(f)} dB" if f["psnr_db"] is not None else f"cosine {f['cosine']:.6f}")
                     + (" BELOW THRESHOLD" if f["below_threshold"] else ""))
    if r.get("threads") is not None:
        parts.append(f"{r['threads']} thread(s)")
    return f"{head}: " + ", ".join(parts)


def _psnr(f: dict) -> str:
    """PSNR of a fidelity entry: 'inf' for identical images; psnr_u8 caps the rest at 100 dB ('>=100')."""
    v = f["psnr_db"]
    if v >= 100:
        return "inf" if f["max_abs"] == 0 else ">=100"
    return f"{v:.1f}"


def validate_report(rep: dict) -> None:
    """Check a report's structure (the JSON schema, written as code); ValueError naming the field."""
    def need(obj, key, typ, where):
        if key not in obj or not isinstance(obj[key], typ):
            raise ValueError(f"{where}.{key}: missing or not {typ}")

    for k, t in (("schema", str), ("schema_version", int), ("machine", dict), ("model", dict), ("options", dict),
                 ("baseline", str), ("rows", list), ("timing", str), ("noisy_cv", float), ("threads", int),
                 ("warnings", list)):
        need(rep, k, t, "report")
    if rep["schema"] != SCHEMA or rep["schema_version"] != SCHEMA_VERSION:
        raise ValueError(f"report.schema: {rep['schema']} v{rep['schema_version']}")
    for k, t in (("cpu", str), ("cores", int), ("gpu", dict), ("libraries", dict), ("cpu_flags", dict)):
        need(rep["machine"], k, t, "machine")
    sg = rep["machine"].get("sgemm")
    if sg is not None and not (isinstance(sg, dict) and (isinstance(sg.get("gflops"), (int, float))
                                                         or isinstance(sg.get("error"), str))):
        raise ValueError("machine.sgemm: not null or a mapping with gflops (or error)")
    need(rep, "skipped", list, "report")
    for i, s in enumerate(rep["skipped"]):
        if not (isinstance(s, dict) and all(isinstance(s.get(k), str) for k in ("backend", "precision", "reason"))):
            raise ValueError(f"skipped[{i}]: not a mapping of backend, precision, reason")
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
            for k in ("vs_authors", "speedup_vs_authors", "speedup_vs_authors_best", "peak_host_mib",
                      "peak_device_mib", "pixelwise_gflop", "sgemm_floor_ms", "vs_sgemm_floor"):
                if k not in r or not (r[k] is None or isinstance(r[k], (int, float))):
                    raise ValueError(f"{where}.{k}: missing or not a number/null")
            if "baseline_noisy" not in r or not (r["baseline_noisy"] is None or isinstance(r["baseline_noisy"], bool)):
                raise ValueError(f"{where}.baseline_noisy: missing or not a boolean/null")
            if not (r.get("cv") is None or isinstance(r["cv"], (int, float))) or not isinstance(r.get("noisy"), bool):
                raise ValueError(f"{where}.cv/noisy: missing or not a number/null and a boolean")
            f = r.get("fidelity", "missing")
            if not (f is None or (isinstance(f, dict) and isinstance(f.get("max_abs"), (int, float))
                                  and isinstance(f.get("below_threshold"), bool))):
                raise ValueError(f"{where}.fidelity: missing or not null / a mapping with max_abs and below_threshold")
        if "threads" not in r or not (r["threads"] is None or isinstance(r["threads"], int)):
            raise ValueError(f"{where}.threads: missing or not an integer/null")
        if r["status"] == "ok":
            ph = r.get("phases_ms")
            if ph is not None and not (isinstance(ph, dict) and all(isinstance(v, (int, float)) for v in ph.values())):
                raise ValueError(f"{where}.phases_ms: not null or a mapping of phase -> ms")


def _fmt(v, spec=".1f") -> str:
    return "-" if v is None else format(v, spec)


NOISY_BASELINE_MARK = "*"  # marks a ratio to a noisy authors' baseline row


def _speedup(v, noisy_base) -> str:
    return "-" if v is None else f"{v:.2f}x" + (NOISY_BASELINE_MARK if noisy_base else "")


def _cells(r: dict, short_status: bool) -> dict[str, str]:
    size = f"{r['size'][0]}x{r['size'][1]}"
    c = {"backend": r["backend"], "precision": r["precision"], "size": size, "batch": str(r["batch"]),
         "stage": r["stage"], "threads": _fmt(r.get("threads"), "d")}
    if r["status"] != "ok":
        c["status"] = "failed (reason below)" if short_status else r["status"]
        return c
    f = r.get("fidelity") or {}
    low = " !" if f.get("below_threshold") else ""
    c.update({"status": "ok" + (" (noisy)" if r.get("noisy") else ""),
              "min ms": _fmt(r["min_ms"]), "mean ms": _fmt(r["mean_ms"]), "median ms": _fmt(r["median_ms"]),
              "p90 ms": _fmt(r["p90_ms"]), "p95 ms": _fmt(r["p95_ms"]), "p99 ms": _fmt(r["p99_ms"]),
              "cv": _fmt(r.get("cv"), ".1%") + (" !" if r.get("noisy") else ""),
              "images/s": _fmt(r["throughput_ips"], ".2f"), "peak MiB": _fmt(r["peak_host_mib"], ".0f"),
              "time vs authors": _fmt(r["vs_authors"], ".3f") + (NOISY_BASELINE_MARK if r.get("baseline_noisy") else ""),
              "speed-up": _speedup(r["speedup_vs_authors"], r.get("baseline_noisy")),
              "speed-up best": _speedup(r.get("speedup_vs_authors_best"), r.get("baseline_noisy")),
              "vs sgemm floor": _fmt(r.get("vs_sgemm_floor"), ".2f") + ("x" if r.get("vs_sgemm_floor") else ""),
              "PSNR dB": ((_psnr(f) if f.get("psnr_db") is not None
                           else ("cos " + format(f["cosine"], ".6f") if f.get("cosine") is not None else "-")) + low)
              if f else "-",
              "max abs": (_fmt(f["max_abs"], ".0f" if f.get("unit") == "8-bit levels" else ".2g") if f else "-")})
    return c


def table_rows(rep: dict, columns: list[str] | None = None, short_status: bool = False) -> list[list[str]]:
    """Rows of the terminal/Markdown table in `columns` (default COLUMNS); '-' where a column does not
    apply. `short_status`: failed rows say 'failed (reason below)' (the terminal prints the reasons
    whole under the table, see failure_lines); otherwise the whole reason is the status cell."""
    cols = columns or COLUMNS
    return [[_cells(r, short_status).get(k, "-") for k in cols] for r in rep["rows"]]


def failure_lines(rep: dict) -> list[str]:
    """One line per failed row with its whole reason."""
    return [f"{row_name(r)}: {r['status']}" for r in rep["rows"] if r["status"] != "ok"]


COLUMNS = ["backend", "precision", "size", "batch", "stage", "threads", "status", "min ms", "mean ms", "median ms",
           "p90 ms", "p95 ms", "p99 ms", "cv", "images/s", "peak MiB", "time vs authors", "speed-up", "speed-up best",
           "vs sgemm floor", "PSNR dB", "max abs"]
# the terminal's table: what fits a wide terminal; report.md and report.json hold every column
TERMINAL_COLUMNS = ["backend", "precision", "size", "batch", "stage", "threads", "status", "median ms", "min ms",
                    "cv", "peak MiB", "speed-up", "speed-up best", "vs sgemm floor", "PSNR dB", "max abs"]


def footnotes(rep: dict) -> list[str]:
    """What the marks in the table mean, for the marks the table holds."""
    out = []
    if any(r.get("baseline_noisy") for r in rep["rows"] if r["status"] == "ok"):
        out.append(f"{NOISY_BASELINE_MARK} ratio to a noisy authors' baseline row (cv above {rep['noisy_cv']:.0%}): "
                   "not reliable; see the warnings")
    return out


def skipped_lines(rep: dict) -> list[str]:
    """One line per (backend, precision) left out, with the reason (a precision its registry row does
    not list; with `--precision all`, graphs the bundle lacks)."""
    return [f"{s['backend']} {s['precision']}: {s['reason']}" for s in rep.get("skipped", [])]


def sgemm_text(rep: dict) -> str | None:
    """The machine's CPU flags and sgemm rates in words (None if neither was recorded)."""
    m = rep["machine"]
    flags = (m.get("cpu_flags") or {}).get("flags")
    parts = [f"CPU flags: {' '.join(flags) if flags else 'none of note reported'}"] if "cpu_flags" in m else []
    sg = m.get("sgemm")
    if sg and sg.get("gflops"):
        sq, ti = sg["square"], sg["tiles"]
        parts.append(f"sgemm {sg['gflops']:.0f} GFLOP/s with {sg['threads']} thread(s) ({sg['library']}: "
                     f"{sq['a'][0]}x{sq['a'][1]} @ {sq['b'][0]}x{sq['b'][1]} {sq['gflops']:.0f} GFLOP/s; "
                     f"{ti['tiles']} tiles of {ti['a'][1]}x{ti['a'][2]} @ {ti['b'][1]}x{ti['b'][2]} "
                     f"{ti['gflops']:.0f} GFLOP/s); 'vs sgemm floor' = a pixelwise row's median / (its FLOPs at that "
                     "rate)")
    elif sg and sg.get("error"):
        parts.append(f"sgemm rate not measured: {sg['error']}")
    return "; ".join(parts) or None


def settings_text(rep_or_opts) -> str:
    """The settings a run used, in words (the demo says them too)."""
    o = rep_or_opts["options"] if "options" in rep_or_opts else rep_or_opts
    threads = rep_or_opts.get("threads") or o.get("threads")
    return (f"{threads} CPU thread(s) for every CPU backend (torch, the authors' forward, ONNX Runtime, OpenVINO); "
            f"warm-up {o['warmup_s']:g} s, "
            f"then >= {o['min_iters']} calls and >= {o['min_seconds']:g} s per row")


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


MAX_NUMBERED = 10_000


def numbered_dir(base: Path) -> Path:
    """The first of base, base2, base3, ... that does not exist (the default folder of `asap bench`:
    a second run writes next to the first one's reports instead of failing on them)."""
    import os

    base = Path(base)
    for i in range(1, MAX_NUMBERED + 1):
        p = base if i == 1 else base.with_name(f"{base.name}{i}")
        if not os.path.lexists(p):
            return p
    from asap_deploy.errors import OutputError

    raise OutputError(f"{base}: {base.name} .. {base.name}{MAX_NUMBERED} all exist; pass -o to choose a folder")


def _create_numbered(base: Path) -> Path:
    """Create the first free numbered folder of `base` (a new, empty folder: never one that exists)."""
    from asap_deploy.errors import OutputError

    while True:
        p = numbered_dir(base)
        try:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.mkdir()
            return p
        except FileExistsError:
            continue  # another run took it meanwhile: the next number
        except OSError as exc:
            raise OutputError(f"{p}: cannot create the report folder ({exc.strerror or exc})") from exc


def write_reports(rep: dict, out_dir: Path, json_file: Path | None = None, numbered: bool = False) -> dict[str, Path]:
    """report.json, report.md and latency.png in `out_dir` (+ the JSON at `json_file`), atomically,
    each recorded in its folder's ownership marker (io.claim_files) so a later run may replace it.
    `numbered`: `out_dir` is a base name; the reports go to a folder created fresh for them, the
    first free one of out_dir, out_dir2, out_dir3, ... (numbered_dir)."""
    from asap_deploy.io import claim_files, write_json, write_text

    out_dir = _create_numbered(Path(out_dir)) if numbered else Path(out_dir)
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
    lines = ["# asap bench", "",
             f"Machine: {machine_text(rep)}", "",
             f"Model: {rep['model'].get('description') or rep['model'].get('bundle', '')} (S={rep['model'].get('S')})", "",
             f"Timing: {rep['timing']}. Settings: {settings_text(rep)}. Baseline: the authors' forward (fp32), "
             "measured once in the same run; every row, of any precision, is compared with it: 'time vs authors' = "
             "median / authors' median (lower is better), speed-up = its inverse, 'speed-up best' = authors' min / "
             f"the row's min; '{NOISY_BASELINE_MARK}' marks a ratio to a noisy baseline row. "
             "Peak MiB: resident high-water mark growth during the row (lower bound). "
             f"cv: coefficient of variation (std / mean); '!' marks a noisy row (cv above {rep['noisy_cv']:.0%}). "
             f"Fidelity: {rep['fidelity']}; PSNR 'inf' = identical, '>=100' = above the 100 dB cap of `asap validate` yet not identical, '!' = below the threshold; max abs in "
             "8-bit levels (parameter units for the predictor).", ""]
    if sgemm_text(rep):
        lines += [sgemm_text(rep) + ".", ""]
    if rep.get("warnings"):
        lines += ["**Warnings**", ""] + [f"- {w}" for w in rep["warnings"]] + [""]
    lines += ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in table_rows(rep):
        lines.append("| " + " | ".join(c.replace("|", "/") for c in row) + " |")
    if footnotes(rep):
        lines += [""] + footnotes(rep)
    if rep.get("skipped"):
        lines += ["", "Skipped (nothing to measure):", ""] + [f"- {t}" for t in skipped_lines(rep)]
    split = [r for r in rep["rows"] if r.get("phases_ms")]
    if split:  # GPU engines: the wall-clock latency above includes these transfers
        lines += ["", "GPU phases per call (median ms, CUDA events): host->device | GPU compute | device->host", "",
                  "| backend | precision | size | batch | stage | H2D ms | GPU compute ms | D2H ms |", "|" + "---|" * 8]
        for r in split:
            ph = r["phases_ms"]
            lines.append(f"| {r['backend']} | {r['precision']} | {r['size'][0]}x{r['size'][1]} | {r['batch']} | "
                         f"{r['stage']} | {ph.get('h2d_ms', 0):.3f} | {ph.get('gpu_compute_ms', 0):.3f} | "
                         f"{ph.get('d2h_ms', 0):.3f} |")
        lines += ["", "H2D / D2H: GPU time of the copies between page-locked (pinned) host buffers and the device. "
                  "GPU compute: GPU time from the end of the uploads to the end of the work; it includes any wait for "
                  "the host to enqueue the work, so it is an upper bound of trtexec's GPU Compute Time. The JSON's "
                  "`enqueue_ms` (TensorRT) is the host time of the enqueue call alone."]
    lines += ["", f"Total benchmark time {rep.get('seconds', 0):.0f} s; load average (1, 5, 15 min) at the start "
              f"{rep['machine'].get('load_avg_start')}, at the end {rep['machine'].get('load_avg_end')} (a shared "
              "CPU makes rows noisy).", ""]
    return "\n".join(lines)


def ms_label(v: float) -> str:
    """A latency in ms as plain digits (3 significant, never scientific notation): 1333, 63.7, 0.123."""
    if v >= 100:
        return f"{v:.0f}"
    if v <= 0:
        return "0"
    import math

    return f"{v:.{min(6, max(0, 2 - math.floor(math.log10(v))))}f}"


def tick_label(v: float) -> str:
    """An axis tick in plain digits: 0.5, 2, 1000 (never 1e+03 or 10^3)."""
    return f"{v:.6f}".rstrip("0").rstrip(".") or "0"


def _header_lines(rep: dict, width_chars: int) -> list[str]:
    """The machine line and what makes the figures less trustworthy, wrapped to the figure's width."""
    import textwrap

    text = [f"machine: {machine_text(rep)}"]
    ok = [r for r in rep["rows"] if r["status"] == "ok"]
    noisy = sum(1 for r in ok if r.get("noisy"))
    notes = [f"hatched bar and '!': noisy row (cv above {rep['noisy_cv']:.0%}; {noisy} of {len(ok)} rows)"]
    notes += [w.split(";")[0] for w in rep.get("warnings", []) if w.startswith("the machine was busy")]
    if any((r.get("fidelity") or {}).get("below_threshold") for r in ok):
        notes.append("'wrong': output below the fidelity threshold vs torch fp32")
    text.append("; ".join(notes))
    return [line for t in text for line in textwrap.wrap(t, width_chars)]


def figure(rep: dict):
    """The latency chart as a matplotlib Figure: median latency (log scale) per backend, grouped by
    stage, one panel per size/batch/precision; bar labels and axis ticks in plain digits; noisy rows
    hatched and marked '!'; the machine line and the warnings wrapped to the figure's width."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ok = [r for r in rep["rows"] if r["status"] == "ok"]
    groups = list(dict.fromkeys((tuple(r["size"]), r["batch"], r["precision"]) for r in ok))  # as measured
    colours = {b: f"C{i}" for i, b in enumerate(dict.fromkeys(r["backend"] for r in ok))}
    stages = [s for s in STAGES if any(r["stage"] == s for r in ok)]
    fig_w, font = 5.5 * max(1, len(groups)), 8
    header = _header_lines(rep, int(fig_w * 72 / (0.6 * font)))
    head_in = 0.2 + 0.16 * len(header)
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(fig_w, 4.2 + head_in), squeeze=False)
    plain = FuncFormatter(lambda v, _pos: tick_label(v))
    for ax, (size, batch, prec) in zip(axes[0], groups):
        mine = [r for r in ok if tuple(r["size"]) == size and r["batch"] == batch and r["precision"] == prec]
        backends = list(dict.fromkeys(r["backend"] for r in mine))
        width = 0.8 / max(1, len(backends))
        top, bottom = 0.0, math.inf
        for bi, b in enumerate(backends):
            found = [next((r for r in mine if r["backend"] == b and r["stage"] == s), None) for s in stages]
            for x, r in zip(np.arange(len(stages)) + bi * width, found):
                if not r:
                    continue
                v = r["median_ms"]
                [bar] = ax.bar([x], [v], width, color=colours[b])
                top, bottom = max(top, v), min(bottom, v)
                mark = (" !" if r.get("noisy") else "") + ("\nwrong" if (r.get("fidelity") or {}).get("below_threshold") else "")
                if r.get("noisy"):
                    bar.set_hatch("///")
                    bar.set_edgecolor("black")
                ax.text(x, v, ms_label(v) + mark, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(np.arange(len(stages)) + width * (len(backends) - 1) / 2)
        ax.set_xticklabels(stages)
        ax.set_yscale("log")
        if top > 0:
            ax.set_ylim(bottom / 2.5, top * 2.5)  # every bar visible, room for the labels above the tallest
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("median latency (ms, log scale)")
        ax.set_title(f"{size[0]}x{size[1]}, batch {batch}, {prec}", fontsize=10)
        ax.legend(handles=[Patch(color=colours[b], label=b) for b in backends], fontsize=8)
    if not groups:
        axes[0][0].text(0.5, 0.5, "no successful rows", ha="center")
    fig.text(0.01, 0.995, "\n".join(header), ha="left", va="top", fontsize=font)
    fig.tight_layout(rect=(0, 0, 1, 1 - head_in / (4.2 + head_in)))
    return fig


def plot(rep: dict, path: Path) -> Path:
    """latency.png (the figure above), written atomically."""
    from asap_deploy.io import atomic_path

    fig = figure(rep)  # selects the Agg backend before pyplot is imported
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
