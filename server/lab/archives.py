"""The package archives `idp-serve prepare` reads, listed for scripts/download_archives.sh.

`python -m server.lab.archives` prints one `dist==version` a line. The pins stay in the modules that use them
(the base model's package in convert, the corpus' in corpus), so this list cannot drift from what prepare reads.
"""

from __future__ import annotations

from server.lab.convert import SMOLLM2
from server.lab.corpus import GENSIM


def prepare_archives() -> list[tuple[str, str]]:
    """(dist, version) of every package archive `idp-serve prepare` reads: the base model's and the corpus'."""
    return [SMOLLM2, GENSIM]


if __name__ == "__main__":
    print("\n".join(f"{dist}=={version}" for dist, version in prepare_archives()))
