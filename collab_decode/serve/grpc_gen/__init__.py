"""Stubs generated from protos/collab_decode/v1/collab_decode.proto. Do not edit: regenerate with
`python -m collab_decode.serve.protogen` (tests/serve/test_grpc_stubs.py checks they match)."""
