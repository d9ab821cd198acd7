"""The ``torch`` benchmark section without PyTorch: a clear message, no failure."""

from verification import bench_torch


def test_torch_section_skips_with_a_message_without_torch(monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench_torch, "torch_available", lambda: False)
    res = bench_torch.bench_torch(quick=True)
    assert res["rows"] == [] and res["checks"] == []
    assert "PyTorch is not installed" in res["skipped"]
    assert "PyTorch is not installed" in capsys.readouterr().out
    assert "PyTorch is not installed" in "\n".join(bench_torch.render(res))
