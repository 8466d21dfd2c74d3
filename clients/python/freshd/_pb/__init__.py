"""Stubs generated from proto/freshd/v1/coordinator.proto.

The modules beside this file (``coordinator_pb2``, ``coordinator_pb2_grpc``)
are written by ``freshd/_generate.py`` during the package build and are not
kept in version control.
"""
