"""Command-line interface: the ``pipeline`` console script."""

from __future__ import annotations

import json

import click


@click.group(name="pipeline", context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Distil several teachers into small ReGLA students.

    Each teacher runs once over a sharded WebDataset image dataset and its
    per-view outputs (top-k logits, pooled features) are cached in a Zarr
    store; ReGLA students are then trained from that cache as many times as
    needed. Both stages run on Ray.
    """


def _count(name: str, img_size: int) -> tuple[float, float]:
    """Return (params in millions, MACs in G) for one model at a square resolution."""
    import timm
    import torch

    from pipeline.model_stats import count_macs, count_params

    model = timm.create_model(name, pretrained=False).eval()
    return count_params(model) / 1e6, count_macs(model, torch.randn(1, 3, img_size, img_size)) / 1e9


@main.command()
@click.option("--img-size", default=224, show_default=True, type=click.IntRange(min=1),
              help="Square input resolution used to count MACs.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def models(img_size: int, as_json: bool) -> None:
    """List the registered ReGLA variants with parameters and MACs, smallest first."""
    import regla  # noqa: F401  (registers the regla_* models with timm)
    import timm

    rows = []
    for name in timm.list_models("regla_*"):
        params_m, macs_g = _count(name, img_size)
        rows.append({"model": name, "params_m": round(params_m, 3),
                     "macs_g": round(macs_g, 3), "img_size": img_size})
    rows.sort(key=lambda r: r["params_m"])  # smallest variant first, not alphabetical

    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    header = ("model", "params (M)", f"MACs @{img_size} (G)")
    table = [header] + [(r["model"], f"{r['params_m']:.2f}", f"{r['macs_g']:.3f}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join([row[0].ljust(widths[0])] +
                             [cell.rjust(w) for cell, w in zip(row[1:], widths[1:])]))


if __name__ == "__main__":
    main()
