"""Vision-suite recipe variants, one zoo seed per call: TA, TIES and TSV-M over the three zoos.

The full protocol of ``distac reproduce`` (zoo, DisTaC incl. the ideal-zoo control, α on
validation, test split reported), restricted to the three methods whose targets the issue names, so
that several variants × seeds run side by side (one process each, ``OMP_NUM_THREADS=1``). Usage::

    python docs/experiments/vision_variants.py VARIANT SEED OUT_DIR [CACHE_DIR]

``OUT_DIR/<variant>-s<seed>/`` gets the suite's report (results.md, cells.csv, run.json); the zoo
seed is SEED (the report calls it seed 0: it holds one zoo). Variants (each with its reason, stated
before it was run):

* ``default``: the suite's FULL profile (the control, measured on the same machine at the same time).
* ``lr_half``: every fine-tuning lr halved (ideal and smoothed 2.5e-4, long 2e-3), same steps. Task
  arithmetic is exact where the network is linear in its weights around θ_0 (Ortiz-Jimenez et al.,
  NeurIPS 2023); smaller task vectors stay closer to that regime, so they should interfere less.
* ``pre_long``: pre-training 1000 steps instead of 300. Weight disentanglement is a property of the
  pre-trained model; a better-converged digit model gives features the tasks share more of.
* ``wide``: width 192 (6 heads) instead of 128. Disentanglement grows with width (the same paper;
  larger CLIPs merge better, Ilharco et al. 2023). 2.25× the compute of ``default``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path

from distac.reproduce.profile import FULL, QUICK, Profile
from distac.reproduce.train import Recipe
from distac.reproduce.vision import _bar, prior_data_for, run_suite
from distac.reproduce.zoo import build_or_load_zoo

METHODS = ("task_arithmetic", "ties", "tsv_m")
BASE = replace(FULL, methods=METHODS)
VARIANTS: dict[str, Profile] = {
    "default": BASE,
    "lr_half": replace(
        BASE,
        name="lr_half",
        ideal=Recipe(lr=2.5e-4, steps=120),
        long=Recipe(lr=2e-3, steps=240),
        smooth=Recipe(lr=2.5e-4, steps=120, label_smoothing=0.6),
    ),
    "pre_long": replace(BASE, name="pre_long", pretrain_steps=1000),
    "wide": replace(BASE, name="wide", vit=replace(FULL.vit, dim=192, heads=6)),
    "smoke": replace(QUICK, methods=METHODS),  # the CI miniature: checks this script, not the recipe
}


def main() -> None:
    variant, seed, out = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
    cache = Path(sys.argv[4]) if len(sys.argv) > 4 else out / "cache"
    profile = VARIANTS[variant]
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {variant} s{seed}: {msg}", flush=True)

    def zoo_for(_: int):  # the suite counts its seeds from 0; this run's one zoo has seed SEED
        return build_or_load_zoo(profile, cache=cache / variant, seed=seed, progress=_bar(False), log=log, device="cpu")

    run_suite(
        profile,
        zoo_for,
        suite=f"vision ({variant}, zoo seed {seed})",
        out=out / f"{variant}-s{seed}",
        seeds=1,
        progress=False,
        log=log,
        command=" ".join(sys.argv),
        prior_data=prior_data_for(profile),
        device="cpu",
    )


if __name__ == "__main__":
    main()
