"""Execution strategies, one module each. To add one: write the module, add it to REGISTRY."""

from strategies.base import Session, Strategy, StrategyConfig
from strategies.mirrored import MirroredStrategy

REGISTRY: dict[str, type[Strategy]] = {cls.name: cls for cls in (MirroredStrategy,)}


def create(config: StrategyConfig) -> Strategy:
    return REGISTRY[config.name](config)


__all__ = ["REGISTRY", "Session", "Strategy", "StrategyConfig", "create"]
