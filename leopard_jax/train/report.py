"""The run's one metrics writer: metrics.jsonl (for scripts) and TensorBoard event files."""

from __future__ import annotations

import json
import pathlib
import sys
from typing import Any


class Reporter:
    """Appends one record per evaluation/epoch; only process 0 writes (`enabled`)."""

    def __init__(self, workdir: pathlib.Path, enabled: bool):
        self.enabled = enabled
        if enabled:
            from tensorboardX import SummaryWriter

            self.jsonl = open(workdir / "metrics.jsonl", "a")  # closed in close()
            self.tb = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, record: dict[str, Any]) -> None:
        """The record as a JSON line, its numbers as TensorBoard scalars at record["step"]."""
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        for key, value in record.items():
            if isinstance(value, (int, float)) and key not in ("epoch", "step"):
                self.tb.add_scalar(key, value, record["step"])
        self.tb.flush()

    def print(self, record: dict[str, Any]) -> None:
        """One line on stderr: key=value, floats to 4 decimals."""
        if self.enabled:
            text = " ".join(
                f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
            )
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
