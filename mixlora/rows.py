"""Which adapter runs on which batch rows: the one object every MixLoRA module of a model consults."""

from __future__ import annotations

from collections.abc import Sequence


class AdapterRows:
    """The adapters of one model (`names`, in injection order), which of them owns which rows of the batch being
    run (`spans`, set by `mixlora.batch_adapters`), and whether the adapters are switched off (`disabled`, set by
    `mixlora.disable_adapter`). A model with one adapter runs it on every row without `batch_adapters`."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.spans: list[tuple[str, int, int]] | None = None  # (name, first row, end row)
        self.num_rows = 0  # rows the spans cover; 1 with one span over a batch of any size
        self.disabled = False

    def current(self, where: str) -> list[tuple[str, int, int]]:
        """The spans of this forward in batch rows: those of `batch_adapters`, or the only adapter on every row
        (end None: all rows)."""
        if self.spans is not None:
            return [(name, 0, None) for name, _, _ in self.spans] if self.num_rows == 1 else list(self.spans)
        if len(self.names) == 1:
            return [(self.names[0], 0, None)]
        raise ValueError(f"{where}: this model has the adapters {self.names}; run it inside "
                         "`with mixlora.batch_adapters(model, names):` (one adapter name per batch row)")

    def slices(self, n: int, where: str) -> list[tuple[str, int, int]]:
        """The spans over a leading dimension of n = rows × (tokens per row): (name, start, end) in that
        dimension."""
        spans = self.current(where)
        if self.spans is None or self.num_rows == 1:
            return [(spans[0][0], 0, n)]
        if n % self.num_rows:
            raise ValueError(f"{where}: leading dimension {n} is not a multiple of the {self.num_rows} rows given "
                             "to batch_adapters")
        per_row = n // self.num_rows
        return [(name, start * per_row, end * per_row) for name, start, end in spans]
