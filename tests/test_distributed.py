"""Two gloo processes with local batch B behave as one process with the global batch 2B.

For the Lightly losses with ``gather_distributed=True`` and the OpenCLIP losses with
``world_size=2, rank=r``, over several SGD steps of a tiny model wrapped in DDP:

- loss: each rank's value is the mean over its own anchors (against all global candidates), so
  the mean of the two ranks' values is the single-process value;
- gradients: lightly's gather sums the candidates' gradients over ranks in backward, so the
  gradient a rank gets for its local inputs is W times the single-process gradient of those
  rows, and after DDP's averaging (1/W) the parameter gradient is the single-process one;
- state: both ranks hold identical tables, equal to the single-process tables, including a step
  where one index appears on both ranks (the later occurrence, rank 1's, is written everywhere).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _dist_utils import CASES, LOCAL_BATCH, index_schedule, run_all_cases, run_case, run_on_ranks

# Two gloo processes per case.
pytestmark = pytest.mark.slow

WORLD_SIZE = 2


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    # One process group for all cases: spawning two Python processes is the slow part.
    return run_on_ranks(run_all_cases, tmp_path_factory.mktemp("ranks"), CASES)


@pytest.mark.parametrize("case", CASES)
def test_two_ranks_equal_one_process(case: str, rank_results: list[dict[str, Any]]) -> None:
    single = run_case(case, rank=0, world_size=1)
    ranks = [result[case] for result in rank_results]
    for step in range(len(single["loss"])):
        mean_of_ranks = sum(r["loss"][step] for r in ranks) / WORLD_SIZE
        assert mean_of_ranks == pytest.approx(single["loss"][step], rel=1e-5, abs=1e-6)

        # Rank r's input gradient covers global rows [r*B, (r+1)*B); DDP divides by W.
        input_grad = torch.cat([r["input_grad"][step] for r in ranks]) / WORLD_SIZE
        torch.testing.assert_close(input_grad, single["input_grad"][step], rtol=1e-4, atol=1e-6)
        for name, grad in single["param_grad"][step].items():
            for r in ranks:
                torch.testing.assert_close(r["param_grad"][step][name], grad, rtol=1e-4, atol=1e-6)

    for name, table in single["state"].items():
        assert torch.equal(ranks[0]["state"][name], ranks[1]["state"][name]), name
        torch.testing.assert_close(ranks[0]["state"][name], table, rtol=1e-4, atol=1e-5)


def test_state_covers_both_ranks_and_the_shared_index(rank_results: list[dict[str, Any]]) -> None:
    """The tables hold rank 1's samples on rank 0, and the shared index took rank 1's update."""
    schedule = index_schedule(WORLD_SIZE)
    visited = torch.unique(torch.cat(schedule))
    rank1_only = set(torch.cat([s[LOCAL_BATCH:] for s in schedule]).tolist()) - set(
        torch.cat([s[:LOCAL_BATCH] for s in schedule]).tolist()
    )
    assert rank1_only, "the schedule must give rank 1 indices that rank 0 never sees"
    for case in ("sogclr", "isogclr"):
        log_u = rank_results[0][case]["state"]["log_u"]
        assert torch.isfinite(log_u[visited]).all()
        assert torch.isfinite(log_u[sorted(rank1_only)]).all()
        unvisited = torch.ones_like(log_u, dtype=torch.bool)
        unvisited[visited] = False
        assert torch.isneginf(log_u[unvisited]).all()

    # Step 2 puts global index schedule[2][1] on rank 0 and again on rank 1: one process with
    # the global batch writes the later (rank 1) occurrence, and so must both ranks.
    shared = int(schedule[2][1])
    assert shared == int(schedule[2][LOCAL_BATCH + 2])
    tau = [result["isogclr"]["state"]["tau"] for result in rank_results]
    single_tau = run_case("isogclr", rank=0, world_size=1)["state"]["tau"]
    assert tau[0][shared] == tau[1][shared]
    torch.testing.assert_close(tau[0][shared], single_tau[shared], rtol=1e-4, atol=1e-6)


def test_rank_results_are_written(rank_results: list[dict[str, Any]]) -> None:
    """Both ranks trained every case for every step (guards the comparisons above)."""
    assert len(rank_results) == WORLD_SIZE
    for result in rank_results:
        assert set(result) == set(CASES)
        for case in CASES:
            assert len(result[case]["loss"]) == len(index_schedule(WORLD_SIZE))
