"""Running a ``pipeline`` command on a Ray cluster as a Ray job, through the Jobs API, and following it.

The Jobs API is the HTTP server of the head's dashboard (``http://HEAD:8265``). A submitted job
carries the project's own packages as ``py_modules``, so the nodes need only the same Python
environment (torch, timm, ray, ...), not this project installed; its entrypoint runs the same
command on the head with ``--address auto``, where it is the Ray driver. Stopping to follow a
job (Ctrl-C) leaves it running; ``pipeline job`` follows, inspects or stops it later.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

# The project's packages that travel with each job; never a venv, data or run directories.
JOB_PACKAGES = ("pipeline", "regla", "teachers", "jobs")
CONNECT_TIMEOUT_S = 8.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")
EXIT_INTERRUPTED = 130  # the shell's code for a command ended by SIGINT


class SubmitError(RuntimeError):
    """A job could not be submitted or followed: the address, the connection, an unknown job id."""


def jobs_api_url(address: str | None) -> str | None:
    """The Jobs API URL to submit to, or None when this process is to be the Ray driver itself.

    ``http(s)://...`` (as ``--address``, or in ``RAY_ADDRESS`` when no ``--address`` is given)
    selects submission; ``auto``, ``HOST:PORT`` (a GCS address) and no address keep the driver
    here. ``ray://`` (Ray Client) is refused: the Jobs API replaces it for this project.
    """
    if address is None:
        from_env = os.environ.get("RAY_ADDRESS", "")
        address = from_env if from_env.startswith(("http://", "https://")) else None
    if address is None:
        return None
    if address.startswith("ray://"):
        raise SubmitError(f"--address {address}: Ray Client (ray://) is not supported; submit through the Jobs API "
                          "with --address http://HEAD:8265, or run on the head node with --address auto")
    if address.startswith(("http://", "https://")):
        return address.rstrip("/")
    return None


def connect(url: str) -> Any:
    """A JobSubmissionClient for ``url``, after a bounded check that a Jobs API answers there."""
    try:
        # The client's own check has no timeout: an address that drops packets would hang it.
        with urllib.request.urlopen(f"{url}/api/version", timeout=CONNECT_TIMEOUT_S) as response:
            response.read()
    except (OSError, ValueError) as e:
        if isinstance(e, urllib.error.HTTPError):
            reason = f"HTTP {e.code} {e.reason}"
        else:
            reason = getattr(e, "reason", None) or e
            reason = f"no answer within {CONNECT_TIMEOUT_S:g} s" if isinstance(reason, TimeoutError) else reason
        raise SubmitError(f"--address {url}: no Ray Jobs API there ({reason}); a Ray dashboard with its Jobs API "
                          "(`ray start --head --dashboard-host ...`) must listen at that address") from None
    import logging

    from ray.job_submission import JobSubmissionClient

    # Ray's client logs each package upload and the log stream's close at INFO: not this command's output.
    for name in ("ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk",
                 "ray._private.runtime_env.packaging"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return JobSubmissionClient(url)
    except Exception as e:
        raise SubmitError(f"--address {url}: {_first_line(e)}") from None


def runtime_env() -> dict[str, Any]:
    """The job's runtime env: the project's packages, taken from where this process imports them."""
    import importlib

    modules = [str(Path(importlib.import_module(name).__file__).parent) for name in JOB_PACKAGES]
    # Unbuffered output keeps the job's lines in order (stdout and stderr share one log) and live.
    return {"py_modules": modules, "excludes": ["__pycache__", "*.pyc"],
            "env_vars": {"PYTHONUNBUFFERED": "1"}}


def entrypoint(args: list[str]) -> str:
    """The job's shell command: the same ``pipeline`` command, as the driver on the head node."""
    return shlex.join(["python", "-m", "pipeline.cli", *args])


def submit(url: str, args: list[str], wait: bool = True) -> int:
    """Submit ``pipeline ARGS`` as a job at ``url``; follow it unless ``wait`` is False. Returns the exit code."""
    client = connect(url)
    job_id = None
    try:
        job_id = client.submit_job(entrypoint=entrypoint(args), runtime_env=runtime_env(),
                                   metadata={"command": f"pipeline {args[0]}"})
        if not wait:
            click.echo(f"Submitted job {job_id} to {url}.")
            _echo_follow_and_stop(job_id, url)
            return 0
        click.echo(f"Submitted job {job_id} to {url}; following its logs (Ctrl-C stops following, not the job).",
                   err=True)
        return follow(client, job_id, url)
    except KeyboardInterrupt:
        return interrupted(job_id, url)


def follow(client: Any, job_id: str, url: str) -> int:
    """Stream a job's logs until it ends; 0 if it SUCCEEDED, else 1 after its one-line error."""
    try:
        asyncio.run(_print_logs(client, job_id))
        status = _wait_terminal(client, job_id)
    except KeyboardInterrupt:
        return interrupted(job_id, url)
    if status == "SUCCEEDED":
        return 0
    click.echo(failure_line(client, job_id, status), err=True)
    return 1


async def _print_logs(client: Any, job_id: str) -> None:
    async for chunk in client.tail_job_logs(job_id):
        sys.stdout.write(chunk)
        sys.stdout.flush()


def _wait_terminal(client: Any, job_id: str, timeout: float = 30.0) -> str:
    """The job's final status (the log stream can close a moment before the status is recorded)."""
    deadline = time.monotonic() + timeout
    while True:
        status = str(client.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def failure_line(client: Any, job_id: str, status: str) -> str:
    """The job's own ``Error: ...`` line from its logs, else one line from Ray's status message."""
    errors = [line for line in client.get_job_logs(job_id).splitlines() if line.startswith("Error:")]
    if errors:
        return errors[-1]
    message = client.get_job_info(job_id).message or ""
    return f"Error: job {job_id} {status}" + (f": {_first_line(message)}" if message.strip() else "")


def interrupted(job_id: str | None, url: str) -> int:
    if job_id is None:
        click.echo("Interrupted before the job was submitted.", err=True)
        return EXIT_INTERRUPTED
    click.echo(f"\nStopped following job {job_id}; it keeps running on the cluster.", err=True)
    _echo_follow_and_stop(job_id, url, err=True)
    return EXIT_INTERRUPTED


def _echo_follow_and_stop(job_id: str, url: str, err: bool = False) -> None:
    click.echo(f"Follow it:  pipeline job logs {job_id} --address {url} --follow", err=err)
    click.echo(f"Stop it:    pipeline job stop {job_id} --address {url}", err=err)


# ---------------------------------------------------------------------------- `pipeline job ...`


def _known(client: Any, job_id: str, url: str) -> Any:
    """The job's info; a SubmitError naming the job if the cluster does not know it."""
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:
        if "404" in str(e) or "does not exist" in str(e):
            raise SubmitError(f"no job {job_id} at {url} (see `pipeline job list --address {url}`)") from None
        raise SubmitError(f"job {job_id} at {url}: {_first_line(e)}") from None


def list_lines(url: str) -> list[str]:
    """One line per submitted job, oldest first: id, status, start time, command."""
    jobs = [j for j in connect(url).list_jobs() if j.submission_id]
    jobs.sort(key=lambda j: j.start_time or 0)
    lines = []
    for job in jobs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        lines.append(f"{job.submission_id}  {job.status.value:<9}  {started}  {job.entrypoint}")
    return lines or [f"no jobs at {url}"]


def status(url: str, job_id: str) -> int:
    """Print a job's status (and its error line if it failed); exit code 1 for FAILED or STOPPED."""
    client = connect(url)
    state = str(_known(client, job_id, url).status.value)
    click.echo(f"{job_id}: {state}")
    if state in ("FAILED", "STOPPED"):
        click.echo(failure_line(client, job_id, state), err=True)
        return 1
    return 0


def logs(url: str, job_id: str, follow_logs: bool) -> int:
    """Print a job's logs; with ``follow_logs``, until it ends, with its exit code."""
    client = connect(url)
    _known(client, job_id, url)
    if follow_logs:
        return follow(client, job_id, url)
    sys.stdout.write(client.get_job_logs(job_id))
    return 0


def stop(url: str, job_id: str) -> int:
    client = connect(url)
    _known(client, job_id, url)
    if client.stop_job(job_id):
        click.echo(f"Stopping job {job_id}.")
    else:
        click.echo(f"Job {job_id} had already ended: {client.get_job_status(job_id).value}.")
    return 0


def _first_line(error: Any) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
