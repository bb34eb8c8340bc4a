"""Mapper and cleaner shared like models: the folder layout, a Hub id from a pre-filled offline HF cache,
and a missing one as one line naming it."""

import os
import shutil

import pytest
import torch
from typer.testing import CliRunner

from tdr.errors import ModelNotFoundError
from tdr.cli import app
from tdr.pipeline import fingerprint, load_components
from tdr.pipeline.checkpoint import load_checkpoint, module_checkpoint
from tdr.pipeline.fingerprints import file_sha256, textual_sha256
from tdr.pipeline.pretrained import CONFIG, WEIGHTS, load_pretrained, save_pretrained
from tdr.runs.checkpoint import save

torch.set_num_threads(1)
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny mapper and cleaner with weights unlike the tiny preset's, saved in both formats."""
    root = tmp_path_factory.mktemp("textual")
    models = load_components(preset="tiny")
    with torch.no_grad():
        for module in (models.mapper, models.cleaner):
            for p in module.parameters():
                p.add_(0.01 * torch.randn_like(p))
    for kind in ("mapper", "cleaner"):
        save(root / f"{kind}.pt", module_checkpoint(getattr(models, kind)))
        save_pretrained(getattr(models, kind), root / kind, meta={"step": 7})
    return root, models


def _same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _hub_cache(home, repo: str, folder) -> None:
    """Lay ``folder`` out as the HF cache does after ``huggingface-cli download repo``."""
    snap = home / "hub" / ("models--" + repo.replace("/", "--"))
    rev = "1" * 40
    (snap / "refs").mkdir(parents=True)
    (snap / "refs" / "main").write_text(rev)
    (snap / "blobs").mkdir()
    for src in folder.iterdir():
        blob = snap / "blobs" / file_sha256(src)
        shutil.copy(src, blob)
        link = snap / "snapshots" / rev / src.name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(blob, link)


def test_folder_layout_round_trip_and_loading(trained):
    root, models = trained
    assert sorted(p.name for p in (root / "mapper").iterdir()) == sorted([CONFIG, WEIGHTS])
    for kind in ("mapper", "cleaner"):
        module = load_pretrained(root / kind, kind)
        assert module.config == getattr(models, kind).config and _same(module, getattr(models, kind))
        assert _same(load_checkpoint(root / kind, kind), load_checkpoint(root / f"{kind}.pt", kind))
    m = load_components(preset="tiny", mapper_ckpt=root / "mapper", cleaner_ckpt=root / "cleaner")
    assert _same(m.mapper, models.mapper) and _same(m.cleaner, models.cleaner)
    fp = fingerprint(m)
    assert fp["mapper"] == textual_sha256(root / "mapper") != file_sha256(root / "mapper.pt")
    pt = fingerprint(load_components(preset="tiny", mapper_ckpt=root / "mapper.pt"))
    assert pt["mapper"] == file_sha256(root / "mapper.pt")  # .pt checkpoints keep today's fingerprint
    with pytest.raises(Exception, match="not a schema-1 cleaner folder"):
        load_pretrained(root / "mapper", "cleaner")


def test_hub_id_from_the_offline_cache(trained, offline_home):
    root, models = trained
    _hub_cache(offline_home, "someone/tdr-mapper", root / "mapper")
    _hub_cache(offline_home, "someone/tdr-cleaner", root / "cleaner")
    m = load_components(preset="tiny", mapper_ckpt="someone/tdr-mapper", cleaner_ckpt="someone/tdr-cleaner")
    assert _same(m.mapper, models.mapper) and _same(m.cleaner, models.cleaner)
    assert fingerprint(m)["mapper"] == textual_sha256(root / "mapper")  # same files, same hash


def test_missing_hub_id_is_one_line_naming_it(tmp_path, offline_home):
    with pytest.raises(ModelNotFoundError, match="someone/no-such-mapper"):
        load_components(preset="tiny", mapper_ckpt="someone/no-such-mapper")
    result = runner.invoke(app, ["generate-guidance", "--preset", "tiny", "--steps", "2", "--size", "64", "--device",
                                 "cpu", "--dataset", "demo", "--split", "test", "--store", str(tmp_path / "s.zarr"),
                                 "--mapper", "someone/no-such-mapper"])
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    text = " ".join(lines)
    assert "someone/no-such-mapper" in text and "huggingface-cli download someone/no-such-mapper" in text
    assert "Traceback" not in result.output and lines[0].startswith("error:")
    assert not (tmp_path / "s.zarr").exists()
