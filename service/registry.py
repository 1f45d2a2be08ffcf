"""The encoder registry as users see it: references (``NAME@ALIAS``, ``NAME/VERSION``),
versions with their evaluation metrics, and alias promotion guarded by a metric.

MLflow's client alone, no torch: the control plane and the CLI share it. Every failure is a
``RegistryError`` whose message is meant for the user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlflow.exceptions import MlflowException

from service.tracking import ModelVersionView, Tracking

DEFAULT_PROMOTION_METRIC = "eval.linear.top1"
_REFERENCE = re.compile(r"^(?:models:/)?(?P<name>[^@/]+)(?:@(?P<alias>[^@/]+)|/(?P<version>\d+))$")


class RegistryError(Exception):
    """A registry request that cannot be served; the message says why."""


class RegistryNotFound(RegistryError):
    """An unknown model name, version or alias."""


class PromotionRefused(RegistryError):
    """The version is worse than the alias's current holder (or cannot be compared)."""


@dataclass(frozen=True)
class Reference:
    name: str
    alias: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self}"

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


def parse_reference(text: str) -> Reference:
    """``NAME@ALIAS``, ``NAME/VERSION``, or either as a ``models:/`` URI."""
    match = _REFERENCE.match(text.strip())
    if not match:
        raise RegistryError(
            f"{text!r} is not an encoder reference: give NAME@ALIAS or NAME/VERSION"
        )
    return Reference(match["name"], alias=match["alias"], version=match["version"])


def metric_value(view: ModelVersionView, metric: str) -> float | None:
    """A headline metric the driver wrote on the version as a tag, as a number."""
    try:
        return float(view.tags[metric])
    except (KeyError, ValueError):
        return None


@dataclass(frozen=True)
class Promotion:
    name: str
    alias: str
    version: str
    metric: str
    value: float | None
    previous_version: str | None
    previous_value: float | None
    forced: bool


class Registry:
    def __init__(self, tracking_uri: str) -> None:
        self.tracking = Tracking(tracking_uri)
        self.client = self.tracking.client

    def versions(self, name: str | None = None) -> list[ModelVersionView]:
        views = self.tracking.model_versions(name)
        if name and not views:
            raise RegistryNotFound(f"no registered encoder named {name!r}{self._known_names()}")
        return views

    def _known_names(self) -> str:
        names = sorted({view.name for view in self.tracking.model_versions()})
        return f"; registered: {', '.join(names)}" if names else "; the registry is empty"

    def resolve(self, reference: Reference) -> ModelVersionView:
        """The version a reference names, or RegistryNotFound saying what does exist."""
        try:
            aliases = self.client.get_registered_model(reference.name).aliases
        except MlflowException:
            raise RegistryNotFound(
                f"no registered encoder named {reference.name!r}{self._known_names()}"
            ) from None
        version = reference.version
        if reference.alias is not None:
            if reference.alias not in aliases:
                known = ", ".join(f"{a} -> {v}" for a, v in sorted(aliases.items())) or "none"
                raise RegistryNotFound(
                    f"{reference.name} has no alias {reference.alias!r} (its aliases: {known})"
                )
            version = str(aliases[reference.alias])
        for view in self.tracking.model_versions(reference.name):
            if view.version == version:
                return view
        known = ", ".join(view.version for view in self.tracking.model_versions(reference.name))
        raise RegistryNotFound(f"{reference.name} has no version {version} (versions: {known})")

    def promote(
        self, name: str, version: str, alias: str, metric: str, force: bool = False
    ) -> Promotion:
        """Point ``alias`` at ``version``, unless the version is worse on ``metric`` (higher
        is better: every evaluation metric is an accuracy) than the version the alias
        points at now, or has no value to compare; ``force`` overrides both."""
        target = self.resolve(Reference(name, version=version))
        value = metric_value(target, metric)
        previous = self._holder(name, alias)
        previous_value = metric_value(previous, metric) if previous else None
        if previous and previous.version != target.version and not force:
            held = f"the current {alias} is version {previous.version}"
            if value is None:
                raise PromotionRefused(
                    f"{name} version {version} has no {metric} to compare ({held}, "
                    f"{_number(previous_value)}); pass --force to promote it anyway"
                )
            if previous_value is not None and value < previous_value:
                raise PromotionRefused(
                    f"{name} version {version} is worse than the current {alias} on {metric}: "
                    f"{value:.4f} < {previous_value:.4f} (version {previous.version}); "
                    "pass --force to promote it anyway"
                )
        self.client.set_registered_model_alias(name, alias, target.version)
        return Promotion(
            name=name,
            alias=alias,
            version=target.version,
            metric=metric,
            value=value,
            previous_version=previous.version if previous else None,
            previous_value=previous_value,
            forced=force,
        )

    def _holder(self, name: str, alias: str) -> ModelVersionView | None:
        try:
            return self.resolve(Reference(name, alias=alias))
        except RegistryNotFound:
            return None


def _number(value: float | None) -> str:
    return "no value" if value is None else f"{value:.4f}"
