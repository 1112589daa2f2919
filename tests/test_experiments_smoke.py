"""Every experiment end to end at its ``tiny`` size: results.json, PNG plots and report.md.

The ``tiny`` presets are the ``smoke`` protocols shrunk so that each runs in seconds on a CPU;
the smoke and full presets themselves run from the command line (``gaugeopt run``).
"""

from __future__ import annotations

import pytest

from gaugeopt.experiments import experiment_names, read_results, run_experiment


def check_run_folder(path, name):
    results = read_results(path)
    assert results["status"] == "complete", results["error"]
    assert results["experiment"] == name and results["preset"] == "tiny"
    assert results["metrics"], "no metric was recorded"
    assert results["claims"], "no paper claim was evaluated"
    for claim in results["claims"]:
        assert claim["anchor"] and claim["ours"] and claim["reproduced"] in (True, False, None)
        if claim["reproduced"] is None:  # one seed: the verdict says why it is not decided
            assert claim["note"]
            assert claim["verdict"] in ("not decided", "not measurable", "not measurable (instrument)")
    pngs = sorted(p.name for p in path.glob("*.png"))
    assert pngs and all((path / p).stat().st_size > 1000 for p in pngs)
    report = (path / "report.md").read_text()
    assert report.startswith(f"# {name} (tiny preset)") and "## Verdict" in report
    assert all(f"![{p}]({p})" in report for p in pngs)
    return results


@pytest.mark.parametrize("name", experiment_names())
def test_tiny_preset_runs_end_to_end(name, tmp_path):
    results = check_run_folder(run_experiment(name, "tiny", out=tmp_path / name, progress=False), name)
    if name in ("vit", "moe"):
        assert len(results["metrics"]) == 2  # both optimizer arms ran
    if name == "overtrain-lm":
        # AdamW and DDCAdam at weight decay 0 and 0.1, and AdamW without decay on the gains at 0.1
        assert sorted(results["metrics"]) == ["adamw wd=0", "adamw wd=0.1", "adamw-gains-undecayed wd=0.1",
                                              "ddc-adam wd=0", "ddc-adam wd=0.1"]
        dds = results["dds"]["adamw wd=0"]["0"]
        # 7 sites of one block x 4 observables, less the A side of block 0's q, k, v (probe artefacts)
        assert dds["total"] == 22 and len(dds["excluded"]) == 6
        assert dds["metric"].startswith("quotient") and dds["clock"] == "arc-length"
        assert len(dds["series"]["head:output"]["logdet_A"]) == len(dds["steps"]) == len(dds["arc_length"])
        from gaugeopt.dds import VALIDATED_CLOCKS

        cells = [claim for claim in results["claims"] if "readable dead-direction cells" in claim["claim"]]
        assert cells and all(claim["claim"].endswith("arc-length clock)") for claim in cells)
        if "arc-length" not in VALIDATED_CLOCKS:  # a count on an unvalidated clock is not a finding
            assert all(claim["verdict"] == "not measurable (instrument)" for claim in cells)
        regime = [claim for claim in results["claims"] if claim["claim"].startswith("precondition, the collapse")]
        assert regime and regime[0]["verdict"] in ("met", "not met", "not decided")
        assert "gain_mean" in results["curves"]["adamw wd=0.1"]["0"]
        from gaugeopt.experiments.report import terminal_summary

        summary = terminal_summary(results)
        assert summary.startswith("Verdicts: overtrain-lm (tiny preset, 1 seed(s)")
        assert all(claim["claim"] in summary for claim in results["claims"]) and len(results["reading"]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rrr", "modadd-width"])
def test_tiny_preset_with_the_devinterp_llc(name, tmp_path):
    overrides = {"run_llc": True}
    if name == "rrr":
        overrides.update(num_chains=2, num_draws=30, num_burnin_steps=10)
    path = run_experiment(name, "tiny", out=tmp_path / name, progress=False, **overrides)
    results = check_run_folder(path, name)
    assert any("LLC" in c["claim"] for c in results["claims"])
