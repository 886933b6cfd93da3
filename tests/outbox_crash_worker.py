"""Helper for tests/test_outbox.py: appends numbered readings with their source position until killed.

Reading ``i`` becomes the result row with seq ``i`` (ts ``i``, y_pred ``2i``, x ``[i, i/2]``,
y_true ``i`` for every third reading); the position stored with each batch is the next reading
to take. On start the worker resumes from the stored position and exits 3 if the outbox does
not hand out exactly that sequence number (a lost or repeated reading). It also sends and
acknowledges like an uplink and a cloud would, so deletes and vacuums get killed too.

Usage: python tests/outbox_crash_worker.py DB SEED
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np

from runtime.outbox import Outbox

KEY = "source.file:readings"


def rows_for(first: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    idx = np.arange(first, first + n, dtype=np.float64)
    y_true = np.where(np.arange(first, first + n) % 3 == 0, idx, np.nan)
    return idx, 2.0 * idx, np.stack([idx, idx / 2.0], axis=1), y_true


def main(db: Path, seed: int) -> int:
    rng = random.Random(seed)
    ob = Outbox(db, max_rows=10**8, max_bytes=10**11)
    pos = int(ob.get_meta(KEY) or 0)
    print(f"start {pos}", flush=True)
    now = 0.0
    while True:
        n = rng.randint(1, 2000) if rng.random() < 0.5 else rng.randint(1, 5)  # small ones: commits dominate
        ts, y_pred, x, y_true = rows_for(pos, n)
        first, last = ob.append_results(ts, 1, y_pred, x, y_true, source_key=KEY, source_position=pos + n)
        if (first, last) != (pos, pos + n - 1):
            print(f"MISMATCH position {pos} got seqs {first}..{last}", flush=True)
            return 3
        pos += n
        print(f"committed {pos}", flush=True)
        if rng.random() < 0.3:
            ob.append_message("telemetry", json.dumps({"pos": pos}).encode())
        if rng.random() < 0.3:
            now += 1.0
            claim = ob.claim("results", 3000, now, 30.0)
            if claim is not None:
                ob.mark_sent("results", claim.seq_first, claim.seq_last, now)
                ob.ack("results", claim.seq_last)
            ob.ack("telemetry", ob.next_seq("telemetry") - 2)


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), int(sys.argv[2])))
