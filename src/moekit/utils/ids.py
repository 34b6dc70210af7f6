"""Bounds checks for tensors of token ids that index a table (an embedding, a hash router's token id ->
experts table, a row of log-probabilities). torch's own errors there are a raw IndexError or a CUDA
device-side assert, and a negative id in plain tensor indexing silently counts from the end of the table.
"""

from __future__ import annotations

import torch

from moekit.errors import UsageError

SHOWN = 5  # bad ids a message names


def check_token_ids(ids: torch.Tensor, limit: int, what: str, table: str = "", *, host: bool = False,
                    noun: str = "token id", error: type[Exception] = UsageError) -> None:
    """Raise `error` (UsageError) unless `ids` (any shape) is an integer tensor with every entry in [0, limit);
    `what` names the ids' user, `table` (optional) what `limit` counts, `noun` what the ids are.

    On CPU: one min/max reduction; the message names `what`, up to five bad ids and the valid range. On
    other devices (CUDA) and under torch.compile: `torch._assert_async`, a device-side assert, so the
    forward path gets no device -> host sync; a bad id then fails later as a RuntimeError (on CUDA at the next
    synchronisation, naming a device-side assert, and the process's CUDA context is unusable after it).
    `host=True` (off the forward path, e.g. analysis): the CPU check on every device, at the cost of one
    synchronisation. On the meta device (shapes only) there is nothing to check."""
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise error(f"{what}: {noun}s must be integers, got a {ids.dtype} tensor; {_expected(limit, table, noun)}")
    if ids.numel() == 0 or ids.device.type == "meta":
        return
    if not host and (ids.device.type != "cpu" or torch.compiler.is_compiling()):
        torch._assert_async(((ids >= 0) & (ids < limit)).all(),
                            f"{what}: a {noun} is out of range; {_expected(limit, table, noun)}")
        return
    lo, hi = torch.aminmax(ids)
    if lo.item() < 0 or hi.item() >= limit:
        flat = ids.reshape(-1)
        bad = flat[(flat < 0) | (flat >= limit)].unique()
        shown = ", ".join(str(i) for i in bad[:SHOWN].tolist())
        if bad.numel() > SHOWN:
            shown += f", ... ({bad.numel()} distinct)"
        raise error(f"{what}: {noun}(s) {shown} out of range; {_expected(limit, table, noun)}")


def _expected(limit: int, table: str, noun: str) -> str:
    return f"expected {noun}s in [0, {limit})" + (f" ({table})" if table else "")
