"""A pyannote segmentation model run by ONNX Runtime on CPU.

pyannote's segmentation (SincNet, four LSTM layers, linear heads) took about
40 % of the embedded diarization's time on CPU: 8 s of 20 s on a 10-minute
file, 2 cores. ONNX Runtime (already installed for faster-whisper's Silero VAD)
runs the same network in about 60 % of torch's time, with outputs equal to
4e-5. The model is exported from its own weights when the pipeline loads, in
memory: nothing is written to disk and no other weights are needed.
"""

from __future__ import annotations

import io
import logging
from typing import Any

log = logging.getLogger(__name__)


def run_with_onnxruntime(model: Any, threads: int) -> None:
    """Make `model` (a pyannote segmentation `Model` on CPU) compute its forward pass with ONNX
    Runtime. The model object itself stays, since pyannote's `Inference` reads its
    specifications, receptive field and example output; only `forward` is replaced.
    Leaves the model as it is, with a warning, if the export fails."""
    try:
        session = _session(model, threads)
    except Exception as e:  # an exporter or runtime that cannot take this model: torch still can
        log.warning("segmentation stays on torch: ONNX export failed (%s: %s)", type(e).__name__, e)
        return
    model.forward = _forward(session)  # instance attribute: nn.Module.__call__ finds it first


def _session(model: Any, threads: int) -> Any:
    import onnxruntime
    import torch

    example = torch.zeros(
        2, model.hparams.num_channels, round(model.specifications.duration * model.hparams.sample_rate)
    )
    buffer = io.BytesIO()
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(
            model.eval(),
            (example,),
            buffer,
            input_names=["waveforms"],
            output_names=["scores"],
            dynamic_axes={"waveforms": {0: "batch", 2: "samples"}, "scores": {0: "batch", 1: "frames"}},
            opset_version=17,
            dynamo=False,  # the TorchScript exporter: the dynamo one needs onnxscript
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def _forward(session: Any):
    import torch

    def forward(waveforms: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        (scores,) = session.run(None, {"waveforms": waveforms.detach().cpu().numpy()})
        return torch.from_numpy(scores)

    return forward
