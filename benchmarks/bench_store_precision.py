"""How exactly a cached top-k entry rebuilds the teacher's distribution: store format 1 against format 2.

Synthetic logits like a confident classifier's: C - 1 logits N(0, 2) and one class at a top
logit of 8, 16, 24 or 32 (plus a uniform jitter in [-0.5, 0.5), so that it is not a round fp16
value), over 1000 and 21843 classes, for k = 5, 10, 20. Each view is

- format 1: the k largest raw logits in fp16 and logsumexp(logits / T) in fp32, rebuilt as
  regla-distill rebuilt it before format 2 (p_i = exp(z_i / T - lse_T), leftover 1 - sum(p_i)
  clamped at 0, spread uniformly); T = 1;
- format 2: encoded by ``pipeline.cache.topk.encode_topk`` (what the cache job stores) and
  rebuilt by ``TeacherTargets.log_probs`` (what the training loss uses); T = 1 and T = 4.

The reference is the best a top-k entry can hold, in float64 from the same float32 logits: the
exact probabilities of the top-k classes and the exact leftover (summed in log space) spread
uniformly. Reported per setting: the leftover's relative error (median, max over views), the
share of views whose rebuilt leftover is 0 (clamped), and KL(reference || rebuilt) in nats (max;
generalised KL, ``pipeline.cache.topk.kl_divergence``, since format 1's rebuilt distribution does
not always sum to 1). KL measures the encoding only: both formats spread the leftover uniformly.

    python benchmarks/bench_store_precision.py        # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

from pipeline.cache.topk import LOG_FLOOR, encode_topk, kl_divergence
from pipeline.train.losses import TeacherTargets

RESULTS = os.path.join(os.path.dirname(__file__), "results")
CLASSES, TOPS, KS = (1000, 21843), (8.0, 16.0, 24.0, 32.0), (5, 10, 20)
TARGET_LEFTOVER, TARGET_KL = 0.01, 1e-4
FLOOR_MASS = math.exp(LOG_FLOOR)  # what a rebuild gives a class whose mass it clamped to 0


def synthetic_logits(views: int, classes: int, top: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(views, classes, generator=g) * 2
    rows, columns = torch.arange(views), torch.randint(0, classes, (views,), generator=g)
    logits[rows, columns] = top + torch.rand(views, generator=g) - 0.5
    return logits


def reference(logits: torch.Tensor, index: torch.Tensor, t: float) -> torch.Tensor:
    """float64 log-probabilities: exact top-k probabilities, exact leftover spread uniformly."""
    log_p = torch.log_softmax(logits.double() / t, dim=-1)
    rest = torch.logsumexp(log_p.scatter(1, index, -math.inf), dim=-1, keepdim=True)
    rest = rest - math.log(logits.shape[-1] - index.shape[-1])
    return rest.expand_as(log_p).clone().scatter_(1, index, log_p.gather(1, index))


def format1_log_probs(logits: torch.Tensor, k: int, t: float) -> torch.Tensor:
    """Format 1, stored and rebuilt as before format 2: fp16 raw top-k logits, fp32 logsumexp, float32 rebuild."""
    values, index = logits.topk(k, dim=-1)
    stored_logits, stored_lse = values.half(), torch.logsumexp(logits / t, dim=-1)
    topk = (stored_logits.float() / t - stored_lse[:, None]).clamp_max(0.0)
    covered = torch.logsumexp(topk, dim=-1).clamp_max(0.0)
    log1mexp = torch.where(covered > -math.log(2.0), torch.log(-torch.expm1(covered)),
                           torch.log1p(-torch.exp(covered)))
    leftover = (log1mexp - math.log(logits.shape[-1] - k)).clamp_min(LOG_FLOOR)
    return leftover[:, None].expand_as(logits).clone().scatter_(1, index, topk)


def format2_log_probs(logits: torch.Tensor, k: int, temperatures: tuple[float, ...], t: float) -> torch.Tensor:
    """Format 2 through the project's own code: the cache's encoder, then the loss's rebuild."""
    encoded = encode_topk(logits, k, temperatures)
    targets = TeacherTargets(topk_logprob=encoded.logprob.float(), topk_index=encoded.index,
                             log_leftover=encoded.log_leftover, temperatures=temperatures,
                             num_classes=logits.shape[-1])
    return targets.log_probs(t)


def leftover(log_probs: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_probs.double().scatter(1, index, -math.inf), dim=-1).exp()


def measure(logits: torch.Tensor, k: int, t: float, rebuilt: torch.Tensor) -> dict:
    index = logits.topk(k, dim=-1).indices
    true = reference(logits, index, t)
    true_left, got_left = leftover(true, index), leftover(rebuilt, index)
    error = (got_left / true_left - 1).abs()
    clamped = got_left <= 1.001 * FLOOR_MASS * (logits.shape[-1] - k)
    return {"leftover_rel_error": error, "clamped": clamped, "kl": kl_divergence(true, rebuilt),
            "true_leftover": true_left}


def summarize(parts: list[dict]) -> dict:
    merged = {name: torch.cat([p[name] for p in parts]) for name in parts[0]}
    resolved = merged["true_leftover"] > torch.finfo(torch.float32).tiny
    error = merged["leftover_rel_error"][resolved]
    return {"views": int(len(merged["kl"])), "true_leftover_median": float(merged["true_leftover"].median()),
            "leftover_rel_error_median": float(error.median()), "leftover_rel_error_max": float(error.max()),
            "clamped_fraction": float(merged["clamped"].float().mean()), "kl_max": float(merged["kl"].max()),
            "fp32_resolves_fraction": float(resolved.double().mean())}


def run_setting(classes: int, top: float, k: int, views: int, batch: int, seed: int) -> dict:
    temperatures = (1.0, 4.0)
    parts: dict[str, list[dict]] = {"format1_T1": [], "format2_T1": [], "format2_T4": []}
    for start in range(0, views, batch):
        logits = synthetic_logits(min(batch, views - start), classes, top, seed + start)
        parts["format1_T1"].append(measure(logits, k, 1.0, format1_log_probs(logits, k, 1.0)))
        for t in temperatures:
            parts[f"format2_T{t:g}"].append(measure(logits, k, t, format2_log_probs(logits, k, temperatures, t)))
    return {name: summarize(p) for name, p in parts.items()}


def check(result: dict) -> bool:
    """Format 2 meets the targets: leftover within 1% where fp32 resolves it, KL < 1e-4 nats."""
    return all(result[name]["leftover_rel_error_max"] < TARGET_LEFTOVER and result[name]["kl_max"] < TARGET_KL
               for name in ("format2_T1", "format2_T4"))


def print_table(rows: list[dict]) -> None:
    print(f"{'C':>6} {'k':>3} {'top':>4} | {'true L':>8} | format 1, T=1: {'L err med':>9} {'max':>8} "
          f"{'L=0':>5} {'KL max':>8} | format 2, T=1: {'L err max':>9} {'KL max':>8} | T=4: {'L err max':>9} "
          f"{'KL max':>8}")
    for r in rows:
        f1, f2, f4 = r["format1_T1"], r["format2_T1"], r["format2_T4"]
        print(f"{r['classes']:>6} {r['k']:>3} {r['top']:>4g} | {f2['true_leftover_median']:>8.1e} | "
              f"{'':>14} {f1['leftover_rel_error_median']:>9.2e} {f1['leftover_rel_error_max']:>8.2e} "
              f"{f1['clamped_fraction']:>5.0%} {f1['kl_max']:>8.1e} | {'':>14} {f2['leftover_rel_error_max']:>9.1e} "
              f"{f2['kl_max']:>8.1e} | {'':>4} {f4['leftover_rel_error_max']:>9.1e} {f4['kl_max']:>8.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--views", type=int, default=1000, help="views per setting")
    parser.add_argument("--batch", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(RESULTS, "store-precision.json"))
    args = parser.parse_args()

    start = time.perf_counter()
    rows = []
    for classes in CLASSES:
        for k in KS:
            for top in TOPS:
                result = run_setting(classes, top, k, args.views, args.batch, args.seed)
                rows.append({"classes": classes, "k": k, "top": top, **result, "format2_meets_targets": check(result)})
    print_table(rows)
    passed = all(r["format2_meets_targets"] for r in rows)
    print(f"format 2 meets the targets (leftover < {TARGET_LEFTOVER:.0%} relative, KL < {TARGET_KL:g} nats) "
          f"in every setting: {passed}; {time.perf_counter() - start:.0f} s")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"views_per_setting": args.views, "seed": args.seed, "logits": "N(0, 2), one class at top +- 0.5",
                   "targets": {"leftover_rel_error": TARGET_LEFTOVER, "kl_nats": TARGET_KL},
                   "format2_meets_targets": passed, "torch": torch.__version__, "settings": rows}, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
