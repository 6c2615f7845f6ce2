"""``megafusion quickstart --seeds``: seeds run once each, reused only with the same options,
summarised as mean and spread with findings only beyond the seed spread."""

import json
import statistics
from pathlib import Path

import pytest


def _metrics(folder: Path, values: dict[str, tuple[float, float | None]]) -> None:
    heads = {e: {"metric": f"{e}_metric", "value": v, "chance": 0.1, "higher_is_better": e != "perplexity",
                 **({"value_unseen": u} if u is not None else {})} for e, (v, u) in values.items()}
    (folder / "eval").mkdir(parents=True, exist_ok=True)
    (folder / "eval" / "metrics.json").write_text(json.dumps({"headlines": heads}))


@pytest.fixture
def fake_quickstart(monkeypatch):
    """run_quickstart replaced by one that writes a report and the evaluations of the main run and
    the moe comparison's variant (values depend on the seed); records the calls."""
    from megafusion import quickstart

    calls = []

    def run(args, scale, steps, trends):
        out, seed = Path(args.out), args.seed
        calls.append(seed)
        out.mkdir(parents=True, exist_ok=True)
        _metrics(out, {"vqa": (0.50 + 0.01 * seed, 0.30 + 0.01 * seed), "perplexity": (2.0 + 0.1 * seed, None)})
        _metrics(out / "trends" / "moe" / "moe", {"vqa": (0.70 + 0.01 * seed, 0.31 + 0.02 * seed),
                                                  "perplexity": (2.05 + 0.1 * seed, None)})
        (out / "report.md").write_text("report\n")
        return 0

    monkeypatch.setattr(quickstart, "run_quickstart", run)
    return calls


def test_seeds_run_once_each_and_the_summary_calls_findings_only_beyond_the_spread(tmp_path, fake_quickstart):
    from megafusion import quickstart

    argv = ["--out", str(tmp_path / "qs"), "--seeds", "0,1,2", "--compare", "moe"]
    assert quickstart.main(argv) == 0
    assert fake_quickstart == [0, 1, 2]
    summary = json.loads((tmp_path / "qs" / "seeds.json").read_text())
    vqa = summary["trends"]["moe"]["moe"]["vqa"]["seen"]
    assert vqa["values"] == pytest.approx([0.70, 0.71, 0.72])
    assert vqa["mean"] == pytest.approx(0.71) and vqa["sd"] == pytest.approx(statistics.stdev([0.70, 0.71, 0.72]))
    report = (tmp_path / "qs" / "seeds.md").read_text()
    assert "| dense | " in report and "| moe | 0.71 ± 0.01 (0.33 ± 0.02) |" in report
    # vqa seen: gap 0.2 > spread 0.02, a finding; unseen: gap 0.02 < spread 0.04, not one
    assert "| vqa | seen | +0.2 | 0.02 | finding: moe better |" in report
    assert "| vqa | unseen | +0.02 | 0.04 | within the seed spread |" in report
    # perplexity: lower is better, gap 0.05 < spread 0.2
    assert "| perplexity | seen | +0.05 | 0.2 | within the seed spread |" in report

    # the same command again reuses every finished seed
    assert quickstart.main(argv) == 0
    assert fake_quickstart == [0, 1, 2]


def test_a_seed_made_with_other_options_is_refused_not_mixed(tmp_path, fake_quickstart, capsys):
    from megafusion import quickstart

    assert quickstart.main(["--out", str(tmp_path / "qs"), "--seeds", "0,1", "--compare", "moe"]) == 0
    code = quickstart.main(["--out", str(tmp_path / "qs"), "--seeds", "0,1", "--compare", "moe", "--steps", "7"])
    assert code == 2
    err = capsys.readouterr().err
    assert "seed0 was made with other options (steps: None)" in err and "another --out" in err
    assert fake_quickstart == [0, 1]


def test_one_seed_is_never_a_finding(tmp_path, fake_quickstart):
    from megafusion import quickstart

    assert quickstart.main(["--out", str(tmp_path / "qs"), "--seeds", "3", "--compare", "moe"]) == 0
    report = (tmp_path / "qs" / "seeds.md").read_text()
    assert "finding:" not in report and "| vqa | seen | +0.2 | 0 | one seed: no verdict |" in report


def test_bad_seeds_are_refused_in_one_line(tmp_path, capsys):
    from megafusion import quickstart

    assert quickstart.main(["--out", str(tmp_path / "qs"), "--seeds", "0,x"]) == 2
    assert "--seeds 0,x: give distinct integers" in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()


def test_seed_beside_seeds_is_refused_not_ignored(tmp_path, capsys):
    from megafusion import quickstart

    with pytest.raises(SystemExit) as exit_info:
        quickstart.main(["--out", str(tmp_path / "qs"), "--seeds", "0,1", "--seed", "5"])
    assert exit_info.value.code == 2 and "--seed 5 has no effect with --seeds 0,1" in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()
