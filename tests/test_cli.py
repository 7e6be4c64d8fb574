"""The `pipeline` command line."""
import json

from click.testing import CliRunner

from pipeline.cli import main


def test_help_lists_commands():
    result = CliRunner().invoke(main, ["--help"])
    assert result.exit_code == 0
    assert "models" in result.output


def test_models_lists_every_variant_smallest_first():
    result = CliRunner().invoke(main, ["models", "--img-size", "64", "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.output)
    assert [r["model"] for r in rows] == ["regla_t", "regla_s", "regla_m", "regla_l"]
    assert all(r["img_size"] == 64 and r["macs_g"] > 0 for r in rows)
    params = [r["params_m"] for r in rows]
    assert params == sorted(params) and 2.5 < params[0] < 3.5


def test_models_rejects_bad_size():
    result = CliRunner().invoke(main, ["models", "--img-size", "0"])
    assert result.exit_code != 0
    assert "img-size" in result.output
