"""Name -> constructor registries used by configs ("dense", "top_k", ...).

A new method registers itself with one decorator in its own file; configs refer to it by
its short lowercase name.
"""
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
  """A mapping from short lowercase names to constructors of one kind."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, T] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator registering `fn` under `name`; a name may be registered once."""
    if name != name.lower() or not name:
      raise ValueError(f"{self.kind} name must be non-empty lowercase, got {name!r}")

    def decorate(fn: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._entries[name] = fn
      return fn

    return decorate

  def get(self, name: str) -> T:
    """The entry for `name`, or a ValueError listing the allowed names."""
    try:
      return self._entries[name]
    except KeyError:
      raise ValueError(
          f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._entries))}"
      ) from None

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._entries))


MODELS: Registry = Registry("model")  # whole models named by configs, e.g. "mlp"
LMS: Registry = Registry("lm architecture")  # model.architecture of task "lm", e.g. "universal"
FFNS: Registry = Registry("ffn")
ATTENTIONS: Registry = Registry("attention")
EMBEDDINGS: Registry = Registry("embedding")  # LM input embeddings other than the plain table
ROUTERS: Registry = Registry("router")
STRUCTURES: Registry = Registry("mask structure")
DISTRIBUTIONS: Registry = Registry("sparsity distribution")
MASK_INITS: Registry = Registry("mask init")
UPDATERS: Registry = Registry("mask updater")
SCHEDULES: Registry = Registry("sparsity schedule")
