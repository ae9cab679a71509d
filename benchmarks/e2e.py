"""End-to-end benchmark: ``duo_compile/tools/bench.py`` (also ``duo-compile bench``), run as a script.

    python benchmarks/e2e.py --patterns DIR --out DIR [--models llama2,llama3] [--backend eager|inductor] ...
"""
import sys

from duo_compile.tools.bench import main

if __name__ == "__main__":
    sys.exit(main())
