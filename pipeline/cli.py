"""Command-line interface: the ``pipeline`` console script."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys
from collections.abc import Callable, Iterator

import click


@click.group(name="pipeline", context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Distil several teachers into small ReGLA students.

    Each teacher runs once over a sharded WebDataset image dataset and its
    per-view outputs (top-k log-probabilities, pooled features) are cached in a Zarr
    store; ReGLA students are then trained from that cache as many times as
    needed. Both stages run on Ray.
    """


# The project's input errors, by module: looked up only in modules already imported, so that a
# light command (make-shards) does not import torch and zarr just to name their errors.
_USER_ERRORS = (("pipeline.data.shards", "DatasetError"), ("pipeline.data.shards", "ImageDecodeError"),
                ("pipeline.cache.compat", "StoreError"), ("teachers.spec", "TeacherSpecError"),
                ("jobs.cache_plan", "ClusterResourceError"), ("jobs.submit", "SubmitError"))


@contextlib.contextmanager
def _clean_errors() -> Iterator[None]:
    """Turn the project's input errors (and OS errors such as a full disk) into one-line CLI errors."""
    try:
        yield
    except OSError as e:
        raise click.ClickException(f"{e.strerror or e}: {e.filename}" if e.filename else str(e)) from e
    except Exception as e:
        user_errors = tuple(getattr(sys.modules[module], name) for module, name in _USER_ERRORS
                            if module in sys.modules)
        if isinstance(e, user_errors):
            raise click.ClickException(str(e)) from e
        raise


def _refuse_ray_client(ctx: click.Context, param: click.Parameter, address: str | None) -> str | None:
    """Refuse ray:// before anything else runs (the rest of the address handling is in jobs.submit)."""
    if address and address.startswith("ray://"):
        from jobs.submit import SubmitError, jobs_api_url

        try:
            jobs_api_url(address)
        except SubmitError as e:
            raise click.ClickException(str(e)) from None
    return address


def _cluster_options(here: str) -> Callable[[click.Command], click.Command]:
    """``--address`` and ``--no-wait``: run here (as ``here`` says), or submit the command as a Ray job."""
    def decorate(command):
        command = click.option(
            "--no-wait", is_flag=True,
            help="With an http:// address: print the job id and how to follow or stop it, and return at once."
        )(command)
        return click.option(
            "--address", metavar="ADDR", callback=_refuse_ray_client,
            help="http://HEAD:8265 (or RAY_ADDRESS holding an http(s) URL): submit this command to the cluster's "
                 "Jobs API as a Ray job, which runs it on the head node, and follow its logs (Ctrl-C stops "
                 "following, not the job). Local paths are made absolute: the nodes must see them at the same "
                 "paths; URLs (s3://...) pass as given. ray:// is not supported. "
                 f"auto or HOST:PORT (a GCS address): {here}"
        )(command)
    return decorate


def _submit(address: str | None, no_wait: bool, locations: dict[str, str] | None = None,
            resolved: dict | None = None, check: Callable[[], object] | None = None) -> None:
    """With a Jobs API address: run ``check`` (the command's checks that need no cluster), then submit the
    command as a Ray job and exit with its outcome. Without one, return and let the command run here.
    ``locations`` says which parameters hold local paths: "path", "shards" (a shard list) or "teacher" (a spec)."""
    from jobs.submit import jobs_api_url

    url = jobs_api_url(address)
    if url is None:
        return
    from jobs.job_command import job_arguments
    from jobs.submit import submit

    if check is not None:
        check()
    args = job_arguments(click.get_current_context(), locations, resolved)
    raise SystemExit(submit(url, args, wait=not no_wait))


def _driver_address(address: str | None) -> str | None:
    """The address for this process as the Ray driver: None (embedded Ray) when it is a Jobs API URL."""
    from jobs.submit import jobs_api_url

    return None if jobs_api_url(address) else address


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


@main.command("make-shards")
@click.option("--from-folder", "folder", type=click.Path(file_okay=False),
              help="ImageNet-layout folder: one subfolder of images per class.")
@click.option("--sample", type=click.Choice(["mnist"]),
              help="Build the bundled sample instead: 5000 real MNIST digits, split into train and val.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output directory for the shards and their manifests: a local path or an s3:// / gs:// URL "
                   "(built in a local temp folder, then uploaded, the manifests last).")
@click.option("--samples-per-shard", default=500, show_default=True, type=click.IntRange(min=1),
              help="Samples per tar shard; the last shard of a split holds fewer, and so does a shard with "
                   "skipped files.")
@click.option("--split-name", default="train", show_default=True,
              help="With --from-folder: the split name, giving OUT/SPLIT-000000.tar... and OUT/SPLIT.json.")
@click.option("--img-size", default=32, show_default=True, type=click.IntRange(min=1),
              help="With --sample: side of the square digit images, in pixels.")
@click.option("--val-fraction", default=0.2, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True),
              help="With --sample: fraction of each digit class held out as the val split.")
@click.option("--seed", default=0, show_default=True, type=int,
              help="Seed of the sample shuffle (and of the --sample split).")
@click.option("--no-shuffle", is_flag=True,
              help="With --from-folder: keep the sorted class/file order instead of mixing classes across shards.")
@click.option("--num-workers", type=click.IntRange(min=1),
              help="Processes building shards, one shard at a time each; the output is the same bytes "
                   "whatever the number.  [default: one per CPU]")
@_cluster_options("run here (this command uses no Ray).")
@click.pass_context
def make_shards(ctx: click.Context, folder: str | None, sample: str | None, out: str, samples_per_shard: int,
                split_name: str, img_size: int, val_fraction: float, seed: int, no_shuffle: bool,
                num_workers: int | None, address: str | None, no_wait: bool) -> None:
    """Pack images into WebDataset tar shards (jpg + cls members) with a JSON manifest per split.

    With --from-folder, the image files (sorted by class and name, then shuffled with --seed)
    are cut into consecutive groups of --samples-per-shard before anything is decoded: shard i
    holds group i. JPEG files are stored as they are, other formats re-encoded as JPEG; a file
    that does not decode is skipped with a warning and leaves its shard one shorter (a group
    with no decodable file gives no shard). Workers build whole shards, so the output does
    not depend on --num-workers.

    \b
    Examples:
    pipeline make-shards --from-folder /data/imagenet/train --out shards/ --samples-per-shard 1250
    pipeline make-shards --sample mnist --out shards/mnist
    """
    if (folder is None) == (sample is None):
        raise click.UsageError("give exactly one of --from-folder DIR or --sample mnist")
    other_mode = ("split_name", "no_shuffle") if sample else ("img_size", "val_fraction")
    misplaced = [f"--{name.replace('_', '-')}" for name in other_mode
                 if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE]
    if misplaced:
        raise click.UsageError(f"{', '.join(misplaced)} cannot be used with "
                               f"{'--sample' if sample else '--from-folder'}")
    with _clean_errors():
        _submit(address, no_wait, {"folder": "path", "out": "path"})

    import warnings

    from pipeline.data.make_shards import make_mnist_sample, make_shards_from_folder
    from pipeline.data.shards import read_manifest

    # Warnings (skipped files) are shown as plain lines rather than with a source location.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _clean_errors():
            if folder is not None:
                manifests = [make_shards_from_folder(folder, out, samples_per_shard, split=split_name,
                                                     shuffle=not no_shuffle, seed=seed, num_workers=num_workers)]
            else:
                manifests = make_mnist_sample(out, img_size=img_size, samples_per_shard=samples_per_shard,
                                              val_fraction=val_fraction, seed=seed, num_workers=num_workers)
    for warning in caught:
        click.echo(f"Warning: {warning.message}", err=True)
    for path in manifests:
        manifest = read_manifest(path)
        click.echo(f"{manifest['split']}: {manifest['num_samples']} samples in {len(manifest['shards'])} "
                   f"shards, manifest {path}")


def _float_list(text: str, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated numbers, got {text!r}", param_hint=flag) from None


def _float_pair(text: str, flag: str) -> tuple[float, float]:
    values = _float_list(text, flag)
    if len(values) != 2:
        raise click.BadParameter(f"expected two comma-separated numbers (min,max), got {text!r}", param_hint=flag)
    return values


def _cache_config(store_path: str, options: dict):
    """The run's CacheConfig: flags given on the command line, else the existing store's, else defaults."""
    from pipeline.cache.compat import StoreError
    from pipeline.cache.store import CacheConfig, CacheStore
    from pipeline.data.views import ViewPolicy

    defaults = {"views": 8, "topk": 10, "temperatures": "1", "feature_views": None, "center_view": False,
                "crop_scale": "0.08,1", "crop_ratio": "0.75,1.3333333", "flip_prob": 0.5, "seed": 0}
    try:
        existing = CacheStore.open(store_path).config
    except StoreError:
        existing = None
    if existing is not None:
        views = existing.views
        defaults.update(views=views.num_views, topk=existing.topk,
                        temperatures=",".join(map(str, existing.temperatures)),
                        feature_views=existing.num_feature_views, center_view=views.center_view,
                        crop_scale=",".join(map(str, views.scale)), crop_ratio=",".join(map(str, views.ratio)),
                        flip_prob=views.flip_prob, seed=views.seed)
    value = {name: defaults[name] if options[name] is None else options[name] for name in defaults}
    # The centre crop fraction has no flag: an existing store's value is kept as it is.
    center_crop_fraction = (existing.views if existing is not None else ViewPolicy).center_crop_fraction
    policy = ViewPolicy(num_views=value["views"], scale=_float_pair(value["crop_scale"], "--crop-scale"),
                        ratio=_float_pair(value["crop_ratio"], "--crop-ratio"), flip_prob=value["flip_prob"],
                        center_view=value["center_view"], center_crop_fraction=center_crop_fraction,
                        seed=value["seed"])
    return CacheConfig(views=policy, topk=value["topk"],
                       temperatures=_float_list(value["temperatures"], "--temperatures"),
                       feature_views=value["feature_views"])


@main.command("cache-teachers")
@click.option("--shards", "shards", required=True, multiple=True, metavar="URLS",
              help="Shards: a brace pattern (data/train-{000000..000009}.tar), a directory, a manifest "
                   "(.json from make-shards), or paths/fsspec URLs; repeat or comma-separate for a list.")
@click.option("--store", "store_path", required=True, metavar="PATH",
              help="Zarr store to create, resume or extend (local path or fsspec URL).")
@click.option("--teacher", "teacher_specs", multiple=True, metavar="SPEC",
              help="Teacher: NAME, NAME.pretrained_tag or NAME@/path/weights.safetensors (or an s3:// / gs:// URL), "
                   "with optional "
                   "',key=value' options (img_size, batch_size, dtype=fp32|bf16|fp16, features=false, "
                   "num_classes, id). Repeat for several teachers.")
@click.option("--teachers-file", type=click.Path(exists=True, dir_okay=False),
              help="YAML file with a list of teacher specs (strings or mappings).")
@click.option("--views", type=click.IntRange(min=1), help="Augmented views per sample.  [default: 8]")
@click.option("--topk", type=click.IntRange(min=1), help="Logits kept per view and teacher.  [default: 10]")
@click.option("--temperatures", metavar="T1,T2",
              help="Temperatures at which the leftover mass is stored (KD temperatures).  [default: 1]")
@click.option("--feature-views", type=click.IntRange(min=0),
              help="Cache pooled features for the first V_f views only.  [default: all views]")
@click.option("--center-view/--no-center-view", default=None,
              help="Make view 0 the centre crop (no flip).  [default: no]")
@click.option("--crop-scale", metavar="MIN,MAX", help="RandomResizedCrop area range.  [default: 0.08,1]")
@click.option("--crop-ratio", metavar="MIN,MAX", help="RandomResizedCrop aspect ratio range.  [default: 3/4,4/3]")
@click.option("--flip-prob", type=click.FloatRange(0, 1), help="Horizontal flip probability.  [default: 0.5]")
@click.option("--seed", type=int, help="Seed of the views (and of --random-init weights).  [default: 0]")
@click.option("--random-init", is_flag=True,
              help="Allow teachers without weights (random, seeded): for plumbing tests only.")
@click.option("--num-workers", type=click.IntRange(min=1),
              help="Ray workers.  [default: one per GPU, else one per 8 CPUs]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where teachers run; auto uses GPUs when the Ray cluster has them.")
@click.option("--decode-workers", type=click.IntRange(min=1),
              help="Threads per worker that decode images and render views while the teachers run.  "
                   "[default: half the worker's CPUs; on a GPU worker, its CPUs minus one]")
@click.option("--max-retries", type=click.IntRange(min=0), default=2, show_default=True,
              help="Retries of a failed shard before it is reported as failed.")
@click.option("--shard-timeout", type=click.FloatRange(min=1), default=3600, show_default=True, metavar="SECONDS",
              help="A shard still in flight after this long has its worker killed and replaced, and is retried "
                   "(a stuck read, a hung device). The default fits a 1250-image shard with 8 views on a CPU "
                   "worker; lower it on GPUs.")
@click.option("--worker-start-timeout", type=click.FloatRange(min=1), default=600, show_default=True,
              metavar="SECONDS",
              help="A worker not scheduled and holding its teachers after this long is killed and reported.")
@click.option("--dry-run", is_flag=True,
              help="Write nothing: read the shard index, time one batch of each teacher on this machine, and "
                   "print the store's size, the images and views, and the projected hours per worker.")
@_cluster_options("this process is the Ray driver of that running cluster (the project must be installed "
                  "on every node).  [default: an embedded local Ray]")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def cache_teachers(shards: tuple[str, ...], store_path: str, teacher_specs: tuple[str, ...],
                   teachers_file: str | None, random_init: bool, num_workers: int | None, device: str,
                   decode_workers: int | None, max_retries: int, shard_timeout: float, worker_start_timeout: float,
                   dry_run: bool, address: str | None, no_wait: bool, progress: bool, **view_options) -> None:
    """Run teachers once over the shards and cache their per-view outputs in a Zarr store.

    Each sample gets V augmented views (crop box + flip, deterministic from the seed
    and the sample key); every teacher's top-k log-probabilities, the exact mass of
    the other classes and pooled features on each view are stored. Rerunning the
    same command resumes (completed shards are skipped); adding a --teacher to an
    existing store computes only that teacher, on the stored views. View settings
    not given are taken from an existing store.
    """
    from jobs.cache_teachers import CacheJob, check_inputs, run_cache_job
    from pipeline.data.storage import absolute
    from teachers import load_teachers_file, parse_teacher_spec

    with _clean_errors():
        specs = [parse_teacher_spec(s) for s in teacher_specs]
        if teachers_file:
            specs += load_teachers_file(teachers_file)
        # Workers may run in another directory (or on another node): give them absolute paths.
        specs = [dataclasses.replace(s, weights=absolute(s.weights)) if s.weights else s for s in specs]
        job = CacheJob(shards=list(shards), store=store_path, teachers=specs,
                       config=_cache_config(store_path, view_options), random_init=random_init,
                       num_workers=num_workers, address=_driver_address(address), max_retries=max_retries,
                       device=device, decode_workers=decode_workers, shard_timeout=shard_timeout,
                       worker_start_timeout=worker_start_timeout)
        _submit(address, no_wait, {"shards": "shards", "store_path": "path", "teachers_file": "path",
                                   "teacher_specs": "teacher"}, check=lambda: check_inputs(job))
        if dry_run:
            from jobs.cache_dry_run import estimate_cache_job

            for line in estimate_cache_job(job).lines():
                click.echo(line)
            return
        summary = run_cache_job(job, progress=progress)
    for line in summary.lines():
        click.echo(line)
    if not summary.ok:
        raise SystemExit(1)

def _train_options(config_file: str | None, flags: dict) -> dict:
    """Options from --config, overridden by every flag given on the command line."""
    from pipeline.data.storage import absolute
    from pipeline.train.train_config import load_yaml_options

    options = load_yaml_options(config_file) if config_file else {}
    for name, value in flags.items():
        if value is None or value == ():
            continue
        options[name] = list(value) if isinstance(value, tuple) else value
    for name in ("shards", "val_shards"):
        if isinstance(options.get(name), str):
            options[name] = [options[name]]
        options[name] = [absolute(s) for s in options.get(name, [])]
    for name in ("store", "out"):
        if options.get(name):
            options[name] = absolute(options[name])
    return options


@main.command("train-student")
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False), metavar="FILE.yaml",
              help="YAML file with any of these options (names with - or _); flags override it.")
@click.option("--shards", multiple=True, metavar="URLS",
              help="Training shards, in any form cache-teachers takes; must be the store's shards.")
@click.option("--store", metavar="PATH", help="Teacher cache built by cache-teachers on the same shards.")
@click.option("--model", help="Student: any timm model name.  [default: regla_t]")
@click.option("--out", metavar="RUN_DIR",
              help="Run directory (a local path or an s3:// / gs:// URL): run.json, checkpoints/, metrics.jsonl, "
                   "curves.png, model.safetensors.")
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs.  [default: 10]")
@click.option("--batch-size", type=click.IntRange(min=1), help="Batch size per worker.  [default: 128]")
@click.option("--img-size", type=click.IntRange(min=1),
              help="Student resolution; cached views are replayed at it.  [default: the model's]")
@click.option("--val-shards", multiple=True, metavar="URLS", help="Validation shards (evaluated every epoch).")
@click.option("--num-classes", type=click.IntRange(min=1),
              help="Classes of the student head.  [default: from the manifest, else the teachers]")
@click.option("--num-workers", type=click.IntRange(min=1), help="Ray Train (DDP) workers.  [default: 1]")
@click.option("--cpus-per-worker", type=click.FloatRange(min=0.1),
              help="CPUs reserved per worker (and torch threads); a worker's CPUs must be on one node.  "
                   "[default: the most whole CPUs the nodes can give every worker at once]")
@click.option("--max-failures", type=click.IntRange(min=0),
              help="Lost workers or nodes Ray Train recovers from, each time restarting the workers from the "
                   "last checkpoint, before the run fails.  [default: 3]")
@click.option("--start-timeout", type=click.FloatRange(min=1),
              help="Seconds to wait for the workers' CPUs/GPUs to be free before that start counts as a "
                   "failure; a request no node can ever hold fails at once.  [default: 300]")
@click.option("--loader-workers", type=click.IntRange(min=0),
              help="Spawned data-loading processes per worker; 0 loads in the training process.  [default: 1]")
@_cluster_options("this process is the Ray driver of that running cluster (the project must be installed "
                  "on every node).  [default: an embedded local Ray]")
@click.option("--resume", is_flag=True, default=None, help="Continue the run in --out from its last checkpoint.")
@click.option("--no-distill", is_flag=True, default=None, help="Train with labels alone (no teachers).")
@click.option("--teacher", "teachers", multiple=True, metavar="ID",
              help="Use only these cached teachers (repeat).  [default: all in the store]")
@click.option("--online-teacher", "online_teachers", multiple=True, metavar="SPEC",
              help="Teacher run live on the same replayed views (same spec syntax as cache-teachers).")
@click.option("--random-init-online", is_flag=True, default=None,
              help="Allow online teachers without weights (random, seeded): for tests and benchmarks.")
@click.option("--kd-weight", type=float, help="Logit-KD weight of every teacher.  [default: 1]")
@click.option("--feature-weight", type=float,
              help="Feature-KD weight of every teacher with features.  [default: 0]")
@click.option("--label-weight", type=float, help="Weight of the label cross-entropy.  [default: 1]")
@click.option("--label-smoothing", type=click.FloatRange(0, 1), help="Label smoothing.  [default: 0.1]")
@click.option("--temperature", type=float, help="KD temperature; one the store has.  [default: 1]")
@click.option("--teacher-drop-prob", type=click.FloatRange(0, 1),
              help="Teacher dropping: per sample keep the hardest teacher, drop each other one with this "
                   "probability.  [default: 0, fixed weights]")
@click.option("--mixup", type=click.FloatRange(min=0), help="Mixup alpha (0 = off).  [default: 0]")
@click.option("--cutmix", type=click.FloatRange(min=0), help="CutMix alpha (0 = off).  [default: 0]")
@click.option("--crops-per-image", type=click.IntRange(min=1),
              help="Views per decoded image per epoch (amortises JPEG decode).  [default: 1]")
@click.option("--shards-in-flight", type=click.IntRange(min=1),
              help="Shards each loader reads at once; their examples are interleaved.  [default: 16]")
@click.option("--shuffle-buffer", type=click.IntRange(min=1),
              help="Examples shuffled on their way to a batch; holds this many rendered images in memory "
                   "(2048 at 224 px: 300 MB).  [default: 2048]")
@click.option("--lr", type=float, help="Peak AdamW learning rate.  [default: 2e-3]")
@click.option("--weight-decay", type=float, help="AdamW weight decay.  [default: 0.05]")
@click.option("--warmup-epochs", type=float, help="Linear warmup before the cosine decay.  [default: 1]")
@click.option("--drop-path", type=float, help="Stochastic depth rate of the student.  [default: 0]")
@click.option("--ema-decay", type=float, help="Weight EMA decay; 0 turns the EMA off.  [default: 0.999]")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]),
              help="auto: bf16 autocast on GPUs that support it, fp32 elsewhere.  [default: auto]")
@click.option("--channels-last/--no-channels-last", default=None,
              help="NHWC memory format for the student and its inputs (faster convolutions; see "
                   "docs/benchmarks.md).  [default: on]")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="[default: auto]")
@click.option("--seed", type=int, help="Seed of weights, data order and augmentation.  [default: 0]")
@click.option("--checkpoint-every", type=click.IntRange(min=1),
              help="Checkpoint every N steps (and at every epoch end).  [default: 500]")
@click.option("--progress/--no-progress", default=None, help="Show a progress bar.  [default: on]")
def train_student(config_file: str | None, no_wait: bool, **flags) -> None:
    """Train a student on the shards, distilling the teachers cached in --store.

    Each sample replays one of its cached views (crop box + flip) at the student's
    resolution, so every teacher's cached output is the target for exactly the
    pixels the student sees. Runs on Ray Train: an embedded local Ray by default,
    a cluster with --address. Writes RUN_DIR/metrics.jsonl, curves.png, checkpoints
    and, at the end, model.safetensors + config.json (timm format).
    """
    from jobs.train_student import TrainingFailed, plan_run, run_training
    from pipeline.train.train_config import ConfigError, TrainConfig

    with _clean_errors():
        options = _train_options(config_file, flags)
        for name in ("shards", "out"):
            if not options.get(name):
                raise click.UsageError(f"missing --{name} (as a flag or in --config)")
        address = options.pop("address", None)
        options["address"] = _driver_address(address)
        try:
            # The config file's relative paths mean this directory: the job gets them resolved, as flags.
            _submit(address, no_wait, {"config_file": "path", "shards": "shards", "val_shards": "shards",
                                       "store": "path", "out": "path", "online_teachers": "teacher"},
                    resolved={name: options.get(name) for name in ("shards", "val_shards", "store", "out")},
                    check=lambda: plan_run(TrainConfig.from_dict(options)))
            summary = run_training(TrainConfig.from_dict(options))
        except (ConfigError, TrainingFailed) as e:
            raise click.ClickException(str(e)) from e
    for line in summary.lines():
        click.echo(line)


@main.group("job")
def job() -> None:
    """Follow, inspect or stop the Ray jobs that `--address http://HEAD:8265` submitted.

    \b
    Examples:
    pipeline job list --address http://head:8265
    pipeline job logs JOB_ID --address http://head:8265 --follow
    """


def _job_address(command: Callable) -> Callable:
    return click.option("--address", metavar="URL",
                        help="The cluster's Jobs API, http://HEAD:8265.  [default: RAY_ADDRESS]")(command)


def _jobs_api(address: str | None) -> str:
    from jobs.submit import jobs_api_url

    url = jobs_api_url(address)
    if url is None:
        raise click.ClickException(f"--address {address}: expected the cluster's Jobs API, http://HEAD:8265"
                                   if address else "missing --address http://HEAD:8265 (or RAY_ADDRESS)")
    return url


@job.command("list")
@_job_address
def job_list(address: str | None) -> None:
    """List the submitted jobs: id, status, start time, command."""
    from jobs.submit import list_lines

    with _clean_errors():
        for line in list_lines(_jobs_api(address)):
            click.echo(line)


@job.command("status")
@click.argument("job_id")
@_job_address
def job_status(job_id: str, address: str | None) -> None:
    """Print a job's status; exit 1 if it FAILED (with its error line) or was STOPPED."""
    from jobs.submit import status

    with _clean_errors():
        raise SystemExit(status(_jobs_api(address), job_id))


@job.command("logs")
@click.argument("job_id")
@_job_address
@click.option("--follow", is_flag=True,
              help="Stream the logs until the job ends; exit 0 if it succeeded, else 1 (Ctrl-C stops following).")
def job_logs(job_id: str, address: str | None, follow: bool) -> None:
    """Print a job's logs (its command's output)."""
    from jobs.submit import logs

    with _clean_errors():
        raise SystemExit(logs(_jobs_api(address), job_id, follow))


@job.command("stop")
@click.argument("job_id")
@_job_address
def job_stop(job_id: str, address: str | None) -> None:
    """Stop a running job (its driver and the Ray workers it started)."""
    from jobs.submit import stop

    with _clean_errors():
        raise SystemExit(stop(_jobs_api(address), job_id))


@main.command("quickstart")
@click.option("--out", default="quickstart", show_default=True, type=click.Path(file_okay=False),
              help="Empty or new directory for shards, teachers, cache and students.")
@click.option("--teacher-epochs", type=click.IntRange(min=1),
              help="Epochs of each teacher (trained on labels).  [default: 2]")
@click.option("--student-epochs", type=click.IntRange(min=1), help="Epochs of each student.  [default: 3]")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show progress bars.")
def quickstart(out: str, teacher_epochs: int | None, student_epochs: int | None, progress: bool) -> None:
    """Run the whole pipeline on the bundled MNIST sample, on an embedded Ray.

    Makes shards, trains two small teachers of different families on labels,
    caches their per-view outputs, then trains a regla_t student from the cache
    and the same student on labels alone (one recipe: same seed, epochs and
    cached views; the labels-only run has the KD weight at 0), and prints their
    val accuracies.
    """
    from jobs.quickstart import QuickstartConfig, run_quickstart
    from jobs.train_student import TrainingFailed
    from pipeline.train.train_config import ConfigError

    epochs = {"teacher_epochs": teacher_epochs, "student_epochs": student_epochs}
    config = QuickstartConfig(out=out, progress=progress, **{k: v for k, v in epochs.items() if v})
    with _clean_errors():
        try:
            result = run_quickstart(config)
        except (ConfigError, TrainingFailed) as e:
            raise click.ClickException(str(e)) from e
    for line in result.lines():
        click.echo(line)


@main.command("inspect")
@click.argument("store_path", metavar="STORE")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", type=click.Path(dir_okay=False, writable=True), metavar="PNG",
              help="Also write confidence/entropy histograms and teacher agreement to this PNG.")
def inspect_store(store_path: str, as_json: bool, plot: str | None) -> None:
    """Show what a teacher cache holds: teachers, k, views, coverage, size, fingerprints."""
    from pipeline.cache.report import format_report, plot_store, store_report

    with _clean_errors():
        report = store_report(store_path)
        if plot:
            plot_store(store_path, plot)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        for line in format_report(report):
            click.echo(line)
    if plot:
        click.echo(f"plot: {plot}", err=as_json)


@main.command("verify")
@click.argument("store_path", metavar="STORE")
@click.option("--samples", "num_samples", type=click.IntRange(min=1), default=32, show_default=True,
              help="Random (sample, view) entries to recompute.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random choice.")
@click.option("--shards", multiple=True, metavar="URLS",
              help="Where the shards are now, if they moved since caching (same forms as cache-teachers).")
@click.option("--device", default="cpu", show_default=True, help="Device to run the teachers on.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the per-teacher results (max_kl, max_leftover_rel_error, ...) as JSON.")
def verify(store_path: str, num_samples: int, seed: int, shards: tuple[str, ...], device: str,
           as_json: bool) -> None:
    """Recompute random cached entries with live teachers and compare them with the store.

    Per teacher: top-k log-probabilities, leftover mass, KL(live || rebuilt) of the
    distribution the training loss rebuilds (at each cached temperature), feature
    cosine. Exit 1 on a difference beyond fp16 tolerance or a KL above 1e-3 nats.
    """
    from pipeline.cache.verify import verify_store
    from pipeline.data.shards import expand_shard_urls

    with _clean_errors():
        urls = expand_shard_urls(list(shards)) if shards else None
        report = verify_store(store_path, num_samples=num_samples, seed=seed, shards=urls, device=device)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(f"checked {report.checked} entries: "
                   f"max top-k log-prob error {report.worst('max_logprob_error'):.2e}, "
                   f"max leftover error {report.worst('max_leftover_rel_error'):.2e}, "
                   f"max KL {report.worst('max_kl'):.2e} nats, "
                   f"min feature cosine {report.worst('min_feature_cosine'):.5f}")
        for tid, t in report.teachers.items():
            cosine = "" if t.min_feature_cosine is None else f", min feature cosine {t.min_feature_cosine:.5f}"
            click.echo(f"  {tid}: max KL {t.max_kl:.2e} nats, max leftover error {t.max_leftover_rel_error:.2e}, "
                       f"max log-prob error {t.max_logprob_error:.2e}{cosine}")
    for line in report.mismatches[:20]:
        click.echo(f"MISMATCH {line}", err=True)
    if not report.ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
