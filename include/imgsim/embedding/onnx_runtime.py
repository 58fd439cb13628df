"""ONNX Runtime for the backbones: export once, cache by weights, run fp32 or static int8 on CPU.

* ``onnx``: the backbone exported with ``torch.onnx.export`` (dynamo exporter, dynamic batch
  dimension), run by ONNX Runtime's CPU provider. Its vectors equal PyTorch's within float
  rounding.
* ``onnx-int8``: the same graph after ONNX Runtime's static quantization (QDQ format, per-channel
  uint8 weights and uint8 activations: "U8U8"). Signed int8 weights (U8S8) saturate the 16-bit
  intermediate sums of x86 CPUs without VNNI (ONNX Runtime's documented caveat): on such a CPU
  efficientnet_lite0's U8S8 vectors fell to cosine 0.80 with fp32 on 40 real photos; U8U8 keeps
  0.988 at worst (7-bit signed weights, the other remedy, 0.955). The activation ranges are
  calibrated on a fixed, deterministic set of images drawn by
  :func:`imgsim.imaging.synthetic_car`, so the index and the query side rebuild the very same int8
  model anywhere, offline, without the reference data.

Exported files are cached in a folder (IMGSIM_MODEL_CACHE, ``~/.cache/imgsim/models``: one per
machine, shared by its data roots), named by the backbone, the weights' sha256, the variant and
the opset, and written atomically (a crash or two concurrent exports leave either no file or a
complete one).

onnx, onnxruntime and torch are imported inside functions only.
"""

from __future__ import annotations

import io
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgsim.fsutil import TMP_PREFIX, atomic_copy, atomic_write_bytes

if TYPE_CHECKING:
    import torch
    from PIL.Image import Image

log = logging.getLogger(__name__)

OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
#: The calibration set of onnx-int8: (classes x variants) synthetic drawings; part of the key.
#: Bump it whenever imgsim.imaging.synthetic_car or the quantization options change, so that no
#: data root keeps using an int8 file made from another calibration.
CALIBRATION = "synthetic-v2"
CALIBRATION_CLASSES = 6
CALIBRATION_VARIANTS = 8


class OnnxRuntimeError(RuntimeError):
    """The ONNX path cannot be used (missing package, failed export, unusable device)."""


def model_file(cache_dir: Path, name: str, weights_sha256: str, runtime: str) -> Path:
    """The cached ONNX file for a backbone, its weights and a runtime (``onnx``/``onnx-int8``)."""
    key = weights_sha256[:16] if weights_sha256 else "seed0"
    variant = "fp32" if runtime == "onnx" else f"int8-{CALIBRATION}"
    return cache_dir / f"{name}-{key}-{variant}-opset{OPSET}.onnx"


def export_onnx(model: torch.nn.Module, path: Path) -> Path:
    """Export ``model`` (N x 3 x 224 x 224 -> N x dim) to one self-contained ONNX file."""
    import torch

    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()  # type: ignore[call-overload]
    example = torch.zeros(2, 3, 224, 224)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
    except Exception as exc:
        raise OnnxRuntimeError(f"ONNX export of the backbone failed: {exc}") from exc
    if program is None:
        raise OnnxRuntimeError("ONNX export returned nothing")
    proto = program.model_proto
    atomic_write_bytes(path, proto.SerializeToString())
    log.info("exported the backbone to %s (%d bytes)", path, path.stat().st_size)
    return path


def calibration_batches(
    preprocess: Callable[[Image], torch.Tensor], batch_size: int = 8
) -> list[np.ndarray]:
    """The deterministic calibration set, preprocessed like real inputs, in batches."""
    from PIL import Image as PILImage

    from imgsim.imaging import synthetic_car

    arrays = []
    for cls in range(CALIBRATION_CLASSES):
        for variant in range(CALIBRATION_VARIANTS):
            with PILImage.open(io.BytesIO(synthetic_car(cls, variant))) as im:
                arrays.append(preprocess(im.convert("RGB")).numpy())
    stacked = np.stack(arrays).astype(np.float32)
    return [stacked[i : i + batch_size] for i in range(0, len(stacked), batch_size)]


def quantize_int8(fp32_path: Path, out_path: Path, batches: list[np.ndarray]) -> Path:
    """Static 8-bit quantization (QDQ, U8U8, per-channel) of ``fp32_path`` into ``out_path``."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{INPUT_NAME: b} for b in batches])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=TMP_PREFIX, dir=out_path.parent) as tmp:
        pre = Path(tmp) / "pre.onnx"
        quantized = Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(pre))
        quantize_static(
            str(pre),
            str(quantized),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QUInt8,
        )
        atomic_copy(quantized, out_path)
    log.info(
        "quantized %s to int8 -> %s (%d bytes)", fp32_path.name, out_path, out_path.stat().st_size
    )
    return out_path


def ensure_model_file(
    model: torch.nn.Module,
    preprocess: Callable[[Image], torch.Tensor],
    name: str,
    weights_sha256: str,
    runtime: str,
    cache_dir: Path,
) -> Path:
    """The cached ONNX file for ``runtime``; export (and quantize) it first when missing."""
    if runtime not in ("onnx", "onnx-int8"):
        raise ValueError(f"runtime {runtime!r} has no ONNX file (use onnx or onnx-int8)")
    fp32 = model_file(cache_dir, name, weights_sha256, "onnx")
    if not fp32.exists():
        export_onnx(model, fp32)
    if runtime == "onnx":
        return fp32
    int8 = model_file(cache_dir, name, weights_sha256, runtime)
    if not int8.exists():
        quantize_int8(fp32, int8, calibration_batches(preprocess))
    return int8


@dataclass
class OnnxRunner:
    """Runs an ONNX backbone on a batch: float32 N x 3 x H x W -> float32 N x dim."""

    path: Path
    session: Any  # onnxruntime.InferenceSession

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        x = np.ascontiguousarray(batch.detach().cpu().numpy(), dtype=np.float32)
        try:
            out = self.session.run([OUTPUT_NAME], {INPUT_NAME: x})[0]
        except Exception as exc:  # onnxruntime's own errors
            raise OnnxRuntimeError(
                f"ONNX Runtime failed on a batch of {x.shape} with {self.path}: "
                f"{str(exc).strip().splitlines()[0][:300]}"
            ) from exc
        return np.asarray(out, dtype=np.float32)


def open_runner(path: Path, num_threads: int = 0) -> OnnxRunner:
    """An ONNX Runtime CPU session on ``path`` (``num_threads`` intra-op threads, 0 = cores)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise OnnxRuntimeError(
            "IMGSIM_RUNTIME=onnx/onnx-int8 needs the onnxruntime package (pip install onnxruntime)"
        ) from exc
    options = ort.SessionOptions()
    options.intra_op_num_threads = num_threads or (os.cpu_count() or 1)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    # No busy-waiting between ops: the decode threads need those cycles. Measured on 2 cores,
    # 96 photos, onnx-int8: 54 vs 45 images/s end to end, 85 vs 72 forward only.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own errors (InvalidProtobuf, Fail, ...)
        raise OnnxRuntimeError(
            f"ONNX Runtime cannot load {path}: {str(exc).strip().splitlines()[0][:300]}. "
            "Delete the file to export it again (a published embedder: `imgsim rollback` to "
            "a version whose embedder is whole)"
        ) from exc
    return OnnxRunner(path, session)
