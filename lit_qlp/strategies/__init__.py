"""Lightning strategies of lit_qlp."""

from lit_qlp.models.layout import PipelineSpec
from lit_qlp.strategies.pipeline import BatchResult, PipelineStrategy

__all__ = ["BatchResult", "PipelineSpec", "PipelineStrategy"]
