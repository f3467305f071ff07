"""Data-driven parity: every case and manifest entry in shared/fixtures through the same runner as the CLI."""
import json

import pytest

from visionzoo.testing import parity
from conftest import FIXTURES


def _collect():
    if not FIXTURES.exists():
        return [], []
    cases, manifests = parity.collect([FIXTURES])
    entries = [(m, name) for m in manifests for name in json.loads(m.read_text())]
    return cases, entries


CASES, MANIFEST_ENTRIES = _collect()


def _skip_if_unimplemented(result):
    if result.not_implemented:  # a family whose issue is still open; it must pass once its hook exists
        pytest.xfail(result.message)


@pytest.mark.skipif(not CASES, reason=f"no fixtures at {FIXTURES}")
@pytest.mark.parametrize("case_path", CASES, ids=[f"{c.parent.name}/{c.stem}" for c in CASES])
def test_fixture_case(case_path):
    result = parity.run_case_file(case_path)
    _skip_if_unimplemented(result)
    assert result.ok, result.line()


@pytest.mark.skipif(not MANIFEST_ENTRIES, reason=f"no manifests at {FIXTURES}")
@pytest.mark.parametrize("manifest,variant", MANIFEST_ENTRIES,
                         ids=[f"{m.parent.name}/{v}" for m, v in MANIFEST_ENTRIES])
def test_manifest_entry(manifest, variant):
    family = manifest.parent.name
    try:
        hook = parity.family_hook(family)
    except parity.FamilyNotImplemented as e:
        pytest.xfail(str(e))
    entry = json.loads(manifest.read_text())[variant]
    result = parity.run_manifest_entry(hook, family, variant, entry)
    assert result.ok, result.line()


def test_compare_detects_differences():
    import torch

    ok, mabs, _, _ = parity.compare(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.1]), atol=1e-5, rtol=1e-4)
    assert not ok and abs(mabs - 0.1) < 1e-6
    ok, _, _, msg = parity.compare(torch.zeros(2, 3), torch.zeros(3, 2), 1e-5, 1e-4)
    assert not ok and "shape" in msg
    assert parity.compare(torch.ones(3), torch.ones(3) + 1e-7, 1e-5, 1e-4)[0]


def test_runner_reports_unimplemented_family(tmp_path):
    case = {"family": "nosuchfamily", "case": "x", "atol": 1e-5, "rtol": 1e-4}
    (tmp_path / "x.json").write_text(json.dumps(case))
    result = parity.run_case_file(tmp_path / "x.json")
    assert not result.ok and result.not_implemented and "not implemented" in result.message
    assert parity.main([str(tmp_path)]) == 1
