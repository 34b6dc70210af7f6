"""Changes that take effect when called and are undone on `with` exit, as `torch.set_grad_enabled`.

`moekit.route(model, p=0.3)` used to be a generator-based context manager: called without `with` it
returned an object and changed nothing, silently. A function decorated with `applied_now` is written
as a generator that sets up, `yield`s the value, then undoes, and its set-up runs at call time:

    moekit.route(model, p=0.3)            # the model routes with p = 0.3 from now on
    with moekit.route(model, p=0.3):      # ... only inside the block
    handle = moekit.route(model, p=0.3); handle.restore()

The undo goes AFTER the `yield`, not in a `finally`: a handle dropped without `restore()` is garbage-collected at
once (the first line above), and Python then closes its generator by raising GeneratorExit at the `yield`, which
would run a `finally` and silently undo the change. After the `yield` the undo runs only when `restore()` (or
leaving `with`) resumes the generator. A set-up that fails part-way undoes what it did itself, before raising.

Before its undo the generator may `yield Refused(why)` (in a loop) while undoing now would be wrong, e.g. a later
change to the same thing is still in force and restores out of order would leave it changed: `restore()` then
raises RuntimeError(why), changes nothing, and can be called again once the reason is gone.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Generator
from typing import Generic, TypeVar

T = TypeVar("T")


class Refused:
    """What an applied_now generator yields after its `yield value` instead of undoing (see the module doc)."""

    def __init__(self, why: str):
        self.why = why


class Applied(Generic[T]):
    """A change already made; `restore()` (or leaving a `with` block) undoes it, once.

    `value` is what the change yielded (e.g. the layers it touched); `with` returns it."""

    def __init__(self, gen: Generator[T, None, None]):
        self._gen = gen
        self.value = next(gen)  # the set-up runs (and validates) now
        self.restored = False

    def restore(self) -> None:
        """Undo the change (idempotent): resumes the generator after its `yield`, where its undo is."""
        if not self.restored:
            try:
                refused = self._gen.send(None)
            except StopIteration:
                self.restored = True
                return
            if isinstance(refused, Refused):  # nothing undone; restore() may be called again
                raise RuntimeError(refused.why)
            self.restored = True
            raise RuntimeError(f"{self._gen.__qualname__}: an applied_now generator must yield once")

    def __enter__(self) -> T:
        return self.value

    def __exit__(self, *exc) -> bool:
        self.restore()
        return False


def applied_now(fn: Callable[..., Generator[T, None, None]]) -> Callable[..., Applied[T]]:
    """Decorate a set-up / `yield` / undo generator function (see the module doc): calling it applies the change."""

    @functools.wraps(fn)
    def call(*args, **kwargs) -> Applied[T]:
        return Applied(fn(*args, **kwargs))

    return call
