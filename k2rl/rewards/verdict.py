"""The judge's answer as pydantic models built from a rubric: one key per criterion, each a short
reason then a score (pointwise, integer 0-10) or a preference (pairwise). Reasons come before the
verdict so the judge writes its grounds first. Over-long reasons are cut, not rejected: a grammar
backend may not enforce `maxLength`, and the reason is only for logs."""
from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

SCORE_MAX = 10


def _reason(chars: int):
    return Annotated[str, BeforeValidator(lambda v: str(v)[:chars]), Field(json_schema_extra={"maxLength": chars})]


@lru_cache(maxsize=256)
def verdict_model(criterion_ids: tuple[str, ...], reason_chars: int, pairwise: bool) -> type[BaseModel]:
    # The schema forbids extra keys (so the grammar does not wander); validation ignores them.
    lenient = ConfigDict(extra="ignore", json_schema_extra={"additionalProperties": False})
    if pairwise:
        item = create_model("PairItem", __config__=lenient, reason=(_reason(reason_chars), ...),
                            preferred=(Literal["A", "B", "tie"], ...))
    else:
        item = create_model("PointItem", __config__=lenient, reason=(_reason(reason_chars), ...),
                            score=(int, Field(ge=0, le=SCORE_MAX)))
    fields = {cid: (item, ...) for cid in criterion_ids}
    return create_model("PairwiseVerdict" if pairwise else "Verdict", __config__=lenient, **fields)
