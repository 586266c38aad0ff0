"""Request side: hostile bytes from the app (see ``request_cases`` for the table and why)."""

from __future__ import annotations

import pytest

from tests.hostile.conftest import MakeRig
from tests.hostile.request_cases import Case, all_cases, run_case
from tests.hostile.target import Reply, Script, UpRequest, answer, reflect

CASES = all_cases()


def _reflect_all_but_get(req: UpRequest) -> Reply:
    return answer(req) if req.method == b"GET" else reflect(req)


def script_for(case: Case) -> Script:
    return _reflect_all_but_get if case.reply == "reflect" else answer


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_request_side(make_rig: MakeRig, case: Case) -> None:
    rig = await make_rig(script_for(case), **dict(case.upstream))
    problems = await run_case(rig, case)
    assert not problems, f"{case.id} ({case.note}):\n" + "\n".join(problems)
