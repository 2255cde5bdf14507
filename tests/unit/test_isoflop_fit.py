"""The isoFLOP fits (megamod/train/isoflop/fit.py) on runs synthesised from a known law.

L(N, D) = E + A/N^α + B/D^β with Chinchilla's fitted constants (E 1.69, A 406.4, B 410.7,
α 0.34, β 0.28) and C = 6·N·D. Minimising L at fixed C gives N_opt = G·(C/6)^(β/(α+β)) with
G = (αA/(βB))^(1/(α+β)): 8.06e7, 2.28e8, 6.45e8 parameters at 1e18, 1e19, 1e20, and the exponent
β/(α+β) = 0.4516. Noise: 0.01 nats per run (a realistic seed-to-seed spread), seeded.
"""

import math

import numpy as np
import pytest

from megamod.train.isoflop.fit import PFLOPS_DAY, isoflop_minimum, loss_power_law, optimal_size_exponent, seed_noise

E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))


def n_opt(c):
    return G * (c / 6) ** (BETA / (ALPHA + BETA))


def synth(c, sizes, rng, noise=0.01):
    n = np.asarray(sizes, float)
    return E + A / n**ALPHA + B / (c / (6 * n)) ** BETA + rng.normal(0, noise, len(n))


def test_known_optimum_is_inside_the_bootstrap_interval():
    rng = np.random.default_rng(0)
    budgets, minima = [1e18, 1e19, 1e20], []
    for c in budgets:
        # 7 sizes over x1/3..x3, off-centre by up to 35%: a sweep guesses the optimum, it does not know it
        sizes = n_opt(c) * np.geomspace(1 / 3, 3, 7) * math.exp(rng.uniform(-0.3, 0.3))
        m = isoflop_minimum(sizes, synth(c, sizes, rng), n_boot=300)
        assert not m["edge"], m["reason"]
        assert m["n_opt_lo"] <= n_opt(c) <= m["n_opt_hi"], (c, n_opt(c), m)
        assert m["n_opt_hi"] / m["n_opt_lo"] < 1.5  # an interval that says something
        minima.append(m)
    a = optimal_size_exponent(budgets, minima)
    assert a["a_lo"] <= BETA / (ALPHA + BETA) <= a["a_hi"], a
    assert a["a"] == pytest.approx(BETA / (ALPHA + BETA), abs=0.03)


def test_a_grid_that_misses_the_optimum_is_flagged():
    rng = np.random.default_rng(1)
    c = 1e19
    above = n_opt(c) * np.geomspace(3, 30, 5)  # every size larger than the optimum
    m = isoflop_minimum(above, synth(c, above, rng, noise=0.002), n_boot=50)
    assert m["edge"] and "edge" in m["reason"], m
    centred = n_opt(c) * np.geomspace(1 / 3, 3, 5)
    assert not isoflop_minimum(centred, synth(c, centred, rng, noise=0.002), n_boot=50)["edge"]
    flat = isoflop_minimum(centred, 3.0 - 0.01 * np.log(centred))  # monotone in log N: no minimum
    assert flat["edge"] and math.isnan(flat["n_opt"])


def test_loss_power_law_and_seed_noise():
    """loss = 2.625·C^-0.063 (MoBA's 8K fit, C in PFLOP/s-days) over 5 budgets is recovered."""
    c = np.geomspace(0.01, 10, 5) * PFLOPS_DAY
    loss = 2.625 * (c / PFLOPS_DAY) ** -0.063 * np.exp(np.random.default_rng(2).normal(0, 1e-3, 5))
    f = loss_power_law(c, loss, n_boot=200)
    assert f["a"] == pytest.approx(2.625, rel=0.01) and f["b_lo"] <= 0.063 <= f["b_hi"], f
    rows = [{"variant": "dense", "budget_flops": 1e16, "d_model": 256, "n_layers": 4, "seq_len": 1024, "loss": v}
            for v in (3.00, 3.02)] + [{"variant": "dense", "budget_flops": 1e16, "d_model": 320, "n_layers": 5,
                                       "seq_len": 1024, "loss": 2.9}]
    noise = seed_noise(rows)  # one repeated config: sd of (3.00, 3.02) = 0.01·sqrt(2)
    assert noise["configs"] == 1 and noise["sigma"] == pytest.approx(0.02 / math.sqrt(2))
