"""The command line a submitted job runs: the flags given here, with local paths made absolute.

The job runs on the head node, in a directory of Ray's: a relative path would name another
file there. Local paths become absolute (the cluster is expected to share the filesystem at
the same paths); fsspec URLs (``s3://...``) pass through unchanged. Only flags given on the
command line are passed, so the job applies the same defaults the command would here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from pipeline.data.shards import shard_spec_entries
from pipeline.data.storage import absolute

# How a flag's value holds local paths: one path, a shard list (comma-separated, brace patterns),
# or a teacher spec (NAME@PATH,options).
PATH, SHARDS, TEACHER = "path", "shards", "teacher"
# Flags the job sets itself: it is the driver on the head, and its log is not a terminal.
JOB_FLAGS = ("address", "no_wait", "progress")


def absolute_shards(spec: str) -> str:
    return ",".join(absolute(entry) for entry in shard_spec_entries(spec))


def absolute_teacher(spec: str) -> str:
    """``NAME@weights,options`` with its weights path made absolute (the parser splits options on commas)."""
    head, comma, options = spec.partition(",")
    name, at, weights = head.partition("@")
    return f"{name}@{absolute(weights.strip())}{comma}{options}" if at and weights.strip() else spec


_CONVERT = {PATH: absolute, SHARDS: absolute_shards, TEACHER: absolute_teacher}


def job_arguments(ctx: click.Context, locations: Mapping[str, str] | None = None,
                  resolved: Mapping[str, Any] | None = None) -> list[str]:
    """``pipeline COMMAND ...`` as the job runs it: the flags given on this command line.

    ``locations`` maps parameter names to how their values hold paths (PATH, SHARDS, TEACHER).
    ``resolved`` adds values the command resolved here (say from a config file whose relative
    paths mean this directory), as flags, for parameters not given on the command line.
    """
    locations = locations or {}
    args = [ctx.info_name]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in JOB_FLAGS:
            continue
        given = ctx.get_parameter_source(param.name) is click.core.ParameterSource.COMMANDLINE
        value = ctx.params[param.name] if given else (resolved or {}).get(param.name)
        if value is None or value == () or value == []:
            continue
        convert = _CONVERT.get(locations.get(param.name, ""), str)
        args += _flag(param, value, convert)
    args += ["--address", "auto"]
    if any(p.name == "progress" for p in ctx.command.params):
        args.append("--no-progress")
    return args


def _flag(option: click.Option, value: Any, convert) -> list[str]:
    name = next(o for o in option.opts if o.startswith("--"))
    if option.is_flag:
        if value:
            return [name]
        return [option.secondary_opts[0]] if option.secondary_opts else []
    values = value if isinstance(value, (list, tuple)) else [value]
    return [part for v in values for part in (name, convert(str(v)))]
