"""A minimum-cost perfect assignment of a square cost matrix (the Hungarian method): used to place
experts on ranks (moekit.dispatch.placement) and to align experts' hidden neurons before merging
(moekit.compress.merge). Legend: E experts, the rows and columns of the cost matrix (an expert's
hidden neurons when aligning experts for merging).
"""

from __future__ import annotations

import numpy as np

__all__ = ["assign_min_cost"]


def assign_min_cost(cost_EE: np.ndarray) -> np.ndarray:
    """Column of each row in a minimum-cost perfect assignment of a square cost matrix.

    The Hungarian method (Kuhn-Munkres) in its O(n^3) shortest-augmenting-path form, with potentials
    u (rows) and v (columns); the inner scan over columns is vectorised.
    """
    n = cost_EE.shape[0]
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=np.int64)  # match[j] = row (1-based) assigned to column j; 0 = none
    way = np.zeros(n + 1, dtype=np.int64)
    for row in range(1, n + 1):
        match[0] = row
        col = 0
        min_slack = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[col] = True
            i0 = match[col]
            slack = cost_EE[i0 - 1] - u[i0] - v[1:]
            free = ~used[1:]
            better = free & (slack < min_slack[1:])
            min_slack[1:][better] = slack[better]
            way[1:][better] = col
            candidates = np.where(free, min_slack[1:], np.inf)
            nxt = int(np.argmin(candidates)) + 1
            delta = candidates[nxt - 1]
            u[match[used]] += delta
            v[used] -= delta
            min_slack[~used] -= delta
            col = nxt
            if match[col] == 0:
                break
        while col:  # augment along the alternating path
            prev = way[col]
            match[col] = match[prev]
            col = prev
    col_of_row = np.empty(n, dtype=np.int64)
    col_of_row[match[1:] - 1] = np.arange(n)
    return col_of_row
