"""`tdr demo` end to end with tiny budgets: every stage runs and the report holds its table and pictures."""

from __future__ import annotations

import json
import re

from PIL import Image
from typer.testing import CliRunner

from tdr.cli import app


def test_demo_writes_report_with_table_and_pictures(tmp_path):
    out = tmp_path / "D"
    result = CliRunner().invoke(app, ["demo", "--out", str(out), "--iters", "4", "--base-iters", "4"])
    assert result.exit_code == 0, result.output
    assert "report:" in result.output
    report = (out / "report" / "README.md").read_text()
    for name in ("baseline", "unguided", "guided: content views", "aligned-content \\(upper bound\\)", "degraded input"):
        assert re.search(rf"\| {name} \| \d+\.\d\d \|", report), name
    assert "upper bound, not evidence" in report
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert "loss.png" in pictures and len(pictures) >= 8
    for pic in pictures:
        with Image.open(out / "report" / pic) as img:
            assert img.width > 50 and img.height > 50
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics) == {"input_psnr", "baseline", "unguided", "guided", "aligned"}
    # the store holds the tiny pipeline's guidance and the two stand-ins, complete for test, each with
    # its provenance; the runs used the search that provenance calls for
    facts = json.loads(CliRunner().invoke(app, ["cache", "info", str(out / "demo.zarr"), "--json"]).output)
    assert sorted(g["provenance"] for g in facts["guidance"].values()) == ["aligned", "generated", "unknown"]
    assert json.loads((out / "runs" / "guided" / "config.json").read_text())["aggregation"]["search"] == "global"
    assert json.loads((out / "runs" / "aligned" / "config.json").read_text())["aggregation"]["search"] == "prior"
    assert all(g["splits"]["test"]["missing"] == 0 for g in facts["guidance"].values())
    # rerunning reuses what is there
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--iters", "4", "--base-iters", "4"])
    assert again.exit_code == 0, again.output
    # issue 14: the total covers both invocations; each grid heading names as many panels as its grids have
    report = (out / "report" / "README.md").read_text()
    times = json.loads((out / "timings.json").read_text())
    assert len(times) == 2 and all(t > 0 for t in times)
    stated = re.search(r"in (\d+\.\d) minutes of wall time over 2 invocations", report)
    assert stated and times[0] / 60 - 0.05 <= float(stated.group(1)) <= sum(times) / 60 + 0.05
    from tdr.demo import RUNS

    panel = "(?:degraded|guidance|restored|clean)"
    headings = re.findall(rf"\*\*([^*]+)\*\* \(({panel}(?: \| {panel})*)\)", report)
    run_of = {label: name for name, label in RUNS.items()}
    assert [run_of.get(label) for label, _ in headings] == ["unguided", "guided", "aligned"]
    for label, panels in headings:
        grids = [p for p in pictures if p.startswith(f"{run_of[label]}/")]
        assert grids and all(_panel_count(out / "report" / g) == len(panels.split(" | ")) for g in grids)


def _panel_count(path) -> int:
    """Panels of an eval grid: runs of all-white separator columns below the label strip, plus one."""
    import numpy as np

    from tdr.guided.evaluate import GRID_LABEL_HEIGHT

    body = np.asarray(Image.open(path).convert("RGB"))[GRID_LABEL_HEIGHT:]
    white = (body == 255).all(axis=(0, 2))
    return int((white[1:] & ~white[:-1]).sum()) + 1
