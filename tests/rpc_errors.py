"""Test helpers that read a failed call's status code, reason and field violations."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

DETAILS_KEY = "grpc-status-details-bin"


@dataclass
class RpcFailure:
    code: grpc.StatusCode
    message: str
    reason: str
    fields: dict[str, str]
    request_id: str


def failure(error: grpc.RpcError) -> RpcFailure:
    """Unpacks the google.rpc.Status crewdb puts in the trailers of every failed call."""
    assert isinstance(error, grpc.Call)
    call = error
    trailers = dict(call.trailing_metadata() or ())
    raw = trailers.get(DETAILS_KEY)
    assert raw is not None, f"no rich status in {call.code()}: {call.details()}"
    status = status_pb2.Status.FromString(raw)
    reason, request_id, fields = "", "", {}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert info.domain == "crewdb.v1"
            reason, request_id = info.reason, info.metadata["request_id"]
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            fields = {v.field: v.description for v in bad.field_violations}
    assert status.code == call.code().value[0], "status trailer disagrees with the call's code"
    return RpcFailure(call.code(), call.details() or "", reason, fields, request_id)
