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
    TrackingSection,
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
    "TrackingSection",
    "TrainingSection",
    "cache_root",
]
