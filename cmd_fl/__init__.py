"""cmd-fl core: Correlation Mode Decomposition (CMD) math, parameter layout, wire format, ledger.

No Flower server or client logic lives here.
"""

from cmd_fl.embedding import (
    EmbeddingSchedule,
    EmbeddingSelector,
    EmbeddingState,
    embedding_event,
)
from cmd_fl.layout import ParameterLayout, TensorSpec
from cmd_fl.online import OnlineCMD
from cmd_fl.posthoc import CMDFit, assign_and_fit, posthoc_cmd, sample_weights
from cmd_fl.torch_projection import EmbeddedProjector

__all__ = [
    "CMDFit",
    "EmbeddedProjector",
    "EmbeddingSchedule",
    "EmbeddingSelector",
    "EmbeddingState",
    "OnlineCMD",
    "ParameterLayout",
    "TensorSpec",
    "assign_and_fit",
    "embedding_event",
    "posthoc_cmd",
    "sample_weights",
]
