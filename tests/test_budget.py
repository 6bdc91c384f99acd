"""The decode budget: concurrent decodes in one worker never hold more memory than it allows."""

from __future__ import annotations

import io
import threading
import time

from PIL import Image

from curate.stages.download.budget import Budget, OverBudget
from curate.demo.server import FaultServer
from curate.stages.download.config import DownloadConfig
from curate.stages.download.stage import DownloadStage


def test_budget_bounds_what_threads_hold_at_once():
    budget = Budget(10)
    inside, most = [0], [0]
    lock = threading.Lock()

    def work(amount: int) -> None:
        with budget.hold(amount):
            with lock:
                inside[0] += amount
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= amount

    threads = [threading.Thread(target=work, args=(a,)) for a in [4] * 8 + [10, 3, 3]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(t.is_alive() for t in threads)
    assert most[0] == budget.peak == 10 and budget.held == 0  # the whole budget at once, never more
    small = Budget(10)
    with small.hold(6):
        assert small.held == 6


def test_amount_over_capacity_is_refused_not_run_alone():
    """Running it alone once the budget is empty would let one request break the bound the budget exists for."""
    budget = Budget(10)
    outcome = []

    def request() -> None:
        try:
            with budget.hold(15):
                outcome.append("ran")
        except OverBudget as err:
            outcome.append(err)

    thread = threading.Thread(target=request)
    with budget.hold(4):
        thread.start()
        thread.join(timeout=2)  # refused at once: it does not queue behind the 4 held here
        refused_while_held = not thread.is_alive()
    thread.join(timeout=10)
    assert [type(item).__name__ for item in outcome] == ["OverBudget"] and refused_while_held
    assert (outcome[0].amount, outcome[0].capacity) == (15, 10)
    assert budget.held == 0 and budget.peak == 4


def test_download_stage_decodes_large_images_within_its_budget(tmp_path, download_outcomes):
    files = tmp_path / "files"
    files.mkdir()
    for i in range(12):  # 2000 × 1500 PNGs: ~12 MB each decoded, a few KB on the wire
        buffer = io.BytesIO()
        Image.new("RGB", (2000, 1500), (i * 20, 100, 50)).save(buffer, "PNG")
        (files / f"{i}.png").write_bytes(buffer.getvalue())
    stage = DownloadStage(DownloadConfig(allow_private_networks=True, threads=12, decode_memory_mb=40,
                                         respect_robots_txt=False, image_size=64))
    with FaultServer(files) as server:
        outcomes = download_outcomes(stage, [server.url("img", f"{i}.png") for i in range(12)])
    assert outcomes == [("ok", None)] * 12
    assert 12_000_000 <= stage._decode_budget.peak <= 40 * 2**20  # decodes overlapped, but only within the budget


def test_download_stage_refuses_an_image_larger_than_its_whole_budget(tmp_path, download_outcomes):
    files = tmp_path / "files"
    files.mkdir()
    buffer = io.BytesIO()  # 3000 × 3000 with alpha: ~80 MB at the decode's peak, a few KB on the wire
    Image.new("RGBA", (3000, 3000), (200, 100, 50, 128)).save(buffer, "PNG")
    (files / "large.png").write_bytes(buffer.getvalue())
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (20, 100, 50)).save(buffer, "PNG")
    (files / "small.png").write_bytes(buffer.getvalue())
    stage = DownloadStage(DownloadConfig(allow_private_networks=True, threads=4, decode_memory_mb=16,
                                         respect_robots_txt=False, image_size=64))
    with FaultServer(files) as server:
        outcomes = download_outcomes(stage, [server.url("img", name) for name in ("large.png", "small.png")])
    assert outcomes == [("failed", "decode:over_budget"), ("ok", None)]
    assert stage._decode_budget.peak <= 16 * 2**20
