"""Side-by-side inference latency benchmark for regla and reference timm models.

Method
------
The machine may be noisy, so models are only compared within one run, as ratios.
For every (resolution, batch, precision) config all models are measured, then a
second pass goes over them in reverse order (``--rounds``, default 2); alternating
the order reduces bias from thermal / frequency drift. Per model and round: a few
warm-up forwards, then timed reps until both ``--min-reps`` and ``--min-time`` are
reached, stopping early once ``--max-time`` is spent (always >= 1 timed rep). The
reported latency is the median over all timed reps of all rounds.

Models come from ``timm.create_model(name, pretrained=False, num_classes=1000)``,
run in eval mode under ``torch.inference_mode()`` and are fused for inference with
``timm.utils.reparameterize_model`` (``--no-fuse`` disables). bf16 means fp32
weights under ``torch.autocast(device_type, dtype=torch.bfloat16)``. Parameters and
MACs (batch 1, 224 px, fp32, before fusing; MACs = FLOPs / 2) are reported too.

Configs over ``--max-pixels-per-batch`` are recorded as skipped; runtime errors
(e.g. OOM) are recorded per model/config. The JSON is rewritten after each config,
so an interrupted run keeps its partial results.

Run it on an otherwise idle machine: on a 2-core VM another busy process makes
multi-threaded CPU timings swing by up to 10x (seen here), which no interleaving fixes.

Run (from the repository root)::

    python benchmarks/bench_models.py --quick          # smoke subset, a few minutes on CPU
    python benchmarks/bench_models.py                  # full default sweep
    python benchmarks/bench_models.py --models regla_m,iformer_m --img-sizes 512,1024
    python benchmarks/bench_models.py --models "regla_m,regla_m(elrf_dw5_in_ffn=False),iformer_m"
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import timm
import torch
from timm.utils import reparameterize_model

from pipeline.model_stats import count_macs, count_params

DEFAULT_MODELS = ("regla_t,regla_s,regla_m,regla_l,iformer_t,iformer_s,iformer_m,iformer_l,"
                  "efficientvit_b1,fastvit_sa12,mobilenetv4_hybrid_medium")
# fp32 only: on a CPU without native bf16 (no AVX-512 BF16 or AMX) autocast emulates it at tens
# of times fp32's latency, which made the smoke run take minutes.
QUICK = {"models": "regla_t,regla_m,iformer_t,iformer_m", "img_sizes": "224,512",
         "batch_sizes": "1", "precisions": "fp32", "rounds": 1, "min_reps": 2}
FULL = {"models": DEFAULT_MODELS, "img_sizes": "224,512,1024", "batch_sizes": "1,32",
        "precisions": "fp32,bf16", "rounds": 2}
CPU_MAX_PIXELS = 16 * 1024 * 1024  # allows 32 x 512^2, skips 32 x 1024^2
SCALING_TARGET = 4.6  # regla_m latency(1024 px) / latency(512 px) must not exceed this


@dataclass(frozen=True)
class BenchConfig:
    """How each model is prepared and timed."""
    device: str
    fuse: bool
    channels_last: bool
    compile: bool
    rounds: int
    warmup: int
    min_reps: int
    min_time: float
    max_time: float


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def csv_list(text: str, cast: type = str) -> list[Any]:
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def parse_models(text: str) -> list[str]:
    """Split a comma list of model specs; a spec may carry kwargs: `regla_m(elrf_dw5_in_ffn=False;attn_heads=2)`."""
    return [m.strip() for m in re.findall(r"[^,(]+(?:\([^)]*\))?", text) if m.strip()]


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """`name(key=value;...)` -> (name, {key: literal value})."""
    match = re.fullmatch(r"([\w.]+)(?:\((.*)\))?", spec)
    if not match:
        sys.exit(f"error: bad model spec {spec!r}; expected name or name(key=value;...)")
    name, args = match.group(1), match.group(2) or ""
    kwargs = {}
    for item in filter(None, (a.strip() for a in args.split(";"))):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = ast.literal_eval(value.strip())
    return name, kwargs


def check_models(names: list[str]) -> None:
    """Import regla when its models are requested and fail clearly on unknown names."""
    if any(n.startswith("regla_") for n in names):
        try:
            import regla  # noqa: F401  (registers the regla_* timm models)
        except ImportError as e:
            sys.exit(f"error: regla models requested but `import regla` failed ({e}). "
                     "Install the package (pip install -e .) or pass --models without regla_*.")
    unknown = [n for n in names if not timm.is_model(split_spec(n)[0])]
    if unknown:
        sys.exit(f"error: unknown timm model(s): {', '.join(unknown)}")


def build_model(spec: str, cfg: BenchConfig) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Create the model, measure params/MACs at 224 px (unfused), then prepare it for timing."""
    name, kwargs = split_spec(spec)
    model = timm.create_model(name, pretrained=False, num_classes=1000, **kwargs).eval()
    size = {"model": spec, "params_m": round(count_params(model) / 1e6, 3),
            "gmacs_224": round(count_macs(model, torch.randn(1, 3, 224, 224)) / 1e9, 3)}
    if cfg.fuse:
        model = reparameterize_model(model, inplace=True)
    model = model.to(cfg.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.compile:
        model = torch.compile(model)
    return model, size


def time_model(model: torch.nn.Module, x: torch.Tensor, precision: str,
               cfg: BenchConfig) -> list[float]:
    """Warm up, then return the per-rep latencies (ms) of one timing round."""
    autocast = torch.autocast(cfg.device, dtype=torch.bfloat16, enabled=precision == "bf16")
    times: list[float] = []
    with torch.inference_mode(), autocast:
        for _ in range(cfg.warmup):
            model(x)
        sync(cfg.device)
        start = time.perf_counter()
        while True:
            t0 = time.perf_counter()
            model(x)
            sync(cfg.device)
            now = time.perf_counter()
            times.append((now - t0) * 1e3)
            spent = now - start
            if spent >= cfg.max_time or (len(times) >= cfg.min_reps and spent >= cfg.min_time):
                return times


def make_record(model: str, size: int, batch: int, precision: str, cfg: BenchConfig,
                status: str, times: list[float] | None = None, reason: str = "") -> dict[str, Any]:
    times = times or []
    median = statistics.median(times) if times else None
    return {"model": model, "img_size": size, "batch": batch, "precision": precision,
            "fused": cfg.fuse, "channels_last": cfg.channels_last, "compiled": cfg.compile,
            "times_ms": [round(t, 3) for t in times],
            "median_ms": round(median, 3) if median else None,
            "imgs_per_s": round(batch * 1e3 / median, 2) if median else None,
            "status": status, "reason": reason}


def run_config(models: dict[str, torch.nn.Module], size: int, batch: int, precision: str,
               cfg: BenchConfig) -> list[dict[str, Any]]:
    """Measure all models on one config in interleaved (forward / reverse) rounds."""
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    errors: dict[str, str] = {}
    memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
    x = torch.randn(batch, 3, size, size, device=cfg.device).to(memory_format=memory_format)
    for r in range(cfg.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            if name in errors:
                continue
            try:
                rep_times = time_model(models[name], x, precision, cfg)
            except Exception as e:  # noqa: BLE001 - OOM, shape or compile errors are recorded
                errors[name] = f"{type(e).__name__}: {e}"[:500]
                log(f"    round {r + 1}/{cfg.rounds} {name}: ERROR {errors[name][:200]}")
                if cfg.device == "cuda":
                    torch.cuda.empty_cache()
                continue
            times[name] += rep_times
            log(f"    round {r + 1}/{cfg.rounds} {name}: {statistics.median(rep_times):.2f} ms "
                f"({len(rep_times)} reps)")
    return [make_record(n, size, batch, precision, cfg, "error", reason=errors[n]) if n in errors
            else make_record(n, size, batch, precision, cfg, "ok", times[n]) for n in names]


def format_table(records: list[dict[str, Any]]) -> str:
    ok = [r for r in records if r["status"] == "ok"]
    fastest = min((r["median_ms"] for r in ok), default=None)
    lines = [f"{'model':<36} {'ms/batch':>10} {'img/s':>10} {'rel':>7}", "-" * 66]
    for r in sorted(records, key=lambda r: r["median_ms"] or float("inf")):
        if r["status"] == "ok":
            lines.append(f"{r['model']:<36} {r['median_ms']:>10.2f} {r['imgs_per_s']:>10.1f} "
                         f"{r['median_ms'] / fastest:>6.2f}x")
        else:
            lines.append(f"{r['model']:<36} {r['status'].upper()}: {r['reason'][:80]}")
    return "\n".join(lines)


def summarize(records: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """regla_m vs iformer_m speed ratios and 512 -> 1024 px scaling, where data exists."""
    lat = {(r["model"], r["img_size"], r["batch"], r["precision"]): r["median_ms"]
           for r in records if r["status"] == "ok"}
    out = []
    for precision, batch in sorted({(k[3], k[2]) for k in lat}):
        entry: dict[str, Any] = {"device": device, "precision": precision, "batch": batch}
        for size in (512, 1024):
            regla, ifm = lat.get(("regla_m", size, batch, precision)), lat.get(("iformer_m", size, batch, precision))
            if regla and ifm:
                entry[f"speedup_regla_m_vs_iformer_m_{size}"] = round(ifm / regla, 3)
                entry[f"target_regla_m_faster_{size}"] = "pass" if ifm > regla else "fail"
        for model in ("regla_m", "iformer_m"):
            hi, lo = lat.get((model, 1024, batch, precision)), lat.get((model, 512, batch, precision))
            if hi and lo:
                entry[f"scaling_1024_over_512_{model}"] = round(hi / lo, 3)
        if "scaling_1024_over_512_regla_m" in entry:
            passed = entry["scaling_1024_over_512_regla_m"] <= SCALING_TARGET
            entry[f"target_regla_m_scaling_le_{SCALING_TARGET}"] = "pass" if passed else "fail"
        if len(entry) > 3:
            out.append(entry)
    return out


def environment(device: str) -> dict[str, Any]:
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or platform.machine()
    return {"torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "device": device, "device_name": name,
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads()}


def write_json(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help=f"comma list; kwargs as name(key=value;...) (default: {DEFAULT_MODELS})")
    p.add_argument("--img-sizes", help="comma list of square sizes (default 224,512,1024)")
    p.add_argument("--batch-sizes", help="comma list (default 1,32)")
    p.add_argument("--precisions", help="comma list of fp32,bf16 (default both)")
    p.add_argument("--rounds", type=int, help="interleaved rounds per config (default 2)")
    p.add_argument("--min-reps", type=int, help="timed reps per model-round (default 3 cpu, 20 cuda)")
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per model-round (default 1)")
    p.add_argument("--max-time", type=float, help="cap in seconds per model-round (default 30 cpu, 10 cuda)")
    p.add_argument("--warmup", type=int, help="warm-up forwards (default 1 cpu, 10 cuda)")
    p.add_argument("--max-pixels-per-batch", type=int,
                   help="skip configs with batch*H*W above this; 0 = no limit (default: cpu 16Mi, cuda none)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                   help="default: on for cuda, off for cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--no-fuse", action="store_true", help="skip timm.utils.reparameterize_model")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--quick", action="store_true", help="fast smoke subset: " + json.dumps(QUICK))
    p.add_argument("--out", type=Path, help="JSON path (default benchmarks/results/bench_models-<device>[-quick].json)")
    args = p.parse_args()
    for key, value in {**FULL, **QUICK}.items() if args.quick else FULL.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    on_cuda = device == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = BenchConfig(
        device=device, fuse=not args.no_fuse,
        channels_last=on_cuda if args.channels_last is None else args.channels_last,
        compile=args.compile, rounds=args.rounds,
        warmup=args.warmup if args.warmup is not None else (10 if on_cuda else 1),
        min_reps=args.min_reps or (20 if on_cuda else 3), min_time=args.min_time,
        max_time=args.max_time or (10.0 if on_cuda else 30.0))
    max_pixels = args.max_pixels_per_batch if args.max_pixels_per_batch is not None else (
        0 if on_cuda else CPU_MAX_PIXELS)
    names = parse_models(args.models)
    check_models(names)
    suffix = "-quick" if args.quick else ""  # a smoke run never overwrites a recorded full sweep
    out = args.out or Path(__file__).resolve().parent / "results" / f"bench_models-{device}{suffix}.json"

    models: dict[str, torch.nn.Module] = {}
    sizes: list[dict[str, Any]] = []
    for name in names:
        log(f"building {name} ...")
        models[name], size = build_model(name, cfg)
        sizes.append(size)
    print(f"{'model':<36} {'params (M)':>10} {'GMACs@224':>10}")
    for s in sizes:
        print(f"{s['model']:<36} {s['params_m']:>10.2f} {s['gmacs_224']:>10.3f}")

    doc: dict[str, Any] = {"environment": environment(device),
                           "args": {**vars(args), "out": str(out), "max_pixels_per_batch": max_pixels},
                           "bench_config": asdict(cfg), "sizes": sizes, "records": [], "summary": []}
    configs = [(s, b, p) for s in csv_list(args.img_sizes, int) for b in csv_list(args.batch_sizes, int)
               for p in csv_list(args.precisions)]
    for i, (size, batch, precision) in enumerate(configs, 1):
        title = f"[{i}/{len(configs)}] {device} {precision} batch {batch} @ {size}px"
        log(title)
        if max_pixels and batch * size * size > max_pixels:
            reason = f"batch*H*W = {batch * size * size} > --max-pixels-per-batch {max_pixels}"
            records = [make_record(n, size, batch, precision, cfg, "skipped", reason=reason) for n in names]
            print(f"\n{title}: SKIPPED ({reason})", flush=True)
        else:
            records = run_config(models, size, batch, precision, cfg)
            print(f"\n{title}\n{format_table(records)}", flush=True)
        doc["records"] += records
        doc["summary"] = summarize(doc["records"], device)
        write_json(out, doc)

    print("\nsummary (speedup = iformer_m ms / regla_m ms, > 1 means regla_m is faster):")
    for entry in doc["summary"]:
        print("  " + ", ".join(f"{k}={v}" for k, v in entry.items()))
    print(f"\nresults written to {out}")


if __name__ == "__main__":
    main()
