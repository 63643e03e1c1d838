"""The embedded diarization's two networks run by ONNX Runtime on CPU.

On a 10-minute file (2 cores), torch spent about 8 s in pyannote's segmentation
(SincNet, four LSTM layers, linear heads) and about 12 s in CAM++'s frame-level
trunk. ONNX Runtime (already installed for faster-whisper's Silero VAD) runs the
same networks in roughly 60 % of torch's time, with outputs equal to about
1e-5. Each network is exported from its own weights when the pipeline loads, in
memory: nothing is written to disk and no other weights are needed. If an
export fails, that network stays on torch, with a warning.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def segmentation_on_onnxruntime(model: Any, threads: int, int8: bool = False) -> None:
    """Make `model` (a pyannote segmentation `Model` on CPU) compute its forward pass with ONNX
    Runtime. The model object itself stays, since pyannote's `Inference` reads its
    specifications, receptive field and example output; only `forward` is replaced."""
    import torch

    samples = round(model.specifications.duration * model.hparams.sample_rate)
    example = torch.zeros(2, model.hparams.num_channels, samples)
    session = _session(
        model,
        (example,),
        {"waveforms": {0: "batch", 2: "samples"}},
        {"scores": {0: "batch", 1: "frames"}},
        threads,
        "segmentation",
        quantize=["LSTM"] if int8 else [],
    )
    if session is not None:
        model.forward = _runner(session)  # instance attribute: nn.Module.__call__ finds it first


def campplus_on_onnxruntime(encoder: Any, threads: int) -> None:
    """Make `encoder` (a `CAMPPlus` on CPU) run its masked frame-level trunk with ONNX Runtime;
    its pooling and the unmasked `forward` stay on torch."""
    import torch

    from pipeline.campplus import N_MELS

    lengths = torch.tensor([301, 250, 120])[:, None]  # odd and even lengths, padding in the batch
    full = (torch.arange(301)[None] < lengths).float()
    half = (torch.arange(151)[None] < (lengths + 1) // 2).float()
    session = _session(
        _masked_trunk_module(encoder),
        (torch.zeros(3, 301, N_MELS), full, half),
        {"fbank": {0: "batch", 1: "frames"}, "full": {0: "batch", 1: "frames"}, "half": {0: "batch", 1: "half"}},
        {"trunk": {0: "batch", 2: "half"}},
        threads,
        "CAM++",
    )
    if session is not None:
        encoder.masked_trunk = _runner(session)


def _masked_trunk_module(encoder: Any) -> Any:
    """`CAMPPlus.masked_trunk` as a module's forward, for the exporter to trace."""
    from torch import nn

    class MaskedTrunk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, fbank: Any, full: Any, half: Any) -> Any:
            return type(self.encoder).masked_trunk(self.encoder, fbank, full, half)

    return MaskedTrunk()


def _session(
    module: Any,
    example: tuple,
    inputs: dict[str, dict],
    outputs: dict[str, dict],
    threads: int,
    name: str,
    quantize: list[str] | None = None,
) -> Any:
    """An ONNX Runtime session of `module` traced on `example`; None (and a warning) if that fails."""
    try:
        import onnxruntime
        import torch

        buffer = io.BytesIO()
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # The tracer warns of every Python-level branch on a shape; each here is fixed by the
            # network's structure (which convolution reads which frame rate), not by the input.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                module.eval(),
                example,
                buffer,
                input_names=list(inputs),
                output_names=list(outputs),
                dynamic_axes=inputs | outputs,
                opset_version=17,
                dynamo=False,  # the TorchScript exporter: the dynamo one needs onnxscript
            )
        graph = buffer.getvalue()
        if quantize:
            graph = _quantized(graph, quantize)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        return onnxruntime.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # an exporter or runtime that cannot take this model: torch still can
        log.warning("%s stays on torch: ONNX export failed (%s: %s)", name, type(e).__name__, e)
        return None


def _quantized(graph: bytes, op_types: list[str]) -> bytes:
    """`graph` with the weights of its `op_types` nodes in 8 bits (dynamic quantization)."""
    import tempfile

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "quantized.onnx"
        quantize_dynamic(onnx.load_from_string(graph), out, op_types_to_quantize=op_types, weight_type=QuantType.QInt8)
        return out.read_bytes()


def _runner(session: Any) -> Callable[..., Any]:
    """A torch-tensors-in, torch-tensor-out function running `session` (its first output)."""
    import torch

    names = [i.name for i in session.get_inputs()]

    def run(*tensors: torch.Tensor, **_: Any) -> torch.Tensor:
        # Callers may pass more than the graph takes (pyannote's optional arguments): the first ones count.
        feed = {n: t.detach().cpu().numpy() for n, t in zip(names, tensors[: len(names)], strict=True)}
        return torch.from_numpy(session.run(None, feed)[0])

    return run
