"""A split's rows streamed from a store for a head to train on: chunked HDF5 reads, verified."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from stages.head import Rows
from store.verify import CheckedDataset


class StoredRows(Rows):
    """Rows of a split streamed from a store's features: each chunk of a group read as a contiguous slice, then
    gathered (h5py's fancy indexing is slow); every read verified (a failed checksum is an error, never numbers)."""

    def __init__(self, features: CheckedDataset, labels: np.ndarray, rows: np.ndarray, block_rows: int):
        n, dim = features.shape
        chunk_rows = features.chunks[0] if features.chunks else 1024
        super().__init__(labels, rows, n, dim, features.name, chunk_rows=chunk_rows, block_rows=block_rows)
        self.features = features

    def _gather(self, chunks: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        spans = [(c * self.chunk_rows, min(self.num_stored, (c + 1) * self.chunk_rows)) for c in chunks]
        block = np.concatenate([self.features[a:b] for a, b in spans])
        offsets = np.concatenate([np.arange(a, b) for a, b in spans])
        return torch.from_numpy(block[np.searchsorted(offsets, rows)])

    def whole_pass(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """As Rows.whole_pass, each block read straight into buffers reused from one block to the next: a pass
        over a million rows allocates nothing per block (the allocator's churn cost as much as the reading)."""
        rows = np.sort(self.rows)
        n, i = self.num_stored, 0
        stored = np.empty((min(self.block_rows, n), self.dim), self.features.dtype)
        block = torch.empty((min(self.block_rows, n), self.dim), dtype=torch.float32)
        while i < len(rows):
            start = int(rows[i])
            stop = min(n, start + self.block_rows)
            j = int(np.searchsorted(rows, stop))
            self.features.read_direct(stored, np.s_[start:stop], np.s_[0 : stop - start])
            picked = stored[rows[i:j] - start] if j - i < stop - start else stored[: stop - start]
            out = block[: j - i]
            out.copy_(torch.from_numpy(picked))
            yield out, self.labels[torch.from_numpy(rows[i:j])]
            i = j
