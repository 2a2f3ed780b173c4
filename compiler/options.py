"""Options shared by the compile, tune and bench commands, parsed and checked in one place.

The CLI and the Python API both go through here, so a bucket string or an `--rpc` pair is
checked once, with one message.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tvmdeploy.runtime.errors import OptionError
from tvmdeploy.runtime.remote import RpcTarget

__all__ = ["DEFAULT_BUCKETS", "BucketSpec", "RpcTarget", "default_buckets", "parse_buckets"]

#: Shape buckets when none are given and the model does not say its longest sequence.
DEFAULT_BUCKETS = "1,4x32,64,128,256"
#: Sequence lengths default buckets are chosen from, up to the model's own limit.
DEFAULT_SEQS = (32, 64, 128, 256, 512)


#: The symbolic-length function of an artifact: batch 1, any sequence up to the model's limit,
#: for inputs longer than the largest bucket (importer.py adds it, the runtime calls it).
FALLBACK_FUNCTION = "b1_sdyn"


@dataclass(frozen=True)
class BucketSpec:
    """One static shape; each becomes its own Relax function."""

    batch: int
    seq: int
    #: A function name of its own: the symbolic-length fallback (importer.FALLBACK_FUNCTION),
    #: whose `seq` is the longest sequence it takes.
    name: str | None = None

    @property
    def function(self) -> str:
        return self.name or f"b{self.batch}_s{self.seq}"


def default_buckets(max_positions: int | None) -> str:
    """Batch {1, 4} x every default sequence length the model can take (its
    `max_position_embeddings`, at most 512); `DEFAULT_BUCKETS` when the model does not say."""
    if not max_positions or max_positions < 1:
        return DEFAULT_BUCKETS
    seqs = [s for s in DEFAULT_SEQS if s <= max_positions] or [int(max_positions)]
    return "1,4x" + ",".join(map(str, seqs))


def parse_buckets(text: str) -> list[BucketSpec]:
    """'1,4x32,64' -> batch {1,4} x seq {32,64}. Several groups may be joined with ';'."""
    buckets: set[BucketSpec] = set()
    for group in filter(None, (g.strip() for g in text.split(";"))):
        match = re.fullmatch(r"([\d,\s]+)x([\d,\s]+)", group)
        if not match:
            raise OptionError(
                f"bad bucket spec {group!r}; expected BATCHES x SEQS, e.g. '1,4x32,64,128'"
            )
        batches = [int(b) for b in match.group(1).split(",") if b.strip()]
        seqs = [int(s) for s in match.group(2).split(",") if s.strip()]
        if not batches or not seqs or min(batches + seqs) < 1:
            raise OptionError(f"bad bucket spec {group!r}: sizes must be positive integers")
        buckets.update(BucketSpec(b, s) for b in batches for s in seqs)
    if not buckets:
        raise OptionError("no buckets given")
    return sorted(buckets, key=lambda b: (b.batch, b.seq))
