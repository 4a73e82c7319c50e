"""`medseg export`: a trained network as ONNX or TorchScript plus the metadata prediction needs, checked against
torch before anything is written (see :mod:`medseg.export`)."""

from __future__ import annotations

import argparse

from medseg.errors import ConfigError
from medseg.export import export_model
from pipelines.predict import load_trained_model


def run_export_cli(args: argparse.Namespace) -> int:
    if not args.tolerance > 0:
        raise ConfigError("--tolerance", f"expected a positive number, got {args.tolerance}")
    model, meta = load_trained_model(args.model, args.tracking_uri)
    if not hasattr(model, "state_dict"):
        raise ConfigError("--model", f"{args.model} is an export already; export from a checkpoint, a run folder or "
                                     "an MLflow model")
    report = export_model(model, meta, args.format, args.out, tolerance=args.tolerance)
    print(f"exported {args.format} to {report.folder} ({report.file.name} + medseg-model.json); spatial sizes: "
          f"multiples of {report.size_divisor} (the predictor pads windows); largest difference to torch "
          f"{report.max_abs_difference:.2e} on a random batch of {list(report.checked_shape)}")
    print(f"predict with it: medseg predict --model {report.folder} --input SCANS --output OUT")
    return 0
