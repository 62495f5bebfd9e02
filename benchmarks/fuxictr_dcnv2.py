"""Reference run: FuxiCTR's DCNv2 on our cached ML-100K KAR-protocol split.

Kept for the command in README.md; it is `fuxictr_baselines.py --models dcnv2`, which runs any
of the nine backbones' FuxiCTR counterparts (see that file and fuxictr_models.py). FuxiCTR is
not a project dependency: run this with a separate interpreter that has it, e.g.

    python3 -m venv /work/venv-fuxi
    /work/venv-fuxi/bin/pip install torch==2.13.0 fuxictr==2.3.10
    /work/venv-fuxi/bin/python benchmarks/fuxictr_dcnv2.py --seeds 1 2 3
"""

from __future__ import annotations

import sys

from fuxictr_baselines import main

if __name__ == "__main__":
    main(["--models", "dcnv2", *sys.argv[1:]])
