"""The online replay's record of the decode workers' KV imports (ImportLog) and how the report
shows real pulls next to modelled ones."""

from __future__ import annotations

import asyncio

from orchestrator.replay.live_cluster import ImportLog
from orchestrator.replay.report import DisaggSummary, LatencySummary
from workers.server.disagg import ImportOutcome


def test_each_outcome_lands_in_its_count():
    log = ImportLog()
    log.add(ImportOutcome(6, 2, None), 0.010)  # pulled 6 blocks, 2 held already
    log.add(ImportOutcome(0, 5, None), 0.001)  # every block held: nothing to pull
    log.add(ImportOutcome(0, 1, "no free blocks for the pull", no_room=True), 0.002)
    log.add(ImportOutcome(0, 0, "pull failed: holder gone"), 0.003)
    log.add(ImportOutcome(3, 0, None), 0.030)
    assert log.seconds == [0.010, 0.030]
    assert (log.pulled_blocks, log.skipped_blocks, log.no_room, log.failed) == (9, 8, 1, 1)


def test_watch_times_the_importers_run_and_returns_its_outcome():
    class Importer:
        async def run(self, owner, handle, prompt_token_ids):
            await asyncio.sleep(0.02)
            return ImportOutcome(len(prompt_token_ids) // 4, 0, None)

    importer, log = Importer(), ImportLog()
    log.watch(importer)  # type: ignore[arg-type]
    outcome = asyncio.run(importer.run("r", None, list(range(16))))
    assert outcome == ImportOutcome(4, 0, None)
    assert log.pulled_blocks == 4 and len(log.seconds) == 1 and log.seconds[0] >= 0.02


def summary(**kw) -> DisaggSummary:
    base = {"prefill_workers": 1, "decode_workers": 2,
            "decisions": {"long_prefill": 2, "short_prefill": 1}, "remote": 2, "local": 1,
            "pulls": 2, "pulled_blocks": 9, "skipped_blocks": 1, "no_room": 0,
            "transfer_bytes": 0, "transfer": LatencySummary.of_seconds([0.01, 0.03]),
            "ttft_at_decode": LatencySummary.of_seconds([0.1]), "kv_bytes_per_token": None,
            "bandwidth_gb_s": None}
    return DisaggSummary(**(base | kw))


def test_real_pulls_show_their_transport_and_import_time():
    rows = dict(summary(pulls_failed=1, pulls_by_transport={"grpc": 2}).rows())
    assert rows["KV pulls"] == ("2: 9 blocks (2 over grpc; mocker: no KV bytes); 1 blocks held "
                                "already; 1 failed")
    assert rows["KV import mean / p99"] == "20.00 / 29.80 ms"  # p99 between 10 and 30
    modelled = dict(summary(transfer_bytes=9 * 64 * 1000, kv_bytes_per_token=1000,
                            bandwidth_gb_s=64.0).rows())
    assert modelled["KV pulls"] == "2: 9 blocks, 0.00 GB at 64 GB/s; 1 blocks held already"
    assert "pull time mean / p99" in modelled
