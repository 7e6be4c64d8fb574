"""Teacher specs: the `NAME[.tag|@weights][,key=value...]` strings and the YAML teachers file.

A spec says which timm model a teacher is, where its weights come from and how it is run
(input size, batch size, autocast dtype, whether its pooled features are cached). Parsing
needs no timm: whether the model and its weights exist is checked when the teacher is loaded.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

DTYPES = ("fp32", "bf16", "fp16")
OPTIONS = ("img_size", "batch_size", "dtype", "features", "num_classes", "id")
# Keys of a mapping item in the teachers file: the options plus where the model and weights come from.
FILE_KEYS = ("model", "weights") + OPTIONS

_ID_RE = re.compile(r"[A-Za-z0-9._-]+")
_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no")


class TeacherSpecError(ValueError):
    """A teacher spec, option, teachers file or weights file that cannot be used."""


def default_teacher_id(model_name: str, pretrained_tag: str | None) -> str:
    """`model_name[.tag]` with every character outside [A-Za-z0-9._-] replaced by `_`."""
    name = model_name if pretrained_tag is None else f"{model_name}.{pretrained_tag}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher: a timm model, its weights source and how it is run."""

    model_name: str
    pretrained_tag: str | None = None
    weights: str | None = None
    teacher_id: str = ""
    img_size: int | None = None
    batch_size: int = 64
    dtype: str = "fp32"
    features: bool = True
    num_classes: int | None = None

    def __post_init__(self) -> None:
        # Validating here covers every way a spec is made: parse, from_dict, the constructor.
        if not isinstance(self.model_name, str) or not self.model_name or any(c in self.model_name for c in ".@,= "):
            raise TeacherSpecError(
                f"bad model name {self.model_name!r}: expected a timm model name such as 'resnet50'")
        if self.pretrained_tag is not None and (
                not self.pretrained_tag or any(c in self.pretrained_tag for c in "@,= ")):
            raise TeacherSpecError(f"bad pretrained tag {self.pretrained_tag!r}")
        if self.weights is not None and (not self.weights or "," in self.weights):
            raise TeacherSpecError(f"bad weights path {self.weights!r}: must be non-empty, without ','")
        if self.pretrained_tag is not None and self.weights is not None:
            raise TeacherSpecError(
                f"teacher {self.model_name!r} has both a pretrained tag ({self.pretrained_tag!r}) "
                f"and a weights file ({self.weights!r}): give one or the other")
        for name in ("img_size", "num_classes"):
            value = getattr(self, name)
            if value is not None:
                _check_positive_int(name, value)
        _check_positive_int("batch_size", self.batch_size)
        if self.dtype not in DTYPES:
            raise TeacherSpecError(f"option dtype={self.dtype!r}: expected one of {', '.join(DTYPES)}")
        if not isinstance(self.features, bool):
            raise TeacherSpecError(f"option features={self.features!r}: expected true or false")
        if not self.teacher_id:
            object.__setattr__(self, "teacher_id", default_teacher_id(self.model_name, self.pretrained_tag))
        if not isinstance(self.teacher_id, str) or not _ID_RE.fullmatch(self.teacher_id):
            raise TeacherSpecError(f"option id={self.teacher_id!r}: expected characters from [A-Za-z0-9._-]")

    def to_dict(self) -> dict[str, Any]:
        """JSON-able field dict; `from_dict` turns it back into an equal spec."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TeacherSpec:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise TeacherSpecError(f"unknown teacher spec field(s) {unknown}; valid: {', '.join(sorted(fields))}")
        if "model_name" not in d:
            raise TeacherSpecError("teacher spec dict has no 'model_name'")
        return cls(**d)

    def __str__(self) -> str:
        """Canonical spec string: the head plus every option that differs from its default."""
        head = self.model_name
        if self.pretrained_tag is not None:
            head += f".{self.pretrained_tag}"
        if self.weights is not None:
            head += f"@{self.weights}"
        options = []
        if self.img_size is not None:
            options.append(f"img_size={self.img_size}")
        if self.batch_size != 64:
            options.append(f"batch_size={self.batch_size}")
        if self.dtype != "fp32":
            options.append(f"dtype={self.dtype}")
        if not self.features:
            options.append("features=false")
        if self.num_classes is not None:
            options.append(f"num_classes={self.num_classes}")
        if self.teacher_id != default_teacher_id(self.model_name, self.pretrained_tag):
            options.append(f"id={self.teacher_id}")
        return ",".join([head, *options])


def parse_teacher_spec(text: str) -> TeacherSpec:
    """Parse `NAME`, `NAME.tag` or `NAME@/path/weights`, each optionally followed by `,key=value` options."""
    head, *parts = [p.strip() for p in text.strip().split(",")]
    options: dict[str, str] = {}
    for part in parts:
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise TeacherSpecError(f"teacher spec {text!r}: option {part!r} is not key=value")
        if key in options:
            raise TeacherSpecError(f"teacher spec {text!r}: option {key!r} given twice")
        options[key] = value
    try:
        return _build_spec(head, options)
    except TeacherSpecError as e:
        raise TeacherSpecError(f"teacher spec {text!r}: {e}") from None


def load_teachers_file(path: str | Path) -> list[TeacherSpec]:
    """Read a YAML teachers file: a list, or a mapping with key `teachers:`, of spec strings or mappings.

    Relative weights paths are resolved against the file's directory; teacher ids must be unique.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise TeacherSpecError(f"cannot read teachers file {path}: {e}") from None
    except yaml.YAMLError as e:
        raise TeacherSpecError(f"teachers file {path} is not valid YAML: {e}") from None
    if isinstance(data, dict):
        if set(data) != {"teachers"}:
            raise TeacherSpecError(f"teachers file {path}: a mapping must have the single key 'teachers:', "
                                   f"got {sorted(map(str, data))}")
        data = data["teachers"]
    if not isinstance(data, list) or not data:
        raise TeacherSpecError(
            f"teachers file {path}: expected a non-empty list of teachers, or a mapping with key 'teachers:'")
    specs: list[TeacherSpec] = []
    for index, item in enumerate(data):
        try:
            spec = _spec_from_item(item)
        except TeacherSpecError as e:
            raise TeacherSpecError(f"teachers file {path}, item {index}: {e}") from None
        if spec.weights is not None:
            spec = dataclasses.replace(spec, weights=_resolve_against(spec.weights, path.parent))
        specs.append(spec)
    _check_unique_ids(specs, path)
    return specs


def _build_spec(head: str, options: Mapping[str, Any]) -> TeacherSpec:
    """A spec from its head (`NAME`, `NAME.tag`, `NAME@weights`) and its options (strings or YAML values)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise TeacherSpecError(f"unknown option(s) {', '.join(unknown)}; valid options: {', '.join(OPTIONS)}")
    name, _, weights = head.partition("@")
    # timm model names hold no '.', so the first '.' starts the pretrained tag, as in timm itself.
    model_name, dot, tag = name.partition(".")
    fields: dict[str, Any] = {
        "model_name": model_name,
        "pretrained_tag": tag if dot else None,
        "weights": weights if "@" in head else None,
    }
    for key, value in options.items():
        if key == "dtype":
            fields["dtype"] = str(value).strip().lower()
        elif key == "features":
            fields["features"] = _parse_bool(key, value)
        elif key == "id":
            fields["teacher_id"] = str(value)
        else:
            fields[key] = _parse_positive_int(key, value)
    return TeacherSpec(**fields)


def _spec_from_item(item: Any) -> TeacherSpec:
    """One teachers-file item: a spec string or a mapping with key `model` and option keys."""
    if isinstance(item, str):
        return parse_teacher_spec(item)
    if not isinstance(item, dict):
        raise TeacherSpecError(f"expected a spec string or a mapping, got {type(item).__name__}")
    unknown = sorted(set(item) - set(FILE_KEYS))
    if unknown:
        raise TeacherSpecError(f"unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(FILE_KEYS)}")
    if not isinstance(item.get("model"), str):
        raise TeacherSpecError("mapping needs a 'model' string, e.g. 'model: resnet50.a1_in1k'")
    head = item["model"].strip()
    if item.get("weights") is not None:
        if "@" in head:
            raise TeacherSpecError(f"weights given twice: in 'model: {head}' and in 'weights:'")
        head += f"@{item['weights']}"
    options = {k: v for k, v in item.items() if k not in ("model", "weights")}
    return _build_spec(head, options)


def _parse_positive_int(key: str, value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    _check_positive_int(key, value)
    return value


def _check_positive_int(key: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise TeacherSpecError(f"option {key}={value!r}: expected a positive integer")


def _parse_bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise TeacherSpecError(f"option {key}={value!r}: expected one of {', '.join(_TRUE + _FALSE)}")


def _resolve_against(weights: str, base: Path) -> str:
    if "://" in weights:  # a URL is taken as given
        return weights
    path = Path(weights).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def _check_unique_ids(specs: list[TeacherSpec], path: Path) -> None:
    first_index: dict[str, int] = {}
    for index, spec in enumerate(specs):
        if spec.teacher_id in first_index:
            raise TeacherSpecError(
                f"teachers file {path}, item {index}: teacher id {spec.teacher_id!r} already used by item "
                f"{first_index[spec.teacher_id]}; give one of them another id (option id=...)")
        first_index[spec.teacher_id] = index
