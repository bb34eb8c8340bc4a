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
    for name in ("baseline", "unguided", "guided", "degraded input"):
        assert re.search(rf"\| {name} \| \d+\.\d\d \|", report), name
    pictures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert "loss.png" in pictures and len(pictures) >= 8
    for pic in pictures:
        with Image.open(out / "report" / pic) as img:
            assert img.width > 50 and img.height > 50
    metrics = json.loads((out / "report" / "metrics.json").read_text())
    assert set(metrics) == {"input_psnr", "baseline", "unguided", "guided"}
    # the store holds the tiny pipeline's guidance and the aligned-content group, both complete for test
    facts = json.loads(CliRunner().invoke(app, ["cache", "info", str(out / "demo.zarr"), "--json"]).output)
    assert len(facts["guidance"]) == 2
    assert all(g["splits"]["test"]["missing"] == 0 for g in facts["guidance"].values())
    # rerunning reuses what is there
    again = CliRunner().invoke(app, ["demo", "--out", str(out), "--iters", "4", "--base-iters", "4"])
    assert again.exit_code == 0, again.output
