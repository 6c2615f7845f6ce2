"""The IsoFLOP fitter on losses drawn from a known Chinchilla-style law.

L(N, D) = E + A / N^alpha + B / D^beta with D = C / (6 N) has its optimum at
N_opt ~ C^(beta / (alpha + beta)) and D_opt ~ C^(alpha / (alpha + beta)): the exponents the
fitter must recover. Two modalities with different laws stand in for text and vision.
"""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import yaml

from megafusion.scaling import isoflop_cli
from megafusion.scaling.plan import plan_sweep, write_plan
from megafusion.scaling.isoflop import (IsoFLOPError, Observation, fit_isoflop, read_csv, read_run_dirs,
                                        write_report)

# (E, A, alpha, B, beta): vision more data-hungry (b = 0.627 vs 0.531), as in the paper
LAWS = {"text": (1.7, 400.0, 0.34, 410.0, 0.30), "image": (0.5, 300.0, 0.42, 500.0, 0.25)}
BUDGETS = (1e17, 1e18, 1e19, 1e20, 1e21)
PNG = b"\x89PNG\r\n\x1a\n"


def loss(modality: str, n, d):
    e, a, alpha, b, beta = LAWS[modality]
    return e + a / np.asarray(n) ** alpha + b / np.asarray(d) ** beta


def exponents(modality: str) -> tuple[float, float]:
    _, _, alpha, _, beta = LAWS[modality]
    return beta / (alpha + beta), alpha / (alpha + beta)


def n_opt(modality: str, compute: float) -> float:
    _, a, alpha, b, beta = LAWS[modality]
    return (alpha * a / (beta * b)) ** (1 / (alpha + beta)) * (compute / 6) ** (beta / (alpha + beta))


def synthetic(noise: float = 0.005, seed: int = 0, sizes: int = 7, width: float = 0.75,
              grid_exponent: float = 0.5) -> list[Observation]:
    """Each budget's grid is centred on a guess that follows C^grid_exponent (the truth only
    at the middle budget), as a real sweep would be."""
    rng = np.random.default_rng(seed)
    out = []
    for m in LAWS:
        for c in BUDGETS:
            centre = n_opt(m, BUDGETS[2]) * (c / BUDGETS[2]) ** grid_exponent
            for n in centre * np.logspace(-width, width, sizes):
                d = c / (6 * n)
                out.append(Observation(c, n, d, m, float(loss(m, n, d) + noise * rng.standard_normal()),
                                       f"{m}@{c:g}/N={n:.3g}"))
    return out


def test_recovers_known_exponents_from_noisy_losses():
    fits = fit_isoflop(synthetic(noise=0.005, seed=1), bootstrap=1000, seed=0)
    assert list(fits) == ["text", "image"]
    for m, fit in fits.items():
        a, b = exponents(m)
        # stated tolerance: 0.02 on each exponent (40 noise seeds gave at most 0.010)
        assert fit.params_law.exponent == pytest.approx(a, abs=0.02), m
        assert fit.tokens_law.exponent == pytest.approx(b, abs=0.02), m
        lo, hi = fit.tokens_law.ci
        assert lo < fit.tokens_law.exponent < hi and lo <= b <= hi, (m, lo, hi)
        lo, hi = fit.params_law.ci
        assert lo <= a <= hi, (m, lo, hi)
        assert fit.bootstrap_kept > 900 and not fit.warnings
        for budget in fit.budgets:  # per-budget optima near the true ones
            assert math.log10(budget.n_opt / n_opt(m, budget.budget)) == pytest.approx(0, abs=0.15)
    assert fits["image"].tokens_law.exponent > fits["text"].tokens_law.exponent + 0.05


def test_noise_free_grid_centred_on_the_optimum_is_exact():
    # the curve's shape in log N around its optimum does not depend on C, so a parabola's
    # vertex is off by the same factor at every budget and the slopes come out exact
    obs = []
    for m in LAWS:
        for c in BUDGETS:
            for n in n_opt(m, c) * np.logspace(-0.6, 0.6, 5):
                obs.append(Observation(c, n, c / (6 * n), m, float(loss(m, n, c / (6 * n))), "exact"))
    fits = fit_isoflop(obs, bootstrap=0)
    for m, fit in fits.items():
        a, b = exponents(m)
        assert fit.params_law.exponent == pytest.approx(a, abs=1e-9)
        assert fit.tokens_law.exponent == pytest.approx(b, abs=1e-9)
        assert fit.params_law.ci is None


def test_optimum_outside_the_grid_is_flagged():
    obs = [Observation(c, n, c / (6 * n), "image", float(loss("image", n, c / (6 * n))), "x")
           for c in BUDGETS for n in n_opt("image", c) * np.logspace(0.4, 1.2, 5)]  # all too big
    fit = fit_isoflop(obs, bootstrap=0, include_extrapolated=True)["image"]
    assert all(b.extrapolated and b.n_opt < min(o.params for o in b.observations) for b in fit.budgets)
    assert all(b.used_in_fit for b in fit.budgets) and fit.excluded_budgets == []
    assert len(fit.warnings) == len(BUDGETS) and "outside the trained sizes" in fit.warnings[0]
    with pytest.raises(IsoFLOPError, match="image: 0 of 5 budgets have N_opt inside"):  # default: none left
        fit_isoflop(obs, bootstrap=0)
    inside = fit_isoflop(synthetic(noise=0.0), bootstrap=0)["image"]
    assert not any(b.extrapolated for b in inside.budgets) and not inside.warnings
    assert all(b.used_in_fit for b in inside.budgets)


# --------------------------------------------------------------------------- extrapolated optima and the laws


def on_grid(modality: str, compute: float, lo: float, hi: float, sizes: int = 5) -> list[Observation]:
    """Noise-free runs at sizes n_opt(C) * 10^lo .. n_opt(C) * 10^hi (lo < 0 < hi: around the optimum)."""
    return [Observation(compute, n, compute / (6 * n), modality, float(loss(modality, n, compute / (6 * n))),
                        f"{modality}@{compute:g}/N={n:.3g}")
            for n in n_opt(modality, compute) * np.logspace(lo, hi, sizes)]


def write_csv(path, observations) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["budget", "params", "tokens", "modality", "loss"])
        writer.writerows([o.budget, o.params, o.tokens, o.modality, o.loss] for o in observations)


def lopsided_sweep() -> list[Observation]:
    """Three budgets centred on the optimum (exact exponents, see the noise-free test) plus a
    fourth, 1e20, whose sizes are all 6x..40x too small: loss still falls at its largest size,
    and the parabola's vertex lands above the grid and off the law (at 0.4..0.5 x N_opt)."""
    return [o for m in LAWS for c in BUDGETS[:3] for o in on_grid(m, c, -0.6, 0.6)] + \
        [o for m in LAWS for o in on_grid(m, BUDGETS[3], -1.6, -0.8)]


def test_extrapolated_optimum_is_left_out_of_the_laws():
    obs = lopsided_sweep()
    fits = fit_isoflop(obs, bootstrap=200, seed=0)
    old = fit_isoflop(obs, bootstrap=200, seed=0, include_extrapolated=True)
    for m in LAWS:
        a, b = exponents(m)
        fit = fits[m]
        assert [x.extrapolated for x in fit.budgets] == [False, False, False, True]
        assert [x.used_in_fit for x in fit.budgets] == [True, True, True, False]
        assert fit.excluded_budgets == [BUDGETS[3]]
        # still reported: the lopsided budget's vertex, above its grid
        assert fit.budgets[3].n_opt > max(o.params for o in fit.budgets[3].observations)
        assert fit.params_law.exponent == pytest.approx(a, abs=1e-6), m
        assert fit.tokens_law.exponent == pytest.approx(b, abs=1e-6), m
        # the bootstrap resamples the three budgets in the fit only: its interval holds the truth
        assert fit.params_law.ci[0] <= a <= fit.params_law.ci[1], (m, fit.params_law.ci)
        assert [w for w in fit.warnings if "1e+20" in w and "left out of the N_opt ~ C^a" in w], fit.warnings
        # --include-extrapolated: the vertex pulls both laws off (the old behaviour)
        assert all(x.used_in_fit for x in old[m].budgets) and old[m].excluded_budgets == []
        assert abs(old[m].params_law.exponent - a) > 0.05, (m, old[m].params_law.exponent, a)
        assert abs(old[m].tokens_law.exponent - b) > 0.05, (m, old[m].tokens_law.exponent, b)
        assert not old[m].params_law.ci[0] <= a <= old[m].params_law.ci[1], (m, old[m].params_law.ci)


def test_fit_cli_reports_the_left_out_budget(tmp_path, capsys):
    path = tmp_path / "lopsided.csv"
    write_csv(path, lopsided_sweep())
    out = tmp_path / "fit"
    assert isoflop_cli.main(["fit", "--csv", str(path), "--out", str(out), "--bootstrap", "50"]) == 0
    captured = capsys.readouterr()
    assert "text   C = 1e+20: N_opt = " in captured.out
    assert "(outside the trained sizes; left out of the law fit)" in captured.out
    assert "text   laws fitted without budget(s) 1e+20: N_opt outside the trained sizes" in captured.out
    assert "warning: text at budget 1e+20: N_opt = " in captured.err and "left out of the N_opt" in captured.err
    report = json.loads((out / "scaling_laws.json").read_text())
    for m, entry in report["modalities"].items():
        assert [b["used_in_fit"] for b in entry["budgets"]] == [True, True, True, False]
        assert [b["extrapolated"] for b in entry["budgets"]] == [False, False, False, True]
        assert entry["excluded_budgets"] == [1e20]
        assert entry["params_law"]["exponent"] == pytest.approx(exponents(m)[0], abs=1e-6)
        assert (out / f"optima_{m}.png").read_bytes()[:8] == PNG

    again = tmp_path / "fit_all"
    assert isoflop_cli.main(["fit", "--csv", str(path), "--out", str(again), "--bootstrap", "50",
                             "--include-extrapolated"]) == 0
    captured = capsys.readouterr()
    assert "(outside the trained sizes; in the law fit)" in captured.out and "laws fitted without" not in captured.out
    report = json.loads((again / "scaling_laws.json").read_text())
    for m, entry in report["modalities"].items():
        assert all(b["used_in_fit"] for b in entry["budgets"]) and entry["excluded_budgets"] == []
        assert abs(entry["params_law"]["exponent"] - exponents(m)[0]) > 0.05
    assert "--include-extrapolated" in isoflop_cli.build_parser()._subparsers._group_actions[0].choices["fit"] \
        .format_help()


def test_fewer_than_two_budgets_left_is_an_error_like_one_budget(tmp_path, capsys):
    # text: one budget around its optimum, one lopsided -> one budget left for the law;
    # image: both around the optimum -> fitted as usual
    obs = on_grid("text", 1e17, -0.6, 0.6) + on_grid("text", 1e18, 0.4, 1.2) + \
        on_grid("image", 1e17, -0.6, 0.6) + on_grid("image", 1e18, -0.6, 0.6)
    with pytest.raises(IsoFLOPError, match=r"text: 1 of 2 budgets have N_opt inside their trained sizes; left out "
                                           r"as extrapolated: 1e\+18 \(N_opt = .* at least two budgets"):
        fit_isoflop(obs, bootstrap=0)
    assert fit_isoflop(obs, bootstrap=0, include_extrapolated=True)["text"].budgets[1].used_in_fit

    path = tmp_path / "one_left.csv"
    write_csv(path, obs)
    out = tmp_path / "fit"
    # as with runs at one budget: the modality is named in one error line, the others are reported (exit 1)
    assert isoflop_cli.main(["fit", "--csv", str(path), "--out", str(out), "--bootstrap", "50"]) == 1
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "text: 1 of 2 budgets" in errors[0] and "the report has image only" in errors[0]
    assert "Traceback" not in captured.err
    text = (out / "scaling_laws.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert list(json.loads(text)["modalities"]) == ["image"]
    assert not (out / "optima_text.png").exists()
    # only that modality: nothing to report (exit 2, the same one line)
    assert isoflop_cli.main(["fit", "--csv", str(path), "--out", str(tmp_path / "none"), "--modalities", "text",
                             "--bootstrap", "0"]) == 2
    assert "error: text: 1 of 2 budgets" in capsys.readouterr().err
    assert isoflop_cli.main(["fit", "--csv", str(path), "--out", str(tmp_path / "all"), "--bootstrap", "0",
                             "--include-extrapolated"]) == 0


# --------------------------------------------------------------------------- degenerate inputs


def test_one_budget_is_refused_naming_the_runs():
    obs = [o for o in synthetic(noise=0) if o.budget == 1e19 and o.modality == "text"]
    with pytest.raises(IsoFLOPError, match=r"only one compute budget \(1e\+19.*text@1e\+19"):
        fit_isoflop(obs)


def test_too_few_sizes_per_budget_are_refused():
    obs = synthetic(noise=0, sizes=2)
    with pytest.raises(IsoFLOPError, match="2 model size.*at least three sizes"):
        fit_isoflop(obs)
    single = [Observation(c, 1e6, c / 6e6, "text", 2.0, f"run{i}") for i, c in enumerate(BUDGETS)]
    with pytest.raises(IsoFLOPError, match=r"1 model size\(s\) \(run0"):
        fit_isoflop(single)


def test_nan_loss_is_refused_naming_the_row(tmp_path):
    path = tmp_path / "losses.csv"
    path.write_text("budget,params,tokens,modality,loss\n1e18,1e6,1e11,text,2.5\n1e18,2e6,5e10,text,nan\n")
    obs = read_csv(path)
    with pytest.raises(IsoFLOPError, match=r"losses.csv line 3: loss is nan"):
        fit_isoflop(obs)


def test_upside_down_curve_is_refused():
    obs = [Observation(c, n, c / (6 * n), "text", 3.0 - (math.log10(n) - 7) ** 2, f"r{c:g}{n:g}")
           for c in BUDGETS[:2] for n in (1e6, 1e7, 1e8)]
    with pytest.raises(IsoFLOPError, match="no minimum.*both sides"):
        fit_isoflop(obs)


def test_bad_csv_files(tmp_path):
    path = tmp_path / "a.csv"
    path.write_text("budget,params,modality,loss\n1,2,text,3\n")
    with pytest.raises(IsoFLOPError, match="lacks column.*tokens"):
        read_csv(path)
    path.write_text("budget,params,tokens,modality,loss\n1e18,abc,1e9,text,2\n")
    with pytest.raises(IsoFLOPError, match="a.csv line 2: params = 'abc' is not a number"):
        read_csv(path)
    with pytest.raises(IsoFLOPError, match="does not exist"):
        read_csv(tmp_path / "missing.csv")


# --------------------------------------------------------------------------- run dirs


def make_run(root, name, hidden, layers, steps, batch=8, seq=64, losses=None, extra_keys=()):
    """A run dir as the trainer writes it; losses of the law at the run's own N and D."""
    run = root / name
    run.mkdir()
    config = {"model": {"hidden_size": hidden, "num_layers": layers, "num_heads": hidden // 16, "vocab_size": 256,
                        "seq_length": seq},
              "train": {"steps": steps, "global_batch_size": batch}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    lines = []
    for step in (1, steps // 2, steps):
        record = {"step": step, "loss": 9.0, "lr": 1e-3}
        for m, value in (losses or {}).items():
            record[f"loss_{m}"] = value if step == steps else value + 1.0
        record.update({k: 1.0 for k in extra_keys})
        lines.append(json.dumps(record))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


FAMILY = {"model": {"vocab_size": 256, "seq_length": 64}, "train": {"global_batch_size": 8},
          "family": {"widths": [32, 48, 64, 96, 128, 192, 256], "aspect_ratio": 16, "head_dim": 16,
                     "min_steps": 20}}


def planned_sweep(root):
    """Runs of a planned sweep, 'trained' to the law's loss at their own N and D."""
    plan_dir = root / "sweep"
    runs = plan_sweep(FAMILY, [3e13, 3e14, 3e15], sizes=5)
    write_plan(FAMILY, runs, plan_dir)
    dirs = []
    for r in runs:
        config = yaml.safe_load((plan_dir / "configs" / f"{r.name}.yaml").read_text())
        run = plan_dir / "runs" / r.name
        run.mkdir(parents=True)
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        records = [{"step": s, "loss": 9.0, **{f"loss_{m}": float(loss(m, r.params, r.tokens)) + (s < r.steps)
                                               for m in LAWS}} for s in (1, r.steps)]
        (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
        dirs.append(run)
    return plan_dir, runs, dirs


def test_fit_from_run_dirs_end_to_end(tmp_path):
    plan_dir, planned, dirs = planned_sweep(tmp_path)
    expected = fit_isoflop([Observation(r.budget, r.params, r.tokens, m, float(loss(m, r.params, r.tokens)), r.name)
                            for r in planned for m in LAWS], bootstrap=0)

    # with the plan: the exact budgets; N and D read back from config.yaml; the final losses
    out = tmp_path / "fit"
    args = ["fit", *map(str, dirs), "--plan", str(plan_dir / "plan.json"), "--out", str(out), "--bootstrap", "200"]
    assert isoflop_cli.main(args) == 0
    report = json.loads((out / "scaling_laws.json").read_text())
    assert list(report["modalities"]) == ["text", "image"]
    for m, entry in report["modalities"].items():
        assert [b["flops"] for b in entry["budgets"]] == [3e13, 3e14, 3e15]
        for kind in ("params_law", "tokens_law"):
            assert entry[kind]["exponent"] == pytest.approx(getattr(expected[m], kind).exponent, abs=1e-9)
            lo, hi = entry[kind]["ci"]
            assert lo <= entry[kind]["exponent"] <= hi
        for kind in ("isoflop", "optima"):
            assert (out / f"{kind}_{m}.png").read_bytes()[:8] == PNG

    # without the plan: budgets recomputed from the configs and grouped
    obs = read_run_dirs(dirs)
    budgets = sorted({o.budget for o in obs})
    assert budgets == pytest.approx([3e13, 3e14, 3e15], rel=0.01)
    unplanned = fit_isoflop(obs, bootstrap=0)
    for m in LAWS:
        assert unplanned[m].tokens_law.exponent == pytest.approx(expected[m].tokens_law.exponent, abs=0.01)


def test_run_dir_problems_are_named(tmp_path):
    good = make_run(tmp_path, "good", 32, 2, 100, losses={"text": 3.0})
    empty = tmp_path / "no_metrics"
    empty.mkdir()
    (empty / "config.yaml").write_text(yaml.safe_dump({"model": {}, "train": {}}))
    with pytest.raises(IsoFLOPError, match="run dir '.*no_metrics' has no metrics.jsonl"):
        read_run_dirs([good, empty])
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(IsoFLOPError, match="run dir '.*bare' has no config.yaml"):
        read_run_dirs([bare])
    diverged = make_run(tmp_path, "diverged", 32, 2, 100, losses={"text": float("nan")})
    with pytest.raises(IsoFLOPError, match="run dir '.*diverged': loss_text at step 100 is nan"):
        read_run_dirs([good, diverged])
    ambiguous = make_run(tmp_path, "ambiguous", 32, 2, 100, extra_keys=("val_loss_text", "train_loss_text"))
    with pytest.raises(IsoFLOPError, match="several text losses.*--loss-key text=KEY"):
        read_run_dirs([ambiguous])
    assert read_run_dirs([ambiguous], loss_keys={"text": "val_loss_text"})[0].loss == 1.0
    unfinished = make_run(tmp_path, "unfinished", 32, 2, 100, losses={"text": 3.0})
    (unfinished / "config.yaml").write_text(yaml.safe_dump({"model": {"hidden_size": 32}, "train": {"steps": 200}}))
    with pytest.raises(IsoFLOPError, match="run dir '.*unfinished' logged up to step 100 of train.steps = 200"):
        read_run_dirs([good, unfinished])
    no_modality = make_run(tmp_path, "no_modality", 32, 2, 100)
    with pytest.raises(IsoFLOPError, match="no per-modality loss"):
        read_run_dirs([no_modality])


# --------------------------------------------------------------------------- CSV and the CLI


def test_fit_csv_cli_writes_json_and_pngs(tmp_path, capsys):
    obs = synthetic(noise=0.003, seed=4)
    path = tmp_path / "published.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["budget", "params", "tokens", "modality", "loss", "note"])
        writer.writerows([o.budget, o.params, o.tokens, o.modality, o.loss, "x"] for o in obs)
    out = tmp_path / "fit"
    assert isoflop_cli.main(["fit", "--csv", str(path), "--out", str(out), "--bootstrap", "300"]) == 0
    assert "image  D_opt ~ C^b, b = 0.6" in capsys.readouterr().out
    report = json.loads((out / "scaling_laws.json").read_text())
    direct = fit_isoflop(read_csv(path), bootstrap=300)
    for m in ("text", "image"):
        assert report["modalities"][m]["tokens_law"]["exponent"] == pytest.approx(direct[m].tokens_law.exponent)
        assert report["modalities"][m]["tokens_law"]["ci"] == pytest.approx(list(direct[m].tokens_law.ci))
        assert (out / f"isoflop_{m}.png").read_bytes()[:8] == PNG
        assert (out / f"optima_{m}.png").stat().st_size > 5000


def test_fit_cli_errors_are_clear(tmp_path, capsys):
    assert isoflop_cli.main(["fit", "--out", str(tmp_path)]) == 2
    assert "either run directories or --csv" in capsys.readouterr().err
    path = tmp_path / "one.csv"
    path.write_text("budget,params,tokens,modality,loss\n" +
                    "".join(f"1e18,{n},{1e18 / 6 / n},text,{2 + abs(math.log10(n) - 7)}\n" for n in (1e6, 1e7, 1e8)))
    assert isoflop_cli.main(["fit", "--csv", str(path), "--out", str(tmp_path / "o")]) == 2
    assert "only one compute budget" in capsys.readouterr().err
    assert isoflop_cli.main(["fit", "--csv", str(path), "--out", str(tmp_path / "o"), "--modalities", "video"]) == 2
    assert "no observations for modality video" in capsys.readouterr().err


def test_modalities_can_be_chosen():
    obs = synthetic(noise=0.0) + [Observation(1e18, 1e6, 1e11, "video", 2.0, "lonely video run")]
    with pytest.raises(IsoFLOPError, match="video: runs at only one compute budget.*lonely video run"):
        fit_isoflop(obs, bootstrap=0)
    assert list(fit_isoflop(obs, bootstrap=0, modalities=["image"])) == ["image"]


def test_write_report_without_bootstrap(tmp_path):
    fits = fit_isoflop(synthetic(noise=0.0), bootstrap=0)
    paths = write_report(fits, tmp_path)
    assert sorted(p.name for p in paths) == sorted(["scaling_laws.json", "isoflop_text.png", "optima_text.png",
                                                    "isoflop_image.png", "optima_image.png"])
    assert json.loads(paths[0].read_text())["modalities"]["text"]["params_law"]["ci"] is None


def test_tokens_of_the_fitted_modality_scale_d_opt_not_the_exponent(tmp_path):
    """--tokens modality: D is the plan's tokens_by_modality of the fitted modality. With a
    fixed mix (here 70 % text, 30 % image positions) D_opt shrinks by the share, b stays."""
    plan_dir, planned, dirs = planned_sweep(tmp_path)
    manifest = json.loads((plan_dir / "plan.json").read_text())
    for entry in manifest["runs"]:
        entry["tokens_by_modality"] = {"text": 0.7 * entry["tokens"], "image": 0.3 * entry["tokens"], "video": 0,
                                       "padding": 0}
    (plan_dir / "plan.json").write_text(json.dumps(manifest))
    everything = fit_isoflop(read_run_dirs(dirs, plan=plan_dir / "plan.json"), bootstrap=0)
    own = fit_isoflop(read_run_dirs(dirs, plan=plan_dir / "plan.json", tokens_kind="modality"), bootstrap=0)
    for m, share in (("text", 0.7), ("image", 0.3)):
        assert own[m].tokens_law.exponent == pytest.approx(everything[m].tokens_law.exponent, abs=1e-9)
        assert own[m].params_law.exponent == pytest.approx(everything[m].params_law.exponent, abs=1e-9)
        for a, b in zip(own[m].budgets, everything[m].budgets):
            assert a.d_opt == pytest.approx(share * b.d_opt, rel=1e-9)

    out = tmp_path / "fit"
    assert isoflop_cli.main(["fit", *map(str, dirs), "--plan", str(plan_dir / "plan.json"), "--out", str(out),
                             "--bootstrap", "0", "--tokens", "modality"]) == 0
    assert json.loads((out / "scaling_laws.json").read_text())["tokens_definition"] == "modality"
    for entry in manifest["runs"]:
        entry["tokens_by_modality"]["image"] = 0
    (plan_dir / "plan.json").write_text(json.dumps(manifest))
    with pytest.raises(IsoFLOPError, match="no image positions in its packing"):
        read_run_dirs(dirs, plan=plan_dir / "plan.json", tokens_kind="modality")


def test_one_modality_without_a_minimum_does_not_hide_the_others(tmp_path, capsys):
    obs = synthetic(noise=0.0, seed=1)
    # image at the largest budget: loss falls faster and faster with N (a curve with a maximum)
    broken = [Observation(o.budget, o.params, o.tokens, o.modality, 5.0 - math.log10(o.params) ** 2, o.source)
              if o.modality == "image" and o.budget == BUDGETS[-1] else o for o in obs]
    path = tmp_path / "partial.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["budget", "params", "tokens", "modality", "loss"])
        writer.writerows([o.budget, o.params, o.tokens, o.modality, o.loss] for o in broken)
    out = tmp_path / "fit"
    assert isoflop_cli.main(["fit", "--csv", str(path), "--out", str(out), "--bootstrap", "0"]) == 1
    captured = capsys.readouterr()
    assert "error: image at budget 1e+21 FLOPs: loss vs log N has no minimum" in captured.err
    assert "the report has text only" in captured.err
    report = json.loads((out / "scaling_laws.json").read_text())
    assert list(report["modalities"]) == ["text"]
    expected_a, _ = exponents("text")
    assert report["modalities"]["text"]["params_law"]["exponent"] == pytest.approx(expected_a, abs=0.02)
    assert not (out / "isoflop_image.png").exists()
    only_image = tmp_path / "image.csv"
    only_image.write_text("".join(line for i, line in enumerate(path.read_text().splitlines(keepends=True))
                                  if i == 0 or ",image," in line))
    assert isoflop_cli.main(["fit", "--csv", str(only_image), "--out", str(tmp_path / "none"), "--bootstrap", "0"]) == 2
