"""Loading a teacher: resolve its timm name and weights source, build the model, fingerprint it, run it.

Weights come from exactly one place: a checkpoint (`NAME@path`, or `NAME@s3://...` and other
fsspec URLs: its bytes are read once, and hashed as read), timm's pretrained
weights (`NAME.tag`, or a bare `NAME` for timm's default tag), or, only when asked with
`random_init=True`, a seeded random init of a bare `NAME`. A random teacher cached by
accident would poison every student trained from the store, so a bare name never falls
back to random weights on its own.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import timm
import torch
from timm.data import resolve_data_config

from pipeline.data import storage

from .spec import TeacherSpec, TeacherSpecError

# Registers the regla_* models with timm, so the project's own models resolve as teacher names.
importlib.import_module("regla")

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# Keys under which training checkpoints nest the state dict, in the order they are looked for.
WRAPPER_KEYS = ("state_dict", "model", "state_dict_ema")


@dataclass(frozen=True)
class Preprocessing:
    """What a teacher expects of its input: size, resize interpolation and normalisation."""

    input_size: tuple[int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_pretrained_cfg(cls, pretrained_cfg: dict[str, Any], img_size: int | None) -> Preprocessing:
        """From a timm pretrained_cfg (timm fills what it lacks); `img_size` overrides the input size."""
        cfg = resolve_data_config(pretrained_cfg=pretrained_cfg)
        _, height, width = cfg["input_size"]
        return cls(
            input_size=(img_size, img_size) if img_size else (int(height), int(width)),
            interpolation=str(cfg["interpolation"]),
            mean=tuple(float(m) for m in cfg["mean"]),
            std=tuple(float(s) for s in cfg["std"]),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-able, with lists where the fields hold tuples (so it equals its own JSON round trip)."""
        return {"input_size": list(self.input_size), "interpolation": self.interpolation,
                "mean": list(self.mean), "std": list(self.std)}


@dataclass(eq=False)
class Teacher:
    """A loaded, eval-mode teacher with its preprocessing and weights fingerprint."""

    spec: TeacherSpec
    model: torch.nn.Module
    preprocessing: Preprocessing
    num_classes: int
    feature_dim: int
    weights_sha256: str
    checkpoint_sha256: str | None
    weights_source: str
    device: torch.device

    def __call__(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits [B, num_classes], pooled pre-logit features [B, feature_dim]), both float32.

        `images` are float [B, 3, H, W], already resized to `preprocessing.input_size` and normalised.
        """
        if not images.is_floating_point():
            raise TypeError(f"teacher {self.spec.teacher_id!r} takes normalised float images, got {images.dtype}")
        if images.ndim != 4 or tuple(images.shape[-2:]) != self.preprocessing.input_size:
            # A CNN would run at any size and give quietly wrong outputs: refuse instead.
            raise ValueError(f"teacher {self.spec.teacher_id!r} takes [B, 3, H, W] images with (H, W) = "
                             f"{self.preprocessing.input_size}, got shape {tuple(images.shape)}")
        x = images.to(self.device, torch.float32)
        # no_grad rather than inference_mode: callers may use the outputs as targets in autograd.
        with torch.no_grad(), self._autocast():
            pooled = self.model.forward_features(x)
            features = self.model.forward_head(pooled, pre_logits=True)
            logits = self.model.forward_head(pooled)
        return logits.float(), features.float()

    def record(self) -> dict[str, Any]:
        """JSON-able provenance of this teacher, as stored with its cached outputs."""
        return {
            "spec": self.spec.to_dict(),
            "weights_source": self.weights_source,
            "weights_sha256": self.weights_sha256,
            "checkpoint_sha256": self.checkpoint_sha256,
            "preprocessing": self.preprocessing.to_dict(),
            "num_classes": self.num_classes,
            "feature_dim": self.feature_dim,
            "timm_version": timm.__version__,
        }

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = AUTOCAST_DTYPES.get(self.spec.dtype)
        return torch.autocast(self.device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def load_teacher(spec: TeacherSpec, device: str | torch.device = "cpu", random_init: bool = False,
                 seed: int = 0) -> Teacher:
    """Build the teacher `spec` names, with its weights, in eval mode on `device`.

    `random_init` gives a bare NAME seeded random weights (from `seed` and the teacher id); it has no
    effect on specs with a pretrained tag or a weights file.
    """
    check_teacher_spec(spec, random_init)
    checkpoint_sha256 = None
    cfg_overlay: dict[str, Any] = {}
    if spec.weights is not None:
        location = _weights_location(spec.weights)
        data = _read_weights(spec, location)
        model, cfg_overlay = _model_from_file(spec, location, data)
        checkpoint_sha256 = hashlib.sha256(data).hexdigest()  # of the bytes the model was built from
        source = location if storage.is_remote(location) else f"file:{location}"
    elif spec.pretrained_tag is None and random_init:
        model = _create_model(spec.model_name, seed=_derived_seed(seed, spec.teacher_id),
                              num_classes=spec.num_classes, img_size=spec.img_size)
        source = f"random-init:seed={seed}"
    else:
        model = _pretrained_model(spec)
        source = f"timm:{spec.model_name}.{model.pretrained_cfg['tag']}"
    model.eval().requires_grad_(False)
    # Hashed on the CPU before the move, so every device agrees on the fingerprint.
    weights_sha256 = state_dict_sha256(model.state_dict())
    device = torch.device(device)
    return Teacher(
        spec=spec,
        model=model.to(device),
        preprocessing=Preprocessing.from_pretrained_cfg({**model.pretrained_cfg, **cfg_overlay}, spec.img_size),
        num_classes=model.num_classes,
        feature_dim=getattr(model, "head_hidden_size", None) or model.num_features,
        weights_sha256=weights_sha256,
        checkpoint_sha256=checkpoint_sha256,
        weights_source=source,
        device=device,
    )


def check_teacher_spec(spec: TeacherSpec, random_init: bool = False) -> None:
    """Fail early, without building the model, when the model, its tag or its weights cannot be had."""
    name = spec.model_name
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5)
        hint = f"close timm names: {', '.join(close)}" if close else "no close timm names (see timm.list_models())"
        raise TeacherSpecError(f"teacher {spec.teacher_id!r}: unknown timm model {name!r}; {hint}")
    if spec.weights is not None:
        location = _weights_location(spec.weights)
        if not location.lower().endswith(CHECKPOINT_SUFFIXES):
            raise TeacherSpecError(f"teacher {spec.teacher_id!r}: weights file {location} is not one of "
                                   f"{', '.join(CHECKPOINT_SUFFIXES)}")
        try:
            found = storage.isfile(location)
        except storage.StorageError as e:
            raise TeacherSpecError(f"teacher {spec.teacher_id!r}: cannot reach weights file: {e}") from None
        if not found:
            raise TeacherSpecError(f"teacher {spec.teacher_id!r}: weights file not found: {location}")
        return
    tags = _pretrained_tags(name)
    tag = spec.pretrained_tag
    if tag is not None and tag not in tags:
        available = ", ".join(tags) if tags else "none"
        raise TeacherSpecError(f"teacher {spec.teacher_id!r}: timm has no pretrained tag {tag!r} for {name!r}; "
                               f"available tags: {available}")
    if tag is None and random_init:
        return
    if tag is None:
        default_cfg = timm.models.get_pretrained_cfg(name)
        tag = default_cfg.tag if default_cfg is not None else None
        if tag not in tags:
            raise TeacherSpecError(f"teacher {spec.teacher_id!r}: timm has no pretrained weights for {name!r}. "
                                   + _weights_help(name))
    pretrained_classes = timm.models.get_pretrained_cfg(f"{name}.{tag}").num_classes
    if spec.num_classes is not None and spec.num_classes != pretrained_classes:
        # timm would silently swap in a random classifier: a teacher with meaningless logits.
        raise TeacherSpecError(f"teacher {spec.teacher_id!r}: num_classes={spec.num_classes}, but the pretrained "
                               f"weights of {name}.{tag} have {pretrained_classes} classes")


def _weights_location(weights: str) -> str:
    """A local weights path made absolute; a URL checked (no credentials in it) and kept as given."""
    local = storage.local_path(weights)
    if local is not None:
        return str(Path(local).expanduser().resolve())
    try:
        return storage.check_location(weights)
    except storage.StorageError as e:
        raise TeacherSpecError(str(e)) from None


def _read_weights(spec: TeacherSpec, location: str) -> bytes:
    try:
        return storage.read_bytes(location)
    except storage.StorageError as e:
        raise TeacherSpecError(f"teacher {spec.teacher_id!r}: cannot read weights file: {e}") from None


def read_checkpoint(location: str | Path, data: bytes | None = None) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or torch file (local or a URL; ``data``: its bytes, if already read),
    with training wrappers and `module.` stripped."""
    location = str(location)
    try:
        if data is None:
            data = storage.read_bytes(location)
        if location.lower().endswith(".safetensors"):
            obj: Any = safetensors.torch.load(data)
        else:
            # weights_only: a checkpoint is data, never code to run.
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        raise TeacherSpecError(f"cannot read weights file {location}: {type(e).__name__}: {e}") from None
    while isinstance(obj, dict) and not _is_state_dict(obj):
        key = next((k for k in WRAPPER_KEYS if k in obj), None)
        if key is None:
            break
        obj = obj[key]
    if not isinstance(obj, dict) or not _is_state_dict(obj):
        raise TeacherSpecError(f"weights file {location} holds no state dict (name -> tensor), nor one under "
                               f"{', '.join(WRAPPER_KEYS)}")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of every entry, in name order."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}\0{tensor.dtype}\0{tuple(tensor.shape)}\0".encode())
        h.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _pretrained_tags(model_name: str) -> list[str]:
    """The tags of `model_name` that have pretrained weights in timm."""
    return [t.split(".", 1)[1] for t in timm.list_pretrained(f"{model_name}.*")]


def _weights_help(model_name: str) -> str:
    """How to give `model_name` weights, for errors about missing or unloadable ones."""
    tags = ", ".join(_pretrained_tags(model_name)) or "none"
    return (f"Give a teacher its weights in one of three ways: '{model_name}.TAG' for timm pretrained weights "
            f"(tags: {tags}), '{model_name}@/path/to/weights.safetensors' (or .pth) for a local checkpoint, "
            f"or a bare '{model_name}' for timm's default pretrained weights. --random-init gives a bare NAME "
            f"random weights: it exists for plumbing tests only, since a random teacher's cached outputs are "
            f"worthless.")


def _is_state_dict(obj: dict) -> bool:
    return bool(obj) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())


def _model_from_file(spec: TeacherSpec, path: str, data: bytes) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model with the checkpoint's weights (``data``, read from ``path``), and the pretrained_cfg of a
    config.json beside it."""
    state_dict = read_checkpoint(path, data)
    config = _read_hub_config(storage.join(storage.parent(path), "config.json"), spec.model_name)
    num_classes = spec.num_classes or config.get("num_classes") or _classifier_classes(spec.model_name, state_dict)
    # Built at its native input size so the checkpoint's shapes fit; resized after loading.
    model = _create_model(spec.model_name, num_classes=num_classes)
    _load_strict(model, state_dict, path)
    if spec.img_size is not None:
        _set_input_size(model, spec.img_size)
    return model, dict(config.get("pretrained_cfg") or {})


def _read_hub_config(path: str, model_name: str) -> dict[str, Any]:
    """timm's HF-hub config.json beside a checkpoint ({} when absent), checked against the model name."""
    try:
        if not storage.isfile(path):
            return {}
        config = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        raise TeacherSpecError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise TeacherSpecError(f"{path} is not a JSON object")
    architecture = config.get("architecture")
    if architecture is not None and str(architecture).split(".", 1)[0] != model_name:
        raise TeacherSpecError(f"{path} describes architecture {architecture!r}, not {model_name!r}")
    num_classes = config.get("num_classes")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes <= 0):
        raise TeacherSpecError(f"{path}: num_classes={num_classes!r} is not a positive integer")
    return config


def _classifier_classes(model_name: str, state_dict: dict[str, torch.Tensor]) -> int | None:
    """Rows of the checkpoint's classifier weight, found by the classifier name timm records."""
    cfg = timm.models.get_pretrained_cfg(model_name)
    classifier = cfg.classifier if cfg is not None else None
    if isinstance(classifier, (tuple, list)):  # e.g. distilled ViTs: ("head", "head_dist")
        classifier = classifier[0]
    weight = state_dict.get(f"{classifier}.weight") if classifier else None
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


def _load_strict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], path: str) -> None:
    expected = set(model.state_dict())
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise TeacherSpecError(
            f"weights file {path} does not match {model.pretrained_cfg['architecture']}: "
            f"{len(missing)} missing key(s) {missing[:5]}, {len(unexpected)} unexpected key(s) {unexpected[:5]}")
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:  # same keys, different shapes
        raise TeacherSpecError(f"weights file {path} does not fit "
                               f"{model.pretrained_cfg['architecture']}: {e}") from None


def _set_input_size(model: torch.nn.Module, img_size: int) -> None:
    """Resize a loaded model's input (ViT position embeddings); size-agnostic CNNs need nothing."""
    if hasattr(model, "set_input_size"):
        model.set_input_size(img_size=img_size)
    elif model.pretrained_cfg.get("fixed_input_size"):
        raise TeacherSpecError(f"{model.pretrained_cfg['architecture']} has a fixed input size and no way to "
                               f"change it after loading; drop img_size={img_size}")


def _pretrained_model(spec: TeacherSpec) -> torch.nn.Module:
    name = spec.model_name if spec.pretrained_tag is None else f"{spec.model_name}.{spec.pretrained_tag}"
    try:
        return _create_model(name, pretrained=True, img_size=spec.img_size)
    except Exception as e:
        raise TeacherSpecError(
            f"teacher {spec.teacher_id!r}: could not load timm pretrained weights for {name!r} "
            f"({type(e).__name__}: {e}). Without hub access (HF_HUB_OFFLINE=1, no network) use a local "
            f"checkpoint. " + _weights_help(spec.model_name)) from e


def _create_model(name: str, seed: int | None = None, **kwargs: Any) -> torch.nn.Module:
    """timm.create_model without touching the global RNG, seeded when `seed` is given.

    `img_size` is passed only to models whose constructor takes it (ViTs need it, CNNs reject it).
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    with torch.random.fork_rng(devices=[]):
        try:
            return _seeded_create(name, seed, kwargs)
        except TypeError as e:
            if "img_size" not in kwargs or "img_size" not in str(e):
                raise
        return _seeded_create(name, seed, {k: v for k, v in kwargs.items() if k != "img_size"})


def _seeded_create(name: str, seed: int | None, kwargs: dict[str, Any]) -> torch.nn.Module:
    if seed is not None:
        torch.manual_seed(seed)
    return timm.create_model(name, **kwargs)


def _derived_seed(seed: int, teacher_id: str) -> int:
    """A per-teacher seed, so two random teachers in one run differ while each stays reproducible."""
    digest = hashlib.sha256(f"{seed}:{teacher_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % 2**63
