"""Instance-level wrappers of LightningModule methods that keep the user's signature visible to Lightning.

Lightning decides which arguments to pass to a step from its signature (``batch_idx`` is optional: a
``training_step(self, batch)`` is called without it), following one level of ``__wrapped__``. A wrapper taking
``*args`` hides that signature, so Lightning passes ``batch_idx`` and the user's method raises ``TypeError``. Wrappers
made here carry ``__wrapped__`` pointing at the innermost original, however many guards and injectors are stacked.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature

F = TypeVar("F", bound=Callable[..., Any])


def wraps_method(inner: Callable[..., Any]) -> Callable[[F], F]:
    """Like ``functools.wraps(inner)``, with ``__wrapped__`` set to the innermost original of ``inner``.

    Example:
        >>> class M:
        ...     def step(self, batch):
        ...         return batch
        >>> m = M()
        >>> @wraps_method(m.step)
        ... def outer(*args, **kwargs):
        ...     return m.step(*args, **kwargs)
        >>> @wraps_method(outer)
        ... def outermost(*args, **kwargs):
        ...     return outer(*args, **kwargs)
        >>> takes_batch_idx(outermost)
        False
    """

    def decorate(wrapper: F) -> F:
        functools.update_wrapper(wrapper, inner, updated=())  # not __dict__: markers of other wrappers stay theirs
        wrapper.__wrapped__ = inspect.unwrap(inner)  # type: ignore[attr-defined]
        return wrapper

    return decorate


def takes_batch_idx(step: Callable[..., Any]) -> bool:
    """Whether Lightning passes ``batch_idx`` to this step (the same rule as Lightning's loops)."""
    return is_param_in_hook_signature(step, "batch_idx", min_args=2)
