"""`make bench`: run every benchmark in turn; each writes bench/results/<name>.md.

`python -m bench [name ...]` runs only the named ones.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import time

BENCHES = [
    "transport",
    "curve",
    "update_rule",
    "sync_vs_ddp",
    "compression",
    "time_to_accuracy",
    "onebit_optimizers",
    "convergence",
    "workloads",
    "operator",
]


def main(argv: list[str]) -> int:
    names = argv or BENCHES
    failed = []
    for name in names:
        t0 = time.time()
        print(f"\n# bench/{name}\n", flush=True)
        try:
            mod = importlib.import_module(f"bench.{name}")
            if not hasattr(mod, "main"):  # a package whose entry point is its __main__
                mod = importlib.import_module(f"bench.{name}.__main__")
            # Benches that parse flags get none here (not `make bench`'s own argv).
            takes_argv = "argv" in inspect.signature(mod.main).parameters
            mod.main([]) if takes_argv else mod.main()
        except Exception as err:  # one broken bench must not hide the others' results
            failed.append(name)
            print(f"bench/{name} FAILED: {type(err).__name__}: {err}", flush=True)
        print(f"\n(bench/{name}: {time.time() - t0:.0f}s)", flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
