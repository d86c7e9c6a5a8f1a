"""Execution strategies, one module each. To add one: write the module, add it to REGISTRY."""

from strategies.base import Session, Strategy, StrategyConfig
from strategies.horovod import HorovodStrategy
from strategies.mirrored import MirroredStrategy
from strategies.multiworker import MultiWorkerStrategy
from strategies.ray import RayStrategy
from strategies.spark import SparkStrategy

REGISTRY: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (MirroredStrategy, MultiWorkerStrategy, HorovodStrategy, SparkStrategy,
                RayStrategy)}


def create(config: StrategyConfig) -> Strategy:
    return REGISTRY[config.name](config)


__all__ = ["REGISTRY", "Session", "Strategy", "StrategyConfig", "create"]
