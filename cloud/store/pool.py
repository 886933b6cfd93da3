"""A small blocking connection pool: the store's calls may come from several worker threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

from cloud.errors import StoreError

__all__ = ["Pool"]

C = TypeVar("C")


class Pool(Generic[C]):
    """Up to ``max_size`` connections made by ``factory``; :meth:`acquire` waits up to ``timeout`` s."""

    def __init__(self, factory: Callable[[], C], closer: Callable[[C], None], max_size: int, timeout: float) -> None:
        if max_size < 1:
            raise ValueError("max_size must be >= 1")
        self._factory = factory
        self._closer = closer
        self._max = max_size
        self._timeout = timeout
        self._idle: list[C] = []
        self._count = 0
        self._closed = False
        self._cond = threading.Condition()

    def acquire(self) -> C:
        with self._cond:
            while True:
                if self._closed:
                    raise StoreError("the store is closed")
                if self._idle:
                    return self._idle.pop()
                if self._count < self._max:
                    self._count += 1
                    break
                if not self._cond.wait(self._timeout):
                    raise StoreError(f"no database connection free after {self._timeout:g} s")
        try:
            return self._factory()
        except BaseException:
            with self._cond:
                self._count -= 1
                self._cond.notify()
            raise

    def release(self, conn: C, broken: bool = False) -> None:
        with self._cond:
            if broken or self._closed:
                self._count -= 1
                drop = True
            else:
                self._idle.append(conn)
                drop = False
            self._cond.notify()
        if drop:
            try:
                self._closer(conn)
            except Exception:  # a broken connection may fail to close; it is gone either way
                pass

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._count -= len(idle)
            self._cond.notify_all()
        for conn in idle:
            try:
                self._closer(conn)
            except Exception:
                pass
