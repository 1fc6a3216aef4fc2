"""The JSON summary of a bench/gpu.sh run: when, on what, and each bench's exit code, seconds and results.

Reads what bench/gpu.sh left in OUT (NAME.rc, NAME.s, NAME.json where the bench writes one, NAME.txt) and
writes OUT/summary.json; prints the path.

    python3 bench/summary.py OUT DEVICE
"""

from __future__ import annotations

import datetime
import json
import sys
from pathlib import Path

BENCHES = ("train_step", "train_step_compile", "loss_memory", "e2e", "data_loader")


def read(path: Path) -> str | None:
    return path.read_text().strip() if path.is_file() else None


def bench_entry(out: Path, name: str) -> dict | None:
    """One bench's exit code (124: its time cap), seconds, JSON results and the last lines it printed."""
    rc = read(out / f"{name}.rc")
    if rc is None:
        return None
    results = read(out / f"{name}.json")
    text = read(out / f"{name}.txt") or ""
    seconds = read(out / f"{name}.s")
    return {
        "rc": int(rc) if rc.lstrip("-").isdigit() else rc,
        "seconds": int(seconds) if seconds else None,
        "results": json.loads(results) if results else None,
        "tail": text.splitlines()[-12:],
    }


def device_info(device: str) -> dict:
    import torch

    name = torch.cuda.get_device_name() if device.startswith("cuda") and torch.cuda.is_available() else "cpu"
    return {"device": name, "torch": torch.__version__}


def main() -> None:
    out, device = Path(sys.argv[1]), sys.argv[2]
    summary = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **device_info(device),
        "benches": {name: entry for name in BENCHES if (entry := bench_entry(out, name)) is not None},
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    print(out / "summary.json")


if __name__ == "__main__":
    main()
