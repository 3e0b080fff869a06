"""The synthetic source's registration: K2's deterministic generator (the `k2_synthetic` package
under data/) writes an ASX-format folder, which is then read as `asx-csv` reads one."""

from __future__ import annotations

from pathlib import Path

from k2.sources.asx import AsxFolder


class SyntheticSource(AsxFolder):
    """`k2 ingest synthetic`: generated ASX ticks, read as an ASX-format folder."""

    name = "synthetic"
    command: tuple[str, ...] = ("ingest", "synthetic")
    continuous = False
    description = "K2's deterministic synthetic tick generator"

    def generate(self, out: Path, *, symbols: int = 4, days: int = 2, seed: int = 42) -> Path:
        """Write the ticks of `symbols` listings over `days` trading days under `out`; returns `out`."""
        from k2_synthetic import generate  # data/: only the CLI and tests generate

        return generate(out, symbols=symbols, days=days, seed=seed)
