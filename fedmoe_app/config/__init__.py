"""The run config: every key, its default and its check (:mod:`.run`), in sections (:mod:`.sections`)."""

from .run import (
    AGGREGATIONS,
    DATASETS,
    IMAGE_DATASETS,
    MODELS,
    TEXT_DATASETS,
    TEXT_MODELS,
    ConfigError,
    RunConfig,
    cache_root,
    is_model_factory,
)
from .sections import (
    AggregationSection,
    AlignmentSection,
    FaultSection,
    LoraSection,
    OutputSection,
    PlanningSection,
    PrivacySection,
    RoundSection,
    SplitSection,
    TrainingSection,
)

__all__ = [
    "AGGREGATIONS",
    "DATASETS",
    "IMAGE_DATASETS",
    "MODELS",
    "TEXT_DATASETS",
    "TEXT_MODELS",
    "AggregationSection",
    "AlignmentSection",
    "ConfigError",
    "FaultSection",
    "LoraSection",
    "OutputSection",
    "PlanningSection",
    "PrivacySection",
    "RoundSection",
    "RunConfig",
    "SplitSection",
    "TrainingSection",
    "cache_root",
    "is_model_factory",
]
