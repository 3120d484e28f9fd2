"""Train one method on a toy flow: `python -m fdfo.toy --algorithm fdfo --out runs/toy` (see --help).

`--quick` shrinks the budget to a run of a few seconds on a CPU core (also measures the update direction).
"""

from __future__ import annotations

import json
import sys

from fdfo.cli import guarded
from fdfo.toy.run import ToyConfig, run


def main(argv: list[str] | None = None) -> None:
    import tyro

    argv = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in argv
    if quick:
        argv.remove("--quick")
    default = ToyConfig(evaluations=512, cosine_batches=8, true_grad_samples=2048, out="runs/toy") if quick \
        else ToyConfig()
    cfg = tyro.cli(ToyConfig, default=default, args=argv, description=__doc__)

    def body() -> None:
        result = run(cfg)
        summary = {"final": result["final"], **({"cosine": result["cosine"]} if "cosine" in result else {})}
        print(json.dumps(summary))
        if cfg.out:
            print(f"wrote {cfg.out}/result.json and {cfg.out}/curves.png")

    guarded(body)


if __name__ == "__main__":
    main()
