"""Train one method on a toy flow: `python -m fdfo.toy --algorithm fdfo --out runs/toy` (see --help).

`--quick` shrinks the budget to a run of a few seconds on a CPU core (also measures the update direction) and says in
one sentence what it did: a check that the tool works, not a result (docs/toy.md has the comparison). A run that
diverges (the evaluated reward becomes NaN or infinite) stops, says so in an `error:` line and exits with status 2;
its result.json keeps the curve up to there.
"""

from __future__ import annotations

import json
import sys

from fdfo.cli import guarded
from fdfo.errors import RunError
from fdfo.threads import single_thread_if_tiny
from fdfo.toy.run import ToyConfig, run

QUICK = dict(evaluations=512, cosine_batches=8, true_grad_samples=2048, out="runs/toy")


def quick_sentence(result: dict) -> str:
    """One sentence for --quick: what ran, the reward before and after, the direction check; and that it is no
    result."""
    cfg, curve = result["config"], result["curve"]
    cosine = f", update direction at cosine {result['cosine']['expected']:.2f} to the true gradient" \
        if result.get("cosine") and result["cosine"]["expected"] is not None else ""
    prompts = f"{cfg['prompts']} prompt{'s' if cfg['prompts'] > 1 else ''}"
    return (f"quick check: {cfg['algorithm']} on the {cfg['dim']}-D toy flow ({prompts}, "
            f"{cfg['reward']} reward) went from reward {curve[0]['reward']:.4f} to {curve[-1]['reward']:.4f} in "
            f"{curve[-1]['evaluations']} reward evaluations{cosine}; this {len(curve)}-point curve only shows that "
            "the tool works and is not a result (docs/toy.md has the comparison of the methods).")


def main(argv: list[str] | None = None) -> None:
    import tyro

    single_thread_if_tiny(True)  # toy flows: one CPU thread unless OMP_NUM_THREADS is set (fdfo/threads.py)
    argv = list(sys.argv[1:] if argv is None else argv)
    quick = "--quick" in argv
    if quick:
        argv.remove("--quick")
    default = ToyConfig(**QUICK) if quick else ToyConfig()
    cfg = tyro.cli(ToyConfig, default=default, args=argv, prog="python -m fdfo.toy", description=__doc__)

    def body() -> None:
        result = run(cfg)
        wrote = f"wrote {cfg.out}/result.json and {cfg.out}/curves.png" if cfg.out else ""
        if result["diverged"] is not None:
            if wrote:
                print(wrote)
            raise RunError(f"the run diverged at {result['diverged']} evaluations: the evaluated reward became NaN "
                           f"or infinite{' (result.json keeps the curve up to there)' if cfg.out else ''}. Lower "
                           f"--lr (now {cfg.lr:g}) or the trust region (--clip {cfg.clip:g}).")
        if quick:
            print(quick_sentence(result))
        else:
            print(json.dumps({"final": result["final"], **({"cosine": result["cosine"]} if "cosine" in result
                                                            else {})}))
        if wrote:
            print(wrote)

    guarded(body)


if __name__ == "__main__":
    main()
