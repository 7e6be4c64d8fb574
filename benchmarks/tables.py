"""The measured numbers of the docs, rendered from the saved results in benchmarks/results/:
docs/benchmarks.md's tables, README.md's headline numbers, and the measured figures quoted in
docs/architecture.md, docs/cluster.md, docs/store-format.md, docs/training.md and docs/regla.md.

Each page keeps its hand-written prose; every table, and every sentence that states a measured
number, sits in a generated region between ``<!-- generated: NAME -->`` and
``<!-- /generated: NAME -->`` lines, and is rewritten from the JSON here, so the page cannot drift
from the results. ``commands-SECTION`` regions show the commands of benchmarks/run_all.py's steps
for that section, so the documented commands are the ones run_all runs.

A target counts as met only when the whole measured spread (every round, or every rep) clears it;
see ``verdict``.

    python benchmarks/tables.py            # rewrite every region of every page (PAGES) in place
    python benchmarks/tables.py --check    # exit 1, naming the stale regions, if a page would change
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import re
import shlex
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run_all import RESULTS as RUN_ALL_RESULTS, STEPS  # noqa: E402
import quality_report  # noqa: E402

RESULTS = HERE / "results"
DOCS = HERE.parent / "docs"
DOC = DOCS / "benchmarks.md"
README = HERE.parent / "README.md"
# Every page with generated regions: the default of main().
PAGES = (DOC, README, *(DOCS / f"{name}.md"
                         for name in ("architecture", "cluster", "store-format", "training", "regla")))
OPEN = re.compile(r"<!-- generated: ([\w-]+) -->")
CLOSE = re.compile(r"<!-- /generated: ([\w-]+) -->")
NOT_SHOWN = "within the spread: not shown"


class TablesError(Exception):
    """A one-line reason the page cannot be rendered (a missing file, an unknown region)."""


# --- targets -----------------------------------------------------------------------------------------

OPS: dict[str, tuple[Callable[[float, float], bool], Callable[[float, float], bool]]] = {
    # op: (meets the target, clearly misses it)
    ">": (operator.gt, operator.lt), ">=": (operator.ge, operator.lt),
    "<": (operator.lt, operator.gt), "<=": (operator.le, operator.gt),
}


def verdict(values: Sequence[float], op: str, target: float) -> str:
    """"met" only when every measured value (the whole spread) meets ``op target``, "missed" when
    every value falls on the other side, otherwise "within the spread: not shown"."""
    if not values:
        raise ValueError("a verdict needs at least one measured value")
    meets, misses = OPS[op]
    if all(meets(v, target) for v in values):
        return "met"
    if all(misses(v, target) for v in values):
        return "missed"
    return NOT_SHOWN


def target_cell(values: Sequence[float], op: str, target: float) -> str:
    return f"{op} {target:g}: {verdict(values, op, target)}"


# --- reading results and formatting ------------------------------------------------------------------

def load(results: Path, name: str) -> dict:
    path = results / name
    if not path.is_file():
        raise TablesError(f"missing result file: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TablesError(f"{path}: not valid JSON ({e})") from None


def span(values: Sequence[float], fmt: str = ".2f") -> str:
    """min-max of ``values`` as formatted, one number when both ends format alike."""
    low, high = format(min(values), fmt), format(max(values), fmt)
    return low if low == high else f"{low}-{high}"


def med_range(stat: dict, fmt: str = ".2f") -> str:
    """A {median, min, max} record as 'median (min-max)'."""
    return f"{format(stat['median'], fmt)} ({span([stat['min'], stat['max']], fmt)})"


def ms(value: float) -> str:
    return f"{value:.1f}" if value < 100 else f"{value:.0f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def bold_min(cells: Sequence[float], fmt: str = ".1f") -> list[str]:
    """Format ``cells``, the smallest in bold unless several share it."""
    texts = [format(c, fmt) for c in cells]
    best = min(texts, key=float)
    return [f"**{t}**" if t == best and texts.count(best) == 1 else t for t in texts]


REGIONS: dict[str, Callable[[Path], list[str]]] = {}


def region(name: str) -> Callable[[Callable[[Path], list[str]]], Callable[[Path], list[str]]]:
    """Register a renderer for the page's region ``name``."""
    def register(render: Callable[[Path], list[str]]) -> Callable[[Path], list[str]]:
        REGIONS[name] = render
        return render
    return register


# --- commands (from run_all.STEPS) --------------------------------------------------------------------

def wrap_command(command: list[str], width: int = 100) -> str:
    """A shell command broken before an option (kept with its value) where a line would pass ``width``."""
    units: list[str] = []
    for token in map(shlex.quote, command[2:]):
        if token.startswith("--") or not units:
            units.append(token)
        else:
            units[-1] += " " + token
    lines, line = [], shlex.join(command[:2])
    for unit in units:
        if len(line) + len(unit) + 1 > width - 2:
            lines.append(line + " \\")
            line = "    " + unit
        else:
            line += " " + unit
    return "\n".join(lines + [line])


def render_commands(section: str) -> list[str]:
    steps = [s for s in STEPS if s.section == section]
    lines = ["```bash"]
    for step in steps:
        if step.note:
            lines.append(f"# {step.note}")
        lines += wrap_command(step.command()).splitlines()
    names = ",".join(s.name for s in steps)
    return lines + ["```", "", f"Through `benchmarks/run_all.py`: `python benchmarks/run_all.py --only {names}`."]


for _section in sorted({s.section for s in STEPS if s.section}):
    REGIONS[f"commands-{_section}"] = lambda results, section=_section: render_commands(section)


def produced_by(name: str) -> str:
    """The run_all command that writes the result file ``name``, as inline code."""
    for step in STEPS:
        if f"{RUN_ALL_RESULTS}/{name}" in step.args:
            return f"`{shlex.join(step.command())}`"
    raise TablesError(f"no benchmarks/run_all.py step writes {name}")


# --- model latency (bench_models.py) -----------------------------------------------------------------

SWEEP, SECOND, B32 = "bench_models-cpu.json", "bench_models-cpu-elrf-variants.json", "bench_models-cpu-b32-1024.json"
SWITCH = "regla_m(elrf_dw5_in_ffn=False)"
SCALING_TARGET = 4.6  # regla_m latency(1024 px) / latency(512 px), batch 1


def model_records(doc: dict) -> dict[tuple, dict]:
    """(model, img_size, batch, precision) -> its record, measured ones only."""
    return {(r["model"], r["img_size"], r["batch"], r["precision"]): r for r in doc["records"] if r["status"] == "ok"}


def ratio_spread(num: dict, den: dict) -> tuple[float, float, float]:
    """num / den latency: the ratio of the medians, and its spread over every rep of both
    (num's fastest rep over den's slowest, num's slowest over den's fastest)."""
    return (num["median_ms"] / den["median_ms"], min(num["times_ms"]) / max(den["times_ms"]),
            max(num["times_ms"]) / min(den["times_ms"]))


def ratio_cell(num: dict, den: dict) -> str:
    median, low, high = ratio_spread(num, den)
    if len(num["times_ms"]) == len(den["times_ms"]) == 1:
        return f"{median:.3f} (one rep)"
    return f"{median:.3f} ({low:.2f}-{high:.2f})"


def config_label(size: int, batch: int, precision: str) -> str:
    return f"{size} px, batch {batch}, {precision}"


@region("models-sweep")
def models_sweep(results: Path) -> list[str]:
    doc = load(results, SWEEP)
    ok = model_records(doc)
    configs = sorted({k[1:] for k in ok}, key=lambda c: (c[0], c[1], c[2] != "fp32"))
    models = list(dict.fromkeys(r["model"] for r in doc["records"]))
    rows = [[m] + [ms(ok[(m, *c)]["median_ms"]) if (m, *c) in ok else "-" for c in configs] for m in models]
    lines = table(["model"] + [f"{s} b{b} {p}" for s, b, p in configs], rows)
    skipped = sorted({(r["img_size"], r["batch"], r["precision"], r["reason"]) for r in doc["records"]
                      if r["status"] == "skipped"})
    b32 = load(results, B32)
    seconds = [t / 1e3 for r in b32["records"] for t in r["times_ms"]]
    if skipped:
        groups: dict[tuple[int, int], list[str]] = {}
        for size, batch, precision, _ in skipped:
            groups.setdefault((batch, size), []).append(precision)
        configs_text = ", ".join(f"batch {b} at {s} px ({' and '.join(sorted(p, key=lambda x: x != 'fp32'))})"
                                 for (b, s), p in groups.items())
        lines += ["", f"Skipped in the sweep (recorded as skipped in `{SWEEP}`: {skipped[0][3]}): {configs_text}. "
                      f"One forward there takes {span(seconds, '.0f')} s per model (`{B32}`)."]
    lines += ["", f"Batch 32 at 1024 px (`{B32}`, one rep each): "
              + "; ".join(b32_pair(model_records(b32), p) for p in ("fp32", "bf16")) + "."]
    return lines


def b32_pair(ok: dict, precision: str) -> str:
    regla, ifm = ok[("regla_m", 1024, 32, precision)], ok[("iformer_m", 1024, 32, precision)]
    return f"regla_m {regla['median_ms']:.0f} ms vs iformer_m {ifm['median_ms']:.0f} ms in {precision}"


@region("models-targets")
def models_targets(results: Path) -> list[str]:
    runs = [model_records(load(results, name)) for name in (SWEEP, SECOND, B32)]
    rows = []
    for size in (512, 1024):
        for batch in (1, 32):
            for precision in ("fp32", "bf16"):
                pairs = [(run.get(("iformer_m", size, batch, precision)), run.get(("regla_m", size, batch, precision)))
                         for run in runs]
                measured = [(i, r) for i, r in pairs if i and r]
                if not measured:
                    continue
                values = [v for i, r in measured for v in ratio_spread(i, r)[1:]]
                rows.append([config_label(size, batch, precision)]
                            + [ratio_cell(i, r) if i and r else "-" for i, r in pairs]
                            + [target_cell(values, ">", 1)])
    for precision in ("fp32", "bf16"):
        pairs = [(run.get(("regla_m", 1024, 1, precision)), run.get(("regla_m", 512, 1, precision))) for run in runs]
        values = [v for hi, lo in pairs if hi and lo for v in ratio_spread(hi, lo)[1:]]
        rows.append([f"regla_m latency 1024 / 512 px, batch 1, {precision}"]
                    + [ratio_cell(hi, lo) if hi and lo else "-" for hi, lo in pairs]
                    + [target_cell(values, "<=", SCALING_TARGET)])
    ifm_scaling = [run[("iformer_m", 1024, 1, p)]["median_ms"] / run[("iformer_m", 512, 1, p)]["median_ms"]
                   for run in runs for p in ("fp32", "bf16")
                   if ("iformer_m", 1024, 1, p) in run and ("iformer_m", 512, 1, p) in run]
    return table(["config", f"full sweep (`{SWEEP}`)", f"second run (`{SECOND}`)", f"batch 32 @ 1024 px (`{B32}`)",
                  "target"], rows) + ["", f"iformer_m's 1024 / 512 px latency ratio at batch 1 (medians): "
                                          f"{span(ifm_scaling)}."]


@region("models-fp32-b32")
def models_fp32_b32(results: Path) -> list[str]:
    sizes = {s["model"]: s for s in load(results, SWEEP)["sizes"]}
    ok = model_records(load(results, SECOND))
    default, switch = ok[("regla_m", 512, 32, "fp32")], ok[(SWITCH, 512, 32, "fp32")]
    values = ratio_spread(default, switch)[1:]
    difference = {"met": "the variant is faster", "missed": "the variant is slower",
                  NOT_SHOWN: "no difference beyond the spread"}[verdict(values, ">", 1)]
    macs = [f"{sizes[m]['gmacs_224']:.3f}" for m in ("regla_m", "iformer_m")]
    macs_text = f"the same MACs ({macs[0]} G" if macs[0] == macs[1] else f"{macs[0]} and {macs[1]} GMACs ("
    return [f"At 224 px regla_m and iformer_m have {macs_text}, `{SWEEP}`). With the DW5x5 moved out of the expanded "
            f"channels (`elrf_dw5_in_ffn=False`), fp32 at 512 px and batch 32 takes {switch['median_ms']:.0f} ms "
            f"(reps {span(switch['times_ms'], '.0f')}) against the default's {default['median_ms']:.0f} ms "
            f"({span(default['times_ms'], '.0f')}; `{SECOND}`): {difference}."]


@region("models-elrf")
def models_elrf(results: Path) -> list[str]:
    doc = load(results, SECOND)
    sizes = {s["model"]: s for s in doc["sizes"]}
    ok = model_records(doc)
    rows = []
    for _, size, batch, precision in sorted((k for k in ok if k[0] == "regla_m"),
                                            key=lambda k: (k[1], k[2], k[3] != "fp32")):
        if (SWITCH, size, batch, precision) not in ok:
            continue
        default, switch = ok[("regla_m", size, batch, precision)], ok[(SWITCH, size, batch, precision)]
        median, low, high = ratio_spread(default, switch)
        rows.append([config_label(size, batch, precision), ms(default["median_ms"]), ms(switch["median_ms"]),
                     f"{median:.3f} ({low:.2f}-{high:.2f})", target_cell([low, high], ">", 1)])
    return [f"`elrf_dw5_in_ffn=False`: {sizes[SWITCH]['params_m']:.2f} M params, {sizes[SWITCH]['gmacs_224']:.3f} "
            f"GMACs at 224 px (the default: {sizes['regla_m']['params_m']:.2f} M, "
            f"{sizes['regla_m']['gmacs_224']:.3f}). Medians in ms, `{SECOND}`; speed-up = default / variant, "
            "spread over every rep:", ""] + table(
        ["config", "default", "variant", "speed-up (spread)", "variant faster"], rows)


# --- making shards (bench_make_shards.py) ------------------------------------------------------------

SHARD_RUNS = (("1", "make-shards-run1.json"), ("2", "make-shards-run2.json"), ("3", "make-shards.json"),
              ("busy", "make-shards-busy.json"))


def shard_runs(results: Path) -> list[tuple[str, str, dict]]:
    return [(label, name, load(results, name)) for label, name in SHARD_RUNS]


def run_name(label: str) -> str:
    return "the busy run" if label == "busy" else f"run {label}"


def times_range(stat: dict, fmt: str = ".2f") -> str:
    """A {median, min, max} ratio record as 'median x (rounds min-max)'."""
    return f"{format(stat['median'], fmt)}x (rounds {span([stat['min'], stat['max']], fmt)})"


def all_rounds_free(doc: dict) -> bool:
    return doc["build"]["rounds_with_two_free_cores"] == len(doc["build"]["speed_up"]["2"]["rounds"])


def free_shard_runs(results: Path) -> list[tuple[str, str, dict]]:
    """The make-shards runs with two free cores in every round."""
    return [run for run in shard_runs(results) if all_rounds_free(run[2])]


@region("make-shards-build")
def make_shards_build(results: Path) -> list[str]:
    rows = []
    for label, name, doc in shard_runs(results):
        build = doc["build"]
        free = [min(pair) for pair in build["machine_parallelism_before_after"]]
        rows.append([f"{label} (`{name}`)", span(free), f"{build['images_per_second']['1']['median']:.0f}",
                     f"{build['images_per_second']['2']['median']:.0f}", med_range(build["speed_up"]["2"]),
                     "yes" if build["byte_identical"] else "**no**"])
    return table(["run", "free-core check (min of each round)", "1 worker, images/s", "2 workers, images/s",
                  "speed-up, median (range)", "outputs byte-identical"], rows)


@region("make-shards-notes")
def make_shards_notes(results: Path) -> list[str]:
    free = [(label, doc) for label, _, doc in free_shard_runs(results)]
    busy = [(label, doc) for label, _, doc in shard_runs(results) if doc["build"]["rounds_with_two_free_cores"] == 0]

    def medians(get: Callable[[dict], dict]) -> list[float]:
        """The median of each free run's {median, min, max} record that ``get`` picks."""
        return [get(doc)["median"] for _, doc in free]

    imports = medians(lambda d: d["import_seconds"]["pipeline.data.make_shards"])
    wds = medians(lambda d: d["import_seconds"]["webdataset"])
    lines = [f"- With two free cores (runs {', '.join(label for label, _ in free)}), 2 workers build the shards "
             f"{span(medians(lambda d: d['build']['speed_up']['2']))}x faster (medians). Part of the way to 2x is the "
             f"workers' start: each imports `pipeline.data.make_shards` ({span(imports)} s in a fresh interpreter) "
             f"before its first shard, and the parent and two workers used "
             f"{span(medians(lambda d: d['build']['cpu_seconds']['2']), '.1f')} CPU-seconds where one process used "
             f"{span(medians(lambda d: d['build']['cpu_seconds']['1']), '.1f')}. Over a real dataset that start-up "
             "is a few seconds in hours."]
    for label, doc in busy:
        lines.append(f"- When another user's job holds a core ({run_name(label)}), 2 workers are slower than 1 "
                     f"({times_range(doc['build']['speed_up']['2'])}): the default of one worker per CPU assumes "
                     "the CPUs are free; pass `--num-workers` otherwise.")
    mnist = free[0][1]["mnist"]
    lines += [f"- The MNIST sample (`make_mnist_sample`, {mnist['images']} digits of 32 px, 10 shards): "
              f"{span(medians(lambda d: d['mnist']['seconds']['1']))} s with 1 worker, "
              f"{span(medians(lambda d: d['mnist']['seconds']['2']))} s with 2 "
              f"({span(medians(lambda d: d['mnist']['speed_up']['2']))}x)"
              + "".join(f"; {doc['mnist']['speed_up']['2']['median']:.2f}x in {run_name(label)}"
                        for label, doc in busy)
              + ".",
              f"- A worker that imported webdataset would pay {span(wds, '.1f')} s for it (it imports torch), "
              f"{statistics.median(wds) / statistics.median(imports):.0f} times the {span(imports)} s of "
              "`pipeline.data.make_shards`; this is why shards are written with `tarfile` (the bytes are those "
              "of webdataset's `TarWriter`, which a test checks).",
              "- `pipeline make-shards` itself also imports `pipeline.cache.store` and `teachers` for its error "
              f"handling: {span(medians(lambda d: d['import_seconds']['pipeline.cache.store, teachers']), '.1f')} s "
              "in a fresh interpreter, paid once per command."]
    return lines


@region("make-shards-read")
def make_shards_read(results: Path) -> list[str]:
    runs = shard_runs(results)
    rows, gaps, over_build, scan = [], [], [], []
    for label, _, doc in runs:
        read, rates = doc["read"], doc["read"]["samples_per_second"]
        rows.append([label, f"{rates['ours']['median']:.0f}", f"{rates['webdataset']['median']:.0f}",
                     med_range(read["ours_over_webdataset"], ".3f"),
                     f"{rates['ours_header_scan']['median']:.0f} "
                     f"({read['header_scan_over_webdataset']['median']:.2f}x)"])
        gaps.append(abs(1 - read["ours_over_webdataset"]["median"]))
        over_build.append(rates["ours"]["median"] / doc["build"]["images_per_second"]["1"]["median"])
        scan.append(read["header_scan_over_webdataset"]["median"])
    first = runs[0][2]["read"]
    same = all(doc["read"]["same_samples"] for _, _, doc in runs)
    return [f"Reading the same shards ({first['megabytes']} MB, {first['samples']} samples) back from the page cache "
            f"(one process, median of {len(first['ours_over_webdataset']['rounds'])} rounds), samples/s:", ""] + table(
        ["run", "this project's reader (`iter_shard`)", "webdataset `tar_file_iterator` + `group_by_keys`",
         "ours / webdataset, median (range)", "header-only index scan (/ webdataset)"], rows) + [
        "", f"Both readers return {'the same' if same else '**different**'} keys and bytes, with medians within "
            f"{100 * max(gaps):.1f}% of each other (both are Python's `tarfile` underneath), about "
            f"{span(over_build, '.0f')} times the rate at which one process builds these shards; without a manifest, "
            "indexing a shard from its member headers alone (which webdataset's iterator cannot do) is "
            f"{span(scan, '.1f')}x as fast as reading it with webdataset."]


# --- cache throughput (bench_cache.py) ---------------------------------------------------------------

CACHE_RUNS = ("cache-cpu-run1.json", "cache-cpu.json")


def cache_rounds(doc: dict) -> dict[str, list[float]]:
    """Per-round rates and ratios, as bench_cache.py computes them.

    Newer results keep the forward-only runs around each cache run (each cache run is compared with
    the mean of its two neighbours); the earliest kept one forward-only run per round.
    """
    times, images, cores = doc["seconds_or_rates"], doc["images"], doc["machine"]["threads"]
    threads = sorted(doc["cache"], key=int)

    def forward(i: int, j: int | None = None) -> float:
        around = times["forward_only"][i]
        if not isinstance(around, list):
            return images / around
        return images / statistics.mean(around if j is None else around[j:j + 2])

    out: dict[str, list[float]] = {"decode": times["decode_per_core"], "pil": times["decode_per_core_pil"],
                                   "forward": [], "decode_over_pil": []}
    for i in range(doc["rounds"]):
        out["forward"].append(forward(i))
        out["decode_over_pil"].append(times["decode_per_core"][i] / times["decode_per_core_pil"][i])
        for j, n in enumerate(threads):
            bound = 1 / (1 / forward(i, j) + 1 / (cores * times["decode_per_core"][i]))
            for kind, key in (("end", f"cache_n{n}"), ("steady", f"cache_n{n}_steady")):
                rate = images / times[key][i]
                out.setdefault(f"{kind}_rate_{n}", []).append(rate)
                out.setdefault(f"{kind}_over_bound_{n}", []).append(rate / bound)
                out.setdefault(f"{kind}_over_forward_{n}", []).append(rate / forward(i, j))
        for n in threads:
            out.setdefault(f"startup_seconds_{n}", []).append(times[f"cache_n{n}"][i] - times[f"cache_n{n}_steady"][i])
            out.setdefault(f"seconds_{n}", []).append(times[f"cache_n{n}"][i])
    return out


def med_span(values: Sequence[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({span(values, fmt)})"


def cache_data(results: Path) -> list[tuple[str, dict, dict[str, list[float]]]]:
    return [(name, doc, cache_rounds(doc)) for name in CACHE_RUNS for doc in [load(results, name)]]


@region("cache-drift")
def cache_drift(results: Path) -> list[str]:
    doc = load(results, CACHE_RUNS[-1])
    widest = max(doc["seconds_or_rates"]["forward_only"], key=lambda r: (max(r) - min(r)) / max(r))
    return [f"This VM's speed drifts within minutes: the forward-only times of one round of `{CACHE_RUNS[-1]}` went "
            f"{', '.join(f'{s:.1f}' for s in widest)} s ({100 * (max(widest) - min(widest)) / max(widest):.0f}% "
            "apart), enough to bias a comparison with a single reference."]


@region("cache-table")
def cache_table(results: Path) -> list[str]:
    data = cache_data(results)
    threads = sorted(data[-1][1]["cache"], key=int)
    views = data[-1][1]["views"]
    spec = [(f"decode + render {views} views, one thread, images/s", "decode", ".0f"),
            ("the same with the path it replaced (PIL decode, planar resize)", "pil", ".0f"),
            ("decode speed-up over the PIL path", "decode_over_pil", ".2f"),
            ("forward only (reference: the teacher on views rendered beforehand, every thread, separate runs), "
             "images/s", "forward", ".1f")]
    spec += [(f"cache end to end, images/s, {n} decode thread{'s' * (n != '1')}", f"end_rate_{n}", ".1f")
             for n in threads]
    spec += [(f"end to end / shared-core rate, {n} decode thread{'s' * (n != '1')}", f"end_over_bound_{n}", ".3f")
             for n in threads]
    spec += [(f"steady state / shared-core rate, {n} decode thread{'s' * (n != '1')}", f"steady_over_bound_{n}",
              ".2f") for n in threads]
    spec += [(f"end to end / forward only, {n} decode thread{'s' * (n != '1')}", f"end_over_forward_{n}", ".2f")
             for n in threads]
    rows = [[label] + [med_span(rounds[key], fmt) for _, _, rounds in data] for label, key, fmt in spec]
    rows.append(["start-up share of the run, 1 decode thread"]
                + [f"{100 * doc['cache']['1']['start_up_fraction']:.0f}%" for _, doc, _ in data])
    targets = [["decode per core >= 600 images/s"] + [verdict(r["decode"], ">=", 600) for _, _, r in data]]
    targets += [[f"end to end / shared-core rate >= 0.85, {n} decode thread{'s' * (n != '1')}"]
                + [verdict(r[f"end_over_bound_{n}"], ">=", 0.85) for _, _, r in data] for n in threads]
    header = ["median (range over rounds)"] + [f"`{name}`" for name, _, _ in data]
    return table(header, rows) + [""] + table(["target (every round)"] + header[1:], targets)


@region("cache-notes")
def cache_notes(results: Path) -> list[str]:
    (old_name, _, old), (name, doc, new) = cache_data(results)
    decode, forward = statistics.median(new["decode"]), statistics.median(new["forward"])
    threads = doc["machine"]["threads"]
    startup = statistics.median(new["startup_seconds_1"])
    others = sorted(doc["cache"], key=int)[1:]
    return [
        f"- **Decoding per core** (`{name}`): {decode:.0f} images/s by median, rounds "
        f"{', '.join(f'{v:.0f}' for v in new['decode'])}; the PIL path {', '.join(f'{v:.0f}' for v in new['pil'])}; "
        f"target >= 600: {verdict(new['decode'], '>=', 600)}. The earlier run (`{old_name}`) gave "
        f"{', '.join(f'{v:.0f}' for v in old['decode'])} (target: {verdict(old['decode'], '>=', 600)}).",
        f"- **End to end** (`{name}`): decoding costs {1e3 / decode:.1f} CPU-ms per image next to the forward's "
        f"{1e3 * threads / forward:.0f} ({threads} threads at {forward:.1f} images/s). With 1 decode thread the "
        f"cache runs at {span(new['end_over_bound_1'], '.3f')} of the shared-core rate in every round, start-up "
        "included "
        f"(target >= 0.85: {verdict(new['end_over_bound_1'], '>=', 0.85)})"
        + "".join(f"; {span(new[f'end_over_bound_{n}'], '.3f')} with {n}" for n in others)
        + f". Its steady state ran at {span(new['steady_over_bound_1'])} of that rate, and at "
        f"{span(new['end_over_forward_1'])} of the forward-only rate end to end. Start-up (worker imports and "
        f"teacher loading, {startup:.1f} s) is {100 * doc['cache']['1']['start_up_fraction']:.0f}% of a "
        f"{statistics.median(new['seconds_1']):.0f} s run.",
        f"- **Decode threads.** One decode thread per worker already keeps this teacher fed: it needs "
        f"{forward / decode:.2f} of a core's decoding. A second one only adds a thread to two busy cores, so a CPU "
        "worker defaults to one decode thread per two of its cores. On a GPU the forward and the decoding use "
        f"different hardware, and a worker can run at about min(forward, N x {decode:.0f} images/s): a teacher "
        f"forwarding F images/s ({doc['views']} views of 224 px each) needs ceil(F / {decode:.0f}) CPU cores of "
        f"decoding, e.g. {math.ceil(1500 / decode)} for 1500 images/s.",
    ]


# --- store compression and precision -----------------------------------------------------------------

STORE_BUDGET = 28.0  # bytes per view per teacher: top-10 + one temperature
TEACHER_ORDER = ("test_resnet", "test_convnext")
SHUFFLES = ("noshuffle", "shuffle", "bitshuffle")


def teachers_of(doc: dict) -> list[str]:
    return sorted(doc["teachers"], key=lambda t: TEACHER_ORDER.index(t) if t in TEACHER_ORDER else len(TEACHER_ORDER))


@region("store-compression-table")
def store_compression_table(results: Path) -> list[str]:
    doc = load(results, "store-compression.json")
    teachers = teachers_of(doc)
    arrays = [("topk_logprob", "topk_logprob"), ("topk_index", "topk_index"),
              ("log_leftover", f"log_leftover, top-{doc['topk']} of 10"),
              ("log_leftover (top-5, T=1 only)", f"log_leftover, top-{doc['leftover_topk']}, T=1 only"),
              ("log_leftover (top-5)", f"log_leftover, top-{doc['leftover_topk']}, T=1 and 4"),
              ("features", "features")]
    rows = []
    for key, label in arrays:
        cells = {t: bold_min([doc["teachers"][t][key][f"{s}/5"]["bytes_per_view"] for s in SHUFFLES])
                 for t in teachers}
        raw = doc["teachers"][teachers[0]][key]["raw_bytes_per_view"]
        head = f"{label} ({'2 x D' if key == 'features' else f'{raw:g}'})"
        if key != "features" and len({tuple(c) for c in cells.values()}) == 1:
            rows.append([head, "both", *cells[teachers[0]]])
            continue
        for n, t in enumerate(teachers):
            name = f"{t}, D={doc['teachers'][t][key]['raw_bytes_per_view'] / 2:g}" if key == "features" else t
            rows.append([head if n == 0 else "", name, *cells[t]])
    return table(["array (raw bytes/view)", "teacher", *SHUFFLES], rows)


def byte_shuffle_standing(doc: dict) -> tuple[str, float]:
    """Where byte shuffle (level 5) stands: 'best for every top-k array' or how many, and its largest
    relative excess over the best shuffle on the features."""
    teachers, t = teachers_of(doc), doc["teachers"]
    topk_arrays = [k for k in t[teachers[0]] if k.startswith(("topk", "log_leftover ("))]
    best = [(n, k) for n in teachers for k in topk_arrays
            if min(SHUFFLES, key=lambda s: t[n][k][f"{s}/5"]["bytes_per_view"]) == "shuffle"]
    best_text = ("best for every top-k array" if len(best) == len(teachers) * len(topk_arrays)
                 else f"best for {len(best)} of {len(teachers) * len(topk_arrays)} top-k arrays")
    feature_gap = max(t[n]["features"]["shuffle/5"]["bytes_per_view"]
                      / min(t[n]["features"][f"{s}/5"]["bytes_per_view"] for s in SHUFFLES) - 1 for n in teachers)
    return best_text, feature_gap


def feature_fractions(doc: dict) -> list[float]:
    """Each teacher's fp16 features as stored (byte shuffle, level 5) over their raw 2 x D bytes."""
    t = doc["teachers"]
    return [t[n]["features"]["shuffle/5"]["bytes_per_view"] / t[n]["features"]["raw_bytes_per_view"]
            for n in teachers_of(doc)]


@region("store-compression-notes")
def store_compression_notes(results: Path) -> list[str]:
    doc, old = load(results, "store-compression.json"), load(results, "store-compression-format1.json")
    teachers = teachers_of(doc)
    t = doc["teachers"]
    budget = [doc["budget"][n]["total"] for n in teachers]
    best_text, feature_gap = byte_shuffle_standing(doc)
    main = [t[n][k] for n in teachers for k in ("topk_logprob", "topk_index", "features")]
    saves = [1 - a["shuffle/9"]["bytes_per_view"] / a["shuffle/5"]["bytes_per_view"] for a in main]
    speed9, speed5 = [a["shuffle/9"]["encode_mb_s"] for a in main], [a["shuffle/5"]["encode_mb_s"] for a in main]
    features = feature_fractions(doc)
    logprob = [t[n]["topk_logprob"]["shuffle/5"]["bytes_per_view"] for n in teachers]
    logits = [old["teachers"][n]["topk_logits"]["shuffle/5"]["bytes_per_view"] for n in teachers_of(old)]
    summary = doc["store_summary"]
    stored = " and ".join(f"{summary['bytes_per_view'][n]:.1f}" for n in teachers)
    stored_features = " and ".join(f"{summary['feature_bytes_per_view'][n]:.0f}" for n in teachers)
    return [
        f"- Top-{doc['topk']} + one temperature, as stored (byte shuffle, level 5): **"
        f"{' and '.join(f'{b:.1f}' for b in budget)} bytes per view per teacher** ({', '.join(teachers)}: top-10 "
        f"log-probabilities + indices + the top-{doc['leftover_topk']} store's T=1 leftover); budget <= "
        f"{STORE_BUDGET:g}: {verdict(budget, '<=', STORE_BUDGET)}. Format 1 (fp16 raw logits + fp32 logsumexp) cost "
        f"{span(list(old['store_summary']['bytes_per_view'].values()), '.1f')} bytes for top-10 and two temperatures "
        "with teachers of the same recipe (the same command before format 2, `store-compression-format1.json`): "
        f"fp16 log-probabilities compress better than raw logits ({span(logprob, '.1f')} vs {span(logits, '.1f')} "
        "bytes), and no raw-scale logsumexp is kept.",
        f"- As stored in the top-{doc['topk']} store (leftover empty): "
        f"{stored} bytes per view (the job's summary line, `store_summary` in the JSON); features {stored_features}.",
        f"- Byte shuffle is {best_text}, and best or within {100 * feature_gap:.1f}% for the features; the store "
        "uses Blosc zstd level 5 with byte shuffle for every array. Level 9 saves "
        f"{span([100 * s for s in saves], '.0f')}% "
        f"more on the top-k arrays and features but encodes about "
        f"{statistics.median(a / b for a, b in zip(speed5, speed9)):.0f}x slower ({span(speed9, '.0f')} vs "
        f"{span(speed5, '.0f')} MB/s).",
        f"- fp16 features compress to {span([100 * f for f in features], '.0f')}% of their raw 2 x D bytes here: "
        "budget up to 2 x D bytes per view (1.5 KB at D = 768).",
    ]


def sci(value: float) -> str:
    """1.2e-06 -> 1.2e-6."""
    mantissa, exponent = f"{value:.1e}".split("e")
    return f"{mantissa}e{int(exponent)}"


@region("store-precision")
def store_precision(results: Path) -> list[str]:
    doc = load(results, "store-precision.json")
    settings, targets = doc["settings"], doc["targets"]

    def worst(fmt: str, key: str) -> float:
        return max(s[fmt][key] for s in settings)

    format2 = [worst(f, "leftover_rel_error_max") <= targets["leftover_rel_error"] and
               worst(f, "kl_max") <= targets["kl_nats"] for f in ("format2_T1", "format2_T4")]
    classes = min(s["classes"] for s in settings)
    tops = sorted({s["top"] for s in settings})
    bad_from = next((top for top in tops if all(s["format1_T1"]["leftover_rel_error_median"] >= 1 for s in settings
                                                if s["classes"] == classes and s["top"] >= top)), None)
    lines = [f"Synthetic confident logits (top logit {tops[0]:g}-{tops[-1]:g} over "
             f"{' and '.join(str(c) for c in sorted({s['classes'] for s in settings}))} classes, k = "
             f"{', '.join(str(k) for k in sorted({s['k'] for s in settings}))}, {doc['views_per_setting']} views per "
             "setting), stored in format 1 (fp16 raw logits + fp32 logsumexp) and format 2, rebuilt, and compared "
             "with the exact top-k target. Format 2 (the cache's encoder, the loss's rebuild): leftover relative "
             f"error at most {sci(worst('format2_T1', 'leftover_rel_error_max'))} and KL at most "
             f"{sci(worst('format2_T1', 'kl_max'))} nats at T = 1 "
             f"({sci(worst('format2_T4', 'leftover_rel_error_max'))} and {sci(worst('format2_T4', 'kl_max'))} at "
             "T = 4), in every setting (targets "
             f"{targets['leftover_rel_error']:g} and {sci(targets['kl_nats'])} nats: "
             f"{'met' if all(format2) else 'missed'})."]
    if bad_from is not None:
        hit = [s["format1_T1"] for s in settings if s["classes"] == classes and s["top"] >= bad_from]
        lines[0] += (f" Format 1: median leftover error 100% or more once the top logit reaches {bad_from:g} over "
                     f"{classes} classes, the leftover clamped to zero on "
                     f"{span([100 * h['clamped_fraction'] for h in hit], '.0f')}% of those views, KL up to "
                     f"{worst('format1_T1', 'kl_max'):.3f} nats.")
    return lines


# --- student loader, driver, training ----------------------------------------------------------------

def bold_median(stat: dict) -> str:
    return f"**{stat['median']:.2f}** ({span([stat['min'], stat['max']])})"


@region("loader-table")
def loader_table(results: Path) -> list[str]:
    doc = load(results, "loader-cpu.json")
    rates, first = doc["median_examples_per_s"], doc["median_first_epoch_examples_per_s"]
    rss = doc["peak_rss_loader_mb"]
    rows = [["plain", f"{rates['plain']:.0f}", "1", f"{first['plain']:.0f}", f"{rss['plain']:.0f} MB"],
            ["stream", f"{rates['stream']:.0f}", bold_median(doc["stream_over_plain"]),
             f"{first['stream']:.0f} ({doc['first_epoch_stream_over_plain']['median']:.2f} of plain)",
             f"{rss['stream']:.0f} MB"],
            ["stream x2", f"{rates['stream_x2']:.0f}", bold_median(doc["stream_x2_over_plain"]),
             f"{first['stream_x2']:.0f}", f"{rss['stream_x2']:.0f} MB"]]
    return table(["", "examples/s, second epoch", "/ plain, median (range)", "first epoch (start-up included)",
                  "peak RSS, loader process (max over rounds)"], rows)


@region("loader-notes")
def loader_notes(results: Path) -> list[str]:
    doc, driver = load(results, "loader-cpu.json"), load(results, "driver-scale.json")
    runs = doc["runs"]
    stream_runs = runs["stream"] + runs["stream_x2"]
    loader_mb = [r["peak_rss_loader_mb"] for r in stream_runs]
    shards = doc["images"] // doc["samples_per_shard"]
    least = min(r["shards_per_batch_min"] for r in runs["stream"])
    mixing = f"held all {shards} shards" if least == shards else f"held at least {least} of {shards} shards"
    plan, stall = driver["steps"]["rank_plan_world_1"], doc["training_stall"]
    return [
        f"- Throughput per loader process: {doc['stream_over_plain']['median']:.2f}x the plain pipeline with teacher "
        f"targets joined (target >= 1.0 in every round: {verdict(doc['stream_over_plain']['rounds'], '>=', 1.0)}), "
        f"{doc['stream_x2_over_plain']['median']:.2f}x with two crops per image. The first epoch also pays the "
        "spawned loader's one-time start (importing torch, zarr and the project) and the shuffle buffer's fill: "
        f"{span(doc['first_epoch_stream_over_plain']['rounds'])}x the forked plain loader over this "
        f"{doc['images']}-image epoch, nothing over an ImageNet epoch (the loaders persist across epochs).",
        f"- Memory: the stream's loader process peaked at {span(loader_mb, '.0f')} MB across modes and rounds "
        f"(target < 1.5 GB in every round: {verdict(loader_mb, '<', 1500)}); it holds one chunk of 16 samples and "
        "its open shards' store rows, never "
        "a rendered shard. The training process holds the shuffle buffer in a slot pool of 2048 + 4 x batch "
        f"examples (it held at most {span([r['pool_peak_examples'] for r in stream_runs], '.0f')} here) and peaked "
        f"at {span([doc['peak_rss_main_mb'][m] / 1e3 for m in ('stream', 'stream_x2')])} GB with torch imported.",
        f"- Mixing: every batch of {doc['batch_size']} {mixing} (plain: {doc['shards_per_batch_mean']['plain']:.2f} "
        f"on average). At ImageNet scale ({driver['shards']} shards, batch 256), the epoch plan puts "
        f"{plan['shards_per_batch_mean']:.1f} distinct shards in a batch on average and never fewer than "
        f"{plan['shards_per_batch_min']} (`bench_driver.py`, below).",
        f"- Training stall: {100 * stall['stall_fraction']:.1f}% of the time waiting for data over {stall['steps']} "
        f"regla_t steps at {doc['img_size']} px (batch {stall['batch_size']}, "
        f"{stall['step_seconds'] / stall['steps']:.1f} s per step on this CPU, the loader sharing its two cores); "
        "the trainer logs the same share as `data_wait`.",
    ]


DRIVER_STEPS = {"index": "index the manifest",
                "create_store": "create the store, register both teachers (`prepare_store`)",
                "plan_cache": "plan the cache job (teachers and shards with work left)",
                "inspect": "`inspect` (report and its text)",
                "train_checks": "train-student's checks (`plan_run`, on a completed store)"}
RANK_PLANS = {"rank_plan_world_1": "a training rank's epoch plan, world size 1",
              "rank_plan_world_8": "the same, world size 8"}


@region("run-all-quick")
def run_all_quick(results: Path) -> list[str]:
    doc = load(results, "run-all-quick-mode.json")
    failed = [s["name"] for s in doc["steps"] if s["exit_code"] != 0]
    slowest = sorted(doc["steps"], key=lambda s: -s["seconds"])[:3]
    return [f"The last `--quick` run took {doc['seconds'] / 60:.1f} min ({doc['seconds']:.0f} s) on "
            f"{doc['machine']['cpus']} cores ({doc['machine']['cpu']}), "
            + (f"with failed steps: {', '.join(failed)}" if failed else "every step exiting 0")
            + "; the slowest steps: " + ", ".join(f"{s['name']} {s['seconds']:.0f} s" for s in slowest)
            + " (`run-all-quick-mode.json`)."]


@region("driver-table")
def driver_table(results: Path) -> list[str]:
    steps = load(results, "driver-scale.json")["steps"]
    rows = [[label, f"{steps[k]['seconds']:.2f}", f"+{steps[k]['above_imports_mb']:.0f} MB"]
            for k, label in DRIVER_STEPS.items()]
    rows += [[f"{label} ({steps[k]['examples']:,} examples)", f"{steps[k]['seconds']:.2f}",
              f"+{steps[k]['above_imports_mb']:.0f} MB"] for k, label in RANK_PLANS.items()]
    return [f"Peak RSS of a process that only imports the same modules (torch, timm, zarr, ray): "
            f"{steps['import_only']['peak_rss_mb']:.0f} MB.", ""] + table(
        ["step", "seconds", "peak RSS over the imports"], rows)


@region("driver-notes")
def driver_notes(results: Path) -> list[str]:
    steps = load(results, "driver-scale.json")["steps"]
    plan = steps["rank_plan_world_1"]
    seconds = max(steps[k]["seconds"] for k in DRIVER_STEPS)
    memory = max(steps[k]["above_imports_mb"] for k in DRIVER_STEPS)
    return [f"The driver's own steps (all but the rank plans) finish in {seconds:.1f} s or less, with {memory:.0f} MB "
            "or less of their own. "
            f"A rank's plan costs about {plan['above_imports_mb'] * 2**20 / plan['examples']:.0f} bytes per example "
            "at world size 1 (numpy arrays over its examples, built once per epoch)."]


TRAIN_MODES = {"labels": "(a) labels only", "cached": "(b) cached KD, 2 teachers",
               "online": "(c) online KD, 2 teachers", "labels_nchw": "(d) labels only, NCHW"}


@region("train-table")
def train_table(results: Path) -> list[str]:
    doc = load(results, "train-cpu.json")
    rows = [[label, f"{doc['images_per_second'][m]:.1f}", f"{doc['seconds_per_step'][m]:.3f}",
             f"{doc['loader_seconds_per_batch'][m]:.3f}"] for m, label in TRAIN_MODES.items()]
    return table(["", "images/s", "s/step", "loader s/batch (in-process)"], rows)


def train_ratio(doc: dict, key: str, fmt: str, unit: str = "") -> str:
    """The median of the per-round ratios (each measured side by side) and their range, where the
    result keeps them; else the ratio of the medians."""
    rounds = doc.get("rounds", {}).get(key)
    if not rounds:
        return format(doc[key], fmt) + unit
    return f"{format(statistics.median(rounds), fmt)}{unit} (rounds {span(rounds, fmt)})"


@region("train-notes")
def train_notes(results: Path) -> list[str]:
    doc = load(results, "train-cpu.json")
    rounds = doc.get("rounds", {}).get("ratio_cached_over_labels")
    target = verdict(rounds, ">=", 0.9) if rounds else "not shown, `train-cpu.json` keeps no per-round values"
    loading = doc["loader_seconds_per_batch"]
    return [
        f"- (b) / (a) = **{train_ratio(doc, 'ratio_cached_over_labels', '.2f')}** (target >= 0.9 in every round: "
        f"{target}). Joining the cached targets changes loading by {loading['cached'] - loading['labels']:+.3f} s "
        "per batch, which a loader process overlaps.",
        f"- (b) / (c) = **{train_ratio(doc, 'speedup_cached_over_online', '.2f', 'x')}**. The two teachers' forward "
        f"pass alone takes {doc['teacher_forward_seconds_per_batch']:.3f} s per batch; adding it to (b)'s median step "
        f"predicts {doc['predicted_speedup_from_teacher_share']:.2f}x.",
        f"- (a) / (d) = **{train_ratio(doc, 'speedup_channels_last', '.2f', 'x')}** for channels_last (NHWC, the "
        "default) on this CPU.",
    ]


# --- quickstart --------------------------------------------------------------------------------------

EARLIER_RECIPE = ("This result is from the earlier recipe (KD arm label weight 0.5; labels-only on fresh views) "
                  "and will be replaced when the quickstart is measured again.")


@region("quickstart")
def quickstart(results: Path) -> list[str]:
    doc = load(results, "quickstart-cpu.json")
    minutes, seconds = divmod(round(doc["seconds"]), 60)
    recipe = f"Recipe: {doc['recipe']}." if isinstance(doc.get("recipe"), str) else EARLIER_RECIPE
    acc = doc["accuracy"]
    rows = [[name, f"{a['top1']:.2f}", f"{a['top5']:.2f}", f"{a['ema_top1']:.2f}"] for name, a in acc.items()]
    students = [a["top1"] for name, a in acc.items() if name.startswith("student")]
    machine = doc["machine"]
    lines = [recipe, "", f"End to end: {minutes} min {seconds} s on the {machine['cpus']}-core VM ({machine['cpu']}; "
             "`quickstart-cpu.json`).", ""] + table(["run", "top-1 %", "top-5 %", "EMA top-1 %"], rows)
    if len(students) == 2:
        lines += ["", f"KD minus labels-only top-1: {students[0] - students[1]:+.2f} points, one seed on the "
                      "validation digits: this sample shows the pipeline working end to end, not a distillation "
                      "gain (docs/quality.md measures that over seeds)."]
    return lines


# --- README headlines ------------------------------------------------------------------------------

QUALITY = "quality"  # the study's runs, one folder per dataset


@region("readme-headlines")
def readme_headlines(results: Path) -> list[str]:
    """One line per headline, each with its spread and a link to the table it comes from."""
    ok = model_records(load(results, SWEEP))
    median, low, high = ratio_spread(ok[("iformer_m", 1024, 1, "fp32")], ok[("regla_m", 1024, 1, "fp32")])
    (_, _, cache), = [d for d in cache_data(results) if d[0] == CACHE_RUNS[-1]]
    lines = [
        f"- **Model latency**: `regla_m` runs 1024-px images {median:.2f}x as fast as `iformer_m` (batch 1, fp32, "
        f"2-core CPU; {low:.2f}-{high:.2f} over every rep) "
        "([table](docs/benchmarks.md#model-latency-benchmarksbench_modelspy)).",
        f"- **Cache efficiency**: the cache job runs at {med_span(cache['end_over_bound_1'], '.2f')} of the rate "
        "at which the teacher's forward and the JPEG decoding can share the same cores, start-up included "
        "(ImageNet-shaped 500x375 JPEGs, 2 views at 224 px) "
        "([table](docs/benchmarks.md#cache-throughput-and-decoding-benchmarksbench_cachepy)).",
    ]
    studies = quality_report.studied(str(results / QUALITY))
    for dataset, runs in sorted(studies.items()):
        name = quality_report.DATASET_NAMES.get(dataset, dataset).split(" (")[0]
        parts = []
        if "kd-2t" in runs and "labels" in runs:
            delta, error = quality_report.difference(runs["kd-2t"], runs["labels"])
            parts.append(f"KD from two cached teachers vs labels only: {quality_report.signed(delta)} ± {2 * error:.2f} points of "
                         f"val top-1 ({quality_report.verdict(delta, error)}, {len(runs['kd-2t'])} seeds)")
        if "kd-2t-kall" in runs and "online-2t" in runs:
            delta, error = quality_report.difference(runs["kd-2t-kall"], runs["online-2t"])
            parts.append(f"cached vs the same teachers run live: {quality_report.signed(delta)} ± {2 * error:.2f} "
                         f"({quality_report.verdict(delta, error)})")
        if parts:
            lines.append(f"- **{name}**: " + "; ".join(parts) + " ([tables](docs/quality.md)).")
    return lines


# --- docs/architecture.md --------------------------------------------------------------------------

SHARDS_LINK = "[benchmarks](benchmarks.md#making-shards-benchmarksbench_make_shardspy)"


def free_runs_text(runs: list[tuple[str, str, dict]]) -> str:
    names = [f"`{name}`" for _, name, _ in runs]
    listed = ", ".join(names[:-1]) + " and " + names[-1] if len(names) > 1 else names[0]
    return f"medians of the runs with two free cores, {listed}, runs of {produced_by(SHARD_RUNS[-2][1])}"


@region("architecture-imports")
def architecture_imports(results: Path) -> list[str]:
    runs = free_shard_runs(results)
    wds = [doc["import_seconds"]["webdataset"]["median"] for _, _, doc in runs]
    ours = [doc["import_seconds"]["pipeline.data.make_shards"]["median"] for _, _, doc in runs]
    return [f"Importing webdataset imports torch: {span(wds, '.1f')} s per worker in a fresh interpreter, against "
            f"{span(ours)} s for `pipeline.data.make_shards` ({free_runs_text(runs)}; {SHARDS_LINK})."]


@region("architecture-shard-reading")
def architecture_shard_reading(results: Path) -> list[str]:
    runs = free_shard_runs(results)
    ours, theirs = ([doc["read"]["samples_per_second"][reader]["median"] for _, _, doc in runs]
                    for reader in ("ours", "webdataset"))
    gap = max(abs(1 - doc["read"]["ours_over_webdataset"]["median"]) for _, _, doc in runs)
    scan = [doc["read"]["header_scan_over_webdataset"]["median"] for _, _, doc in runs]
    return [f"Speed does not decide between the two readers: they read the same shards at {span(ours, '.0f')} vs "
            f"{span(theirs, '.0f')} samples/s (within {100 * gap:.1f}% of each other), and the header-only index "
            f"scan is {span(scan, '.1f')}x as fast as reading a shard with "
            f"webdataset ({free_runs_text(runs)}; {SHARDS_LINK})."]


# --- docs/cluster.md -------------------------------------------------------------------------------

ESTIMATE = "estimate-imagenet.json"


@region("cluster-decode-cores")
def cluster_decode_cores(results: Path) -> list[str]:
    cache, estimate = load(results, CACHE_RUNS[-1]), load(results, ESTIMATE)
    decode = cache["decode_per_core"]
    return [f"- **Decode cores.** A worker is fed when its decode cores keep up with its forward: one core decodes "
            f"and renders {med_range(decode, '.0f')} ImageNet-shaped images/s with {cache['views']} views of 224 px "
            f"(median (range) of {len(decode['rounds'])} rounds, `{CACHE_RUNS[-1]}`, from "
            f"{produced_by(CACHE_RUNS[-1])}). A worker whose teachers together forward F views/s needs F / V images/s "
            f"decoded with V views each, which takes at most (F / V) x (V / 2) / {decode['median']:.0f} = "
            f"F / {2 * decode['median']:.0f} cores by median (rendering grows with V, decoding does not). The worked "
            f"estimate below gives at most {estimate['decode_cores_per_gpu_ceiling']:.2f} cores per GPU for two "
            f"base-size teachers at {estimate['views']} views; small teachers (thousands of views/s more) need "
            "several."]


@region("cluster-loader")
def cluster_loader(results: Path) -> list[str]:
    doc = load(results, "loader-cpu.json")
    runs = doc["runs"]

    def rate(mode: str) -> str:
        return med_span([r["examples_per_s"] for r in runs[mode]], ".0f")

    return [f"- **Loader processes.** One student loader process renders {rate('stream')} examples/s at "
            f"{doc['img_size']} px with teacher targets joined, {rate('stream_x2')} with two crops per decoded image "
            f"(median (range) of {doc['rounds']} rounds, second epoch; `loader-cpu.json`, from "
            f"{produced_by('loader-cpu.json')}), so a GPU training a small student at several thousand images/s needs "
            "several loader processes and the CPUs for them."]


def estimate_of(results: Path) -> dict:
    """estimate-imagenet.json, checked against the results it was computed from."""
    estimate = load(results, ESTIMATE)
    measured = sorted(b["total"] for b in load(results, "store-compression.json")["budget"].values())
    decode = load(results, CACHE_RUNS[-1])["decode_per_core"]["median"]
    floor = estimate["decode_images_per_second_per_core_floor"] * max(estimate["views"], 2) / 2
    if sorted(estimate["store_bytes"]["topk_bytes_per_view_measured_10_classes"]) != measured \
            or not math.isclose(floor, decode):
        raise TablesError(f"{ESTIMATE} is older than store-compression.json or {CACHE_RUNS[-1]}: "
                          "rerun python benchmarks/estimate_imagenet.py")
    return estimate


def source_link(source: str) -> str:
    """timm's 'results/X.csv (OWNER/REPO@COMMIT), ...' with a link to that file at that commit."""
    match = re.fullmatch(r"timm (results/\S+) \(([\w.-]+/[\w.-]+)@(\w+)\)(.*)", source)
    if not match:
        return source
    path, repo, commit, rest = match.groups()
    return f"timm's [`{path}`](https://github.com/{repo}/blob/{commit}/{path}){rest}"


@region("cluster-estimate-table")
def cluster_estimate_table(results: Path) -> list[str]:
    doc = estimate_of(results)
    store, teachers, views = doc["store_bytes"], doc["teachers"], doc["views"]
    compression = load(results, "store-compression.json")
    gb = 1e9
    features = ", ".join(f"{store['features'][n] / gb:.2f} GB ({n}, D = {t['feature_dim']})"
                         for n, t in teachers.items())
    decode = doc["decode_images_per_second_per_core_floor"] * max(views, 2) / 2
    rows = [["images x views", f"{doc['images']:,} x {views} = {doc['images'] * views / 1e6:.1f} M view rows",
             "ImageNet-1k train"],
            [f"top-{doc['topk']} + leftover, per teacher",
             f"{store['topk_per_teacher_low'] / gb:.2f}-{store['topk_per_teacher_high'] / gb:.2f} GB",
             f"{min(store['topk_bytes_per_view_measured_10_classes']):.1f} B/view measured with 10-class teachers "
             f"(`store-compression.json`) to {store['topk_bytes_per_view_raw']} B/view uncompressed"],
            [f"features on {doc['feature_views']} views", features,
             "2 x D bytes per view, uncompressed: fp16 features compressed to "
             f"{span([100 * f for f in feature_fractions(compression)], '.0f')}% of that in `store-compression.json`"],
            ["views table (boxes + flips)", f"{store['views_table'] / gb:.2f} GB before compression",
             f"{store['views_table'] / (doc['images'] * views):g} bytes per view"]]
    rows += [[f"GPU-hours, {n}", f"{doc['gpu_hours'][n]:.2f}", f"{t['images_per_second']:.0f} images/s (cited, below)"]
             for n, t in teachers.items()]
    rows.append(["decode cores per GPU", f"at most {doc['decode_cores_per_gpu_ceiling']:.2f}",
                 f"{decode:.0f} images/s per core for decode + 2 views (median, `{CACHE_RUNS[-1]}`), at least 2/V of "
                 "that for V views"])
    return table(["quantity", "value", "from"], rows)


@region("cluster-estimate-notes")
def cluster_estimate_notes(results: Path) -> list[str]:
    doc = estimate_of(results)
    store, hours = doc["store_bytes"], sum(doc["gpu_hours"].values())
    total = 2 * store["topk_per_teacher_high"] + sum(store["features"].values()) + store["views_table"]
    return [f"GPU rates are cited, not measured here: {source_link(doc['teacher_rate_source'])}, 224 px (the rows "
            f"{' and '.join(f'`{n}`' for n in doc['teachers'])}); an H100 is faster, so these hours are an upper "
            f"estimate for it. So the whole store, features included, is at most about {total / 1e9:.0f} GB before "
            f"compression, and {hours:.1f} GPU-hours make it: about {60 * hours / 32:.0f} minutes on a 32-GPU "
            f"cluster, once, for every student trained from it. Decoding is not the limit with base-size teachers at "
            f"{doc['views']} views; with small teachers (resnet50 class) or fewer views a GPU needs several decode "
            "cores."]


# --- docs/store-format.md --------------------------------------------------------------------------

PRECISION = "store-precision.json"


@region("store-format-precision-table")
def store_format_precision_table(results: Path) -> list[str]:
    rows = []
    for s in load(results, PRECISION)["settings"]:
        f1, t1, t4 = s["format1_T1"], s["format2_T1"], s["format2_T4"]
        rows.append([str(s["classes"]), str(s["k"]), f"{s['top']:g}", f"{f1['true_leftover_median']:.1e}",
                     f"{f1['leftover_rel_error_median']:.2g} / {f1['leftover_rel_error_max']:.2g}",
                     f"{100 * f1['clamped_fraction']:.0f}%", f"{f1['kl_max']:.1e}",
                     f"{t1['leftover_rel_error_median']:.1e} / {t1['leftover_rel_error_max']:.1e}",
                     f"{t1['kl_max']:.1e}", f"{t4['leftover_rel_error_max']:.1e}", f"{t4['kl_max']:.1e}"])
    return table(["C", "k", "top logit", "leftover (median, T=1)", "format 1, T=1: leftover error", "L = 0", "max KL",
                  "format 2, T=1: leftover error", "max KL", "format 2, T=4: max leftover error", "max KL"], rows)


@region("store-format-precision-notes")
def store_format_precision_notes(results: Path) -> list[str]:
    doc = load(results, PRECISION)
    settings, targets = doc["settings"], doc["targets"]

    def worst(fmt: str, key: str, among: Sequence[dict] = settings) -> float:
        return max(s[fmt][key] for s in among)

    errors = [s[f]["leftover_rel_error_max"] for s in settings for f in ("format2_T1", "format2_T4")]
    kls = [s[f]["kl_max"] for s in settings for f in ("format2_T1", "format2_T4")]
    resolved = min(s[f]["fp32_resolves_fraction"] for s in settings for f in ("format1_T1", "format2_T1"))
    bad, hit = [], []
    for classes in sorted({s["classes"] for s in settings}):
        mine = sorted((s for s in settings if s["classes"] == classes), key=lambda s: s["top"])
        tops = [s["top"] for s in mine]
        first = next((top for top in tops if all(s["format1_T1"]["leftover_rel_error_median"] >= 1
                                                 for s in mine if s["top"] >= top)), None)
        if first is not None:
            bad.append(f"{first:g} over {classes} classes")
            hit += [s for s in mine if s["top"] >= first]
    lines = [f"Format 2: leftover error at most {targets['leftover_rel_error']:g} relative in every setting: "
             f"{verdict(errors, '<=', targets['leftover_rel_error'])}; KL at most {sci(targets['kl_nats'])} nats: "
             f"{verdict(kls, '<=', targets['kl_nats'])}. The worst leftover error is "
             f"{sci(worst('format2_T1', 'leftover_rel_error_max'))} and the worst KL "
             f"{sci(worst('format2_T1', 'kl_max'))} nats at T = 1 ({sci(worst('format2_T4', 'leftover_rel_error_max'))}"
             f" and {sci(worst('format2_T4', 'kl_max'))} at T = 4). "
             + (f"Every leftover here is within fp32's range (`fp32_resolves_fraction` {resolved:g} in every setting; "
                if resolved == 1 else f"Down to {100 * resolved:.0f}% of the leftovers are within fp32's range (")
             + f"the medians go down to {min(s['format1_T1']['true_leftover_median'] for s in settings):.0e}), "
             "and a log in fp32 resolves masses far below it."]
    if bad:
        clamped = [100 * s["format1_T1"]["clamped_fraction"] for s in hit]
        lines[0] += (f" Format 1's median leftover error is 100% or more once the top logit reaches {bad[0]}"
                     + "".join(f" ({b})" for b in bad[1:])
                     + f": the leftover is clamped to zero on {span(clamped, '.0f')}% of those views and is off by "
                     f"up to {worst('format1_T1', 'leftover_rel_error_max', hit):.2g} times its true value on others; "
                     f"its KL reaches {worst('format1_T1', 'kl_max'):.2f} nats.")
    return lines


@region("store-format-compression")
def store_format_compression(results: Path) -> list[str]:
    doc = load(results, "store-compression.json")
    best_text, feature_gap = byte_shuffle_standing(doc)
    budget = [b["total"] for b in doc["budget"].values()]
    return [f"On the outputs of two small trained teachers (10 classes, `store-compression.json`, from "
            f"{produced_by('store-compression.json')}) byte shuffle was {best_text} and within "
            f"{100 * feature_gap:.1f}% of the best for the features. Top-{doc['topk']} + one temperature cost "
            f"{span(budget, '.1f')} bytes per view per teacher (raw {4 * doc['topk'] + 4}); fp16 features compressed "
            f"to {span([100 * f for f in feature_fractions(doc)], '.0f')}% of their raw 2 x D bytes, so budget up to "
            "2 x D bytes per view for them "
            "([benchmarks](benchmarks.md#store-compression-benchmarksbench_store_compressionpy))."]


# --- docs/training.md ------------------------------------------------------------------------------

@region("training-channels-last")
def training_channels_last(results: Path) -> list[str]:
    doc = load(results, "train-cpu.json")
    return [f"channels_last made {doc['model']}'s training step "
            f"{train_ratio(doc, 'speedup_channels_last', '.2f', 'x')} as fast as NCHW at {doc['img_size']} px, batch "
            f"{doc['batch_size']}, on a {doc['cpus']}-core CPU (`train-cpu.json`, from "
            f"{produced_by('train-cpu.json')}; "
            "[benchmarks](benchmarks.md#student-training-throughput-benchmarksbench_trainpy))."]


# --- docs/regla.md ---------------------------------------------------------------------------------

@region("regla-sizes")
def regla_sizes(results: Path) -> list[str]:
    doc = load(results, SWEEP)
    sizes = {s["model"]: s for s in doc["sizes"]}
    rows = []
    for name in (s["model"] for s in doc["sizes"] if s["model"].startswith("regla_")):
        ours, theirs = sizes[name], sizes.get(name.replace("regla_", "iformer_"))
        row = [f"`{name}`", f"{ours['params_m']:.3f}", f"{ours['gmacs_224']:.3f}"]
        row += ([f"{theirs['params_m']:.3f} / {theirs['gmacs_224']:.3f}",
                 f"{ours['params_m'] / theirs['params_m']:.3f} / {ours['gmacs_224'] / theirs['gmacs_224']:.3f}"]
                if theirs else ["-", "-"])
        rows.append(row)
    return [f"Counted at 224 px, batch 1, by torch's `FlopCounterMode` (MACs = FLOPs / 2; the counter of "
            f"`pipeline models`) beside timm {doc['environment']['timm']}'s `iformer_*` counted the same way "
            f"(`sizes` in `{SWEEP}`, from {produced_by(SWEEP)}):", ""] + table(
        ["variant", "params (M)", "MACs (G)", "iFormer params / MACs", "ratio params / MACs"], rows)


# --- the page ----------------------------------------------------------------------------------------

def split_regions(text: str, doc: Path) -> list[tuple[str | None, list[str]]]:
    """The page as (None, prose lines) and (region name, body lines) segments, in order."""
    segments: list[tuple[str | None, list[str]]] = [(None, [])]
    current: str | None = None
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        opened, closed = OPEN.fullmatch(line.strip()), CLOSE.fullmatch(line.strip())
        if opened:
            if current:
                raise TablesError(f"{doc}:{number}: region {opened[1]} opens inside region {current}")
            current = opened[1]
            segments[-1][1].append(line)
            segments.append((current, []))
        elif closed:
            if closed[1] != current:
                raise TablesError(f"{doc}:{number}: closing {closed[1]} but the open region is {current}")
            current = None
            segments.append((None, [line]))
        else:
            segments[-1][1].append(line)
    if current:
        raise TablesError(f"{doc}: region {current} is never closed")
    return segments


def render(doc: Path = DOC, results: Path = RESULTS) -> tuple[str, list[str]]:
    """The page with every region rendered from ``results``, and the names of the regions that changed."""
    if not doc.is_file():
        raise TablesError(f"missing page: {doc}")
    out, stale = [], []
    for name, lines in split_regions(doc.read_text(), doc):
        if name is None:
            out += lines
            continue
        if name not in REGIONS:
            raise TablesError(f"{doc}: unknown region {name!r} (known: {', '.join(sorted(REGIONS))})")
        body = [line + "\n" for line in REGIONS[name](results)]
        if body != lines:
            stale.append(name)
        out += body
    return "".join(out), stale


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if a page is stale; write nothing")
    parser.add_argument("--doc", type=Path, action="append",
                        help="a page to render (repeatable; default every page with generated regions, PAGES)")
    parser.add_argument("--results", type=Path, default=RESULTS, help="the JSON folder (default benchmarks/results)")
    args = parser.parse_args(argv)
    status = 0
    for doc in args.doc or PAGES:
        try:
            text, stale = render(doc, args.results)
        except TablesError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if args.check:
            if stale:
                print(f"{doc}: stale regions: {', '.join(stale)} (run python benchmarks/tables.py)")
                status = 1
            else:
                print(f"{doc}: every region matches {args.results}")
            continue
        if stale:
            doc.write_text(text)
        print(f"{doc}: {len(stale)} region(s) rewritten" + (f": {', '.join(stale)}" if stale else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
