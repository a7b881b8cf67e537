"""The peer benchmark report (hnsample vs torch, faiss-cpu, pytorch-metric-learning, ...).

    python benchmarks/report.py            # full sweep: benchmarks/report.md, report_*.png, report.json
    python benchmarks/report.py --quick    # small sizes, a few seconds

Same as ``python -m hnsample.report`` or ``hnsample report``; see hnsample/report.py for what is
measured and how. Peers come with ``pip install ".[bench]"``.
"""

import sys

from hnsample.report import main

if __name__ == "__main__":
    sys.exit(main())
