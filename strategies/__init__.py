"""Execution strategies, one module each. To add one: write the module, add it to REGISTRY."""

from ktrain.strategies.base import Session, Strategy, StrategyConfig
from ktrain.strategies.horovod import HorovodStrategy
from ktrain.strategies.mirrored import MirroredStrategy
from ktrain.strategies.multiworker import MultiWorkerStrategy
from ktrain.strategies.ray import RayStrategy
from ktrain.strategies.spark import SparkStrategy

REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (MirroredStrategy, MultiWorkerStrategy, HorovodStrategy, SparkStrategy,
                RayStrategy)}


def create(config: StrategyConfig) -> Strategy:
    return REGISTRY[config.name](config)


__all__ = ["REGISTRY", "Session", "Strategy", "StrategyConfig", "create"]
