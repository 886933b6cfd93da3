"""Per-(device, stream) watermark bookkeeping: which sequence numbers are stored, robust to reordering."""

from __future__ import annotations

import bisect
import json

__all__ = ["StreamState"]


class StreamState:
    """The stored sequence numbers of one device's stream.

    ``watermark``: every seq <= watermark is stored, or was given up by the device (its ``floor``).
    ``ranges``: sorted, disjoint, non-adjacent inclusive ``(first, last)`` ranges stored above
    ``watermark + 1`` — batches that arrived before a gap below them was filled. When the gap fills
    (or a floor passes it) the watermark advances over them. Pure bookkeeping; the store persists it
    (as JSON) in the same transaction as the rows it describes.
    """

    __slots__ = ("changed", "ranges", "watermark")

    def __init__(self, watermark: int = -1, ranges: list[tuple[int, int]] | None = None) -> None:
        self.watermark = watermark
        self.ranges: list[tuple[int, int]] = sorted(ranges or [])
        self.changed = False
        self._normalize()
        self.changed = False

    @classmethod
    def from_json(cls, watermark: int, text: str | None) -> StreamState:
        pairs = json.loads(text) if text else []
        return cls(int(watermark), [(int(a), int(b)) for a, b in pairs])

    def ranges_json(self) -> str:
        return json.dumps([[a, b] for a, b in self.ranges], separators=(",", ":"))

    def stored(self, seq: int) -> bool:
        if seq <= self.watermark:
            return True
        i = bisect.bisect_right(self.ranges, (seq, float("inf"))) - 1
        return i >= 0 and self.ranges[i][0] <= seq <= self.ranges[i][1]

    def apply_floor(self, floor: int) -> None:
        """The device holds nothing <= ``floor`` any more (acknowledged or dropped): advance past it."""
        if floor > self.watermark:
            self.watermark = floor
            self.changed = True
            self._normalize()

    def add(self, first: int, last: int) -> list[tuple[int, int]]:
        """Record ``first..last`` as stored; return the sub-ranges that were not stored before.

        The caller inserts exactly the returned rows, so overlapping or repeated batches never
        store a sequence number twice.
        """
        if last < first:
            raise ValueError("last < first")
        lo = max(first, self.watermark + 1)
        if lo > last:
            return []
        rs = self.ranges
        # i: first range that ends at or after lo - 1 (overlapping or adjacent on the left)
        i = _first_ending_at_or_after(rs, lo - 1)
        new: list[tuple[int, int]] = []
        cur = lo
        j = i
        merged_lo, merged_hi = lo, last
        while j < len(rs) and rs[j][0] <= last + 1:
            a, b = rs[j]
            if a > cur:
                new.append((cur, min(a - 1, last)))
            cur = max(cur, b + 1)
            merged_lo = min(merged_lo, a)
            merged_hi = max(merged_hi, b)
            j += 1
        if cur <= last:
            new.append((cur, last))
        if not new:
            return []
        rs[i:j] = [(merged_lo, merged_hi)]
        self.changed = True
        self._normalize()
        return new

    def _normalize(self) -> None:
        rs = self.ranges
        w = self.watermark
        k = 0
        while k < len(rs) and rs[k][0] <= w + 1:
            w = max(w, rs[k][1])
            k += 1
        if k:
            del rs[:k]
            self.watermark = w
            self.changed = True

    def __repr__(self) -> str:
        return f"StreamState(watermark={self.watermark}, ranges={self.ranges})"


def _first_ending_at_or_after(rs: list[tuple[int, int]], value: int) -> int:
    lo, hi = 0, len(rs)
    while lo < hi:
        mid = (lo + hi) // 2
        if rs[mid][1] < value:
            lo = mid + 1
        else:
            hi = mid
    return lo
