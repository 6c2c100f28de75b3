"""A standard gRPC client, Python's grpcio (gRPC's C core), with its default options, against
one Volant daemon: its health overall, for its service and for an unknown one; the services
reflection lists; and one call of its service. Prints the outcome as JSON.

    client.py TARGET SERVICE METHOD [CA CERT KEY]
"""

import json
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc


def main():
    target, service, method = sys.argv[1:4]
    if len(sys.argv) > 4:
        ca, cert, key = (open(p, "rb").read() for p in sys.argv[4:7])
        channel = grpc.secure_channel(target, grpc.ssl_channel_credentials(ca, key, cert))
    else:
        channel = grpc.insecure_channel(target)
    out = {}
    health = health_pb2_grpc.HealthStub(channel)
    for name in ["", service, "volant.nope.v1.Nope"]:
        try:
            answer = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            out["health " + name] = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
        except grpc.RpcError as e:
            out["health " + name] = e.code().name
    try:
        ask = reflection_pb2.ServerReflectionRequest(list_services="")
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(stub.ServerReflectionInfo(iter([ask]), timeout=5))
        out["services"] = sorted(s.name for s in answer.list_services_response.service)
    except grpc.RpcError as e:
        out["services"] = e.code().name
    call = channel.unary_unary(f"/{service}/{method}")
    try:
        call(b"", timeout=5)
        out["call"] = "OK"
    except grpc.RpcError as e:
        out["call"] = f"{e.code().name}: {e.details()}"
    print(json.dumps(out))


main()
