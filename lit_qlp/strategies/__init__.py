"""Lightning strategies of lit_qlp."""

from lit_qlp.strategies.pipeline import BatchResult, PipelineSpec, PipelineStrategy

__all__ = ["BatchResult", "PipelineSpec", "PipelineStrategy"]
