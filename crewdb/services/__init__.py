"""Use cases: validation, transactions and events for each aggregate; no protobuf, no SQL."""
