"""The processes of a multi-host job agreeing on one decoded cache, through jax.distributed's key-value store
(no devices, no collectives: the cache is built before any computation).

Every process calls `load_dataset` in the same order, so each call gets the same round number on every host and
its keys never collide with an earlier call's. One process is just a Group of one: nothing is exchanged.
"""

from __future__ import annotations

import itertools
import logging
import time

log = logging.getLogger("jaxmed.data")
POLL_MS = 30_000  # a progress line this often while waiting for other hosts
_rounds = itertools.count()


class Group:
    def __init__(self, index: int = 0, count: int = 1, client=None):
        self.index, self.count, self.client = index, count, client
        self.round = next(_rounds) if client is not None else 0

    @classmethod
    def current(cls) -> Group:
        """This process's job: jax.distributed's processes if it was initialised, else this process alone."""
        try:
            from jax._src import distributed
        except ImportError:
            return cls()
        state = distributed.global_state
        if state.client is None or (state.num_processes or 1) == 1:
            return cls()
        return cls(state.process_id, state.num_processes, state.client)

    @property
    def leader(self) -> bool:
        return self.index == 0

    def _key(self, name: str, index: int) -> str:
        return f"jaxmed/data/{self.round}/{name}/{index}"

    def share(self, name: str, value: str, waiting_for: str = "") -> list[str]:
        """Every process's `value` (an all-gather of strings), in process order."""
        if self.client is None:
            return [value]
        self.client.key_value_set(self._key(name, self.index), value)
        return [value if index == self.index else self._get(self._key(name, index), index, waiting_for)
                for index in range(self.count)]

    def broadcast(self, name: str, value: str = "", waiting_for: str = "") -> str:
        """The leader's `value`, on every process."""
        if self.client is None:
            return value
        if self.leader:
            self.client.key_value_set(self._key(name, 0), value)
            return value
        return self._get(self._key(name, 0), 0, waiting_for)

    def _get(self, key: str, index: int, waiting_for: str) -> str:
        start = time.monotonic()
        while True:
            try:
                return self.client.blocking_key_value_get(key, POLL_MS)
            except Exception as error:  # jax raises its runtime error with DEADLINE_EXCEEDED on a timeout
                if "DEADLINE_EXCEEDED" not in str(error) and "timed out" not in str(error).lower():
                    raise
            log.info("process %d of %d: waiting %.0f s for process %d %s", self.index, self.count,
                     time.monotonic() - start, index, waiting_for)
