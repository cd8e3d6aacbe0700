"""The pipeline layout of a model: the layer specs DeepSpeed builds each stage from, with the tied-weight wiring."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lit_qlp.models.pipeline import (
    DecoderLayerPipe,
    EmbeddingPipe,
    LayerAdapter,
    ModelSource,
    OutputPipe,
    StageBuilder,
    tied_head,
)

TIED_EMBEDDING = "model.embed_tokens.weight"


@dataclass
class PipelineSpec:
    """What a LightningModule hands the strategy to build its pipeline.

    Attributes:
        layers: DeepSpeed ``LayerSpec`` s, in order; only this stage's are built.
        parameter_counts: Parameter count of each layer (for ``partition_method="parameters"``), known without
            building the layers.
        loss_fn: ``loss_fn(outputs, labels)`` on the last stage (a ``TokenWeightedLoss``); the strategy gives it the
            normaliser of each batch.
        checkpointable_layers: Class names of the layers to activation-checkpoint.
    """

    layers: list
    parameter_counts: list[float]
    loss_fn: Callable
    checkpointable_layers: list[str]


def stage_weights(source: ModelSource) -> list[float]:
    """Parameter counts of ``[embedding, decoder layers..., norm + head]`` counted on the meta skeleton."""
    n = source.quirks.num_layers
    head = source.num_parameters("model.norm") + source.num_parameters("lm_head")
    return (
        [float(source.num_parameters("model.embed_tokens"))]
        + [float(source.num_parameters(f"model.layers.{i}")) for i in range(n)]
        + [float(head)]
    )


def trains_tied_embeddings(builder: StageBuilder) -> bool:
    """The model ties its head to the embedding matrix and that matrix trains."""
    return builder.source.quirks.tie_word_embeddings and TIED_EMBEDDING in builder.trainable


def pipeline_spec(
    builder: StageBuilder,
    loss_fn,
    adapter: LayerAdapter | None,
    embeddings_on_cpu: bool = False,
    compile_layers: bool = False,
    pipeline_stages: int | None = None,
    mlp_chunk_tokens: int | None = None,
) -> PipelineSpec:
    """The pipeline layers of a model: embedding, decoder layers (with ``adapter``), norm + fused head and loss.

    Tied embeddings are one matrix wherever one stage holds both ends: with one stage the head reads the
    embedding's weight (``OutputPipe(tied=True)``), trained or frozen. With several stages the embedding is on the
    first and the head on the last: a trained matrix is then one ``TiedLayerSpec`` on both (DeepSpeed keeps the copies
    equal and sums their gradients), a frozen one is read by each of the two from the checkpoint. A frozen matrix
    kept on the CPU (``embeddings_on_cpu``) leaves the head its own copy on the device.

    Args:
        builder: The stage's builder (model, device, base format, trainable parameters, position cache).
        loss_fn: The pipeline's loss; the head binds itself to it.
        adapter: Adds the training method's adapters to each decoder layer, or None.
        embeddings_on_cpu: Keep the frozen embedding matrix in CPU memory (see ``EmbeddingPipe``).
        compile_layers: ``torch.compile`` each decoder layer (see ``DecoderLayerPipe``).
        pipeline_stages: How many stages the layers are spread over; each holds at least one layer, so with two or
            more the embedding and the head are never on the same one. None (not known): the layout for any number,
            the head holding its own copy of a frozen tied matrix and a trained one in a ``TiedLayerSpec``.
        mlp_chunk_tokens: Run each decoder layer's MLP in chunks of this many tokens (``model.long_context``);
            None runs it whole.
    """
    from deepspeed.pipe import LayerSpec, TiedLayerSpec

    source = builder.source
    counts = stage_weights(source)
    decoders = [
        LayerSpec(DecoderLayerPipe, builder, i, adapter, compile=compile_layers, mlp_chunk_tokens=mlp_chunk_tokens)
        for i in range(source.quirks.num_layers)
    ]
    if source.quirks.tie_word_embeddings and pipeline_stages == 1 and not embeddings_on_cpu:
        layers = [
            LayerSpec(EmbeddingPipe, builder, loss_fn),
            *decoders,
            LayerSpec(OutputPipe, builder, loss_fn, tied=True),
        ]
        counts = [*counts[:-1], float(source.num_parameters("model.norm"))]
    elif trains_tied_embeddings(builder):
        weight = "embed_tokens.weight"
        layers = [
            TiedLayerSpec("embeddings", EmbeddingPipe, builder, loss_fn, tied_weight_attr=weight),
            *decoders,
            LayerSpec(OutputPipe, builder, loss_fn, tied=True),
            TiedLayerSpec("embeddings", EmbeddingPipe, builder, loss_fn, forward_fn=tied_head, tied_weight_attr=weight),
        ]
        counts = [*counts[:-1], float(source.num_parameters("model.norm")), counts[0]]
    else:
        embedding = LayerSpec(EmbeddingPipe, builder, on_cpu=embeddings_on_cpu)
        layers = [embedding, *decoders, LayerSpec(OutputPipe, builder, loss_fn)]
    return PipelineSpec(
        layers=layers,
        parameter_counts=counts,
        loss_fn=loss_fn,
        checkpointable_layers=[DecoderLayerPipe.__name__],
    )


__all__ = ["PipelineSpec", "pipeline_spec", "stage_weights", "trains_tied_embeddings"]
