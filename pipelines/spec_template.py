"""`selfsup init METHOD`: a complete job spec for a method, every field written out with its
default and a comment saying what it takes, derived from the spec's models (so a new method
or field shows up here with no edit). The result validates as it is: it trains the method
on the builtin digits, ready to point at a user's images."""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from pipelines.params import METHOD_PARAMS
from pipelines.spec import JobSpec, parse_spec

_BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)
_SECTION_NOTES = {
    "method": "the method and its parameters (see METHODS.md in the docs)",
    "encoder": "the network whose features are the product",
    "data": "builtin:digits | builtin:patches | builtin:spiral | file:///folder | s3://bucket/prefix",
    "augment": "the views contrastive methods compare",
    "train": "the optimisation; batch_size is the global batch over all workers",
    "resources": "the gang: all workers start together or not at all; {min, max}: elastic",
    "evaluate": "protocols run on the held-out split after training",
    "register": "the MLflow model the encoder is registered as, and the alias moved to it",
}


def _describe(annotation: Any, metadata: list[Any]) -> str:
    """What a field takes, in a few words: its choices, or its type and bounds."""
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(str(choice) for choice in get_args(annotation))
    if get_origin(annotation) is Annotated:  # Annotated[T, bounds...] inside an Optional
        inner, *more = get_args(annotation)
        bounds = [
            b for item in more for b in (item.metadata if isinstance(item, FieldInfo) else [item])
        ]
        return _describe(inner, [*metadata, *bounds])
    arguments = [a for a in get_args(annotation) if a is not type(None)]
    if arguments and get_origin(annotation) is not list:
        return _describe(arguments[0], metadata)  # T | None: what a value takes
    name = getattr(annotation, "__name__", str(annotation)).replace("float", "number")
    bounds = [
        f"{sign} {getattr(item, attribute)}"
        for item in metadata
        for kind, attribute, sign in _BOUNDS
        if isinstance(item, kind)
    ]
    return f"{name}, {' and '.join(bounds)}" if bounds else name


def _comment(info: FieldInfo) -> str:
    return _describe(info.annotation, list(info.metadata))


def _value(value: Any) -> str:
    return json.dumps(value)  # JSON scalars and lists are YAML flow values


def _section(name: str, model: BaseModel, values: dict[str, Any]) -> list[str]:
    lines = [f"{name}:  # {_SECTION_NOTES[name]}" if name in _SECTION_NOTES else f"{name}:"]
    fields = type(model).model_fields
    for key, value in values.items():
        if value is None or isinstance(value, dict):
            continue  # options of another source or arch: not this spec's
        info = fields.get(key) or next(f for f in fields.values() if f.alias == key)
        lines.append(f"  {key}: {_value(value)}  # {_comment(info)}")
    return lines


def spec_template(method: str) -> str:
    """The commented spec for ``method``; ValueError for a method selfsup does not know."""
    params = METHOD_PARAMS.get(method)
    if params is None:
        raise ValueError(f"unknown method {method!r}: one of {', '.join(sorted(METHOD_PARAMS))}")
    document: dict[str, Any] = {
        "name": f"{method.replace('_', '-')}-digits",
        "method": {"name": method},
        "data": {"source": "builtin:digits"},
    }
    if params.encoder_archs:
        document["encoder"] = {"arch": params.encoder_archs[0]}
    spec = parse_spec(document)
    dumped = spec.model_dump(mode="json", by_alias=True)
    dumped["register"] = {"model": spec.name, "alias": "candidate"}
    full = parse_spec(dumped)  # with the registration, for its model's fields
    lines = [
        f"# A selfsup job spec for {method}, written by `selfsup init {method}`: every field",
        "# with its default. Check it with `selfsup spec validate FILE`; submit it with",
        "# `selfsup job submit FILE` (override fields there with --set train.lr=1e-3).",
        f"name: {_value(full.name)}",
    ]
    for name in ("method", "encoder", "data", "augment", "train", "resources", "evaluate"):
        lines += _section(name, getattr(full, name), dumped[name])
    lines += _section("register", full.registration, dumped["register"])
    for name in ("priority", "max_retries"):
        lines.append(f"{name}: {dumped[name]}  # {_comment(JobSpec.model_fields[name])}")
    lines.append("depends_on: []  # ids of jobs that must succeed before this one starts")
    return "\n".join(lines) + "\n"
