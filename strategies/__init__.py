"""Execution strategies, one module each, their options in ``ktrain.config``. To add one:
its options class (and a line in ``ktrain.config.STRATEGY_OPTIONS``), its module, a line in
REGISTRY."""

from ktrain.config import StrategyConfig
from ktrain.strategies.base import Strategy
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


__all__ = ["REGISTRY", "Strategy", "create"]
