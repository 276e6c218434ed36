"""DRA's part of the kubelet's PodResources v1 answer, which the compiled 1.20 protos predate.

Kubelets with DRA (1.27 and later, `KubeletPodResourcesDynamicResources`) add
`ContainerResources.dynamic_resources = 5`, and since 1.31 each claim's devices as driver, pool and device
name (kubernetes/kubelet pkg/apis/podresources/v1/api.proto, as of 63b3249):

    message DynamicResource { string claim_name = 2; string claim_namespace = 3;
                              repeated ClaimResource claim_resources = 4; }   // class_name = 1 removed in 1.31
    message ClaimResource   { repeated CDIDevice cdi_devices = 1; string driver_name = 2;
                              string pool_name = 3; string device_name = 4; optional string share_id = 5; }
    message CDIDevice       { string name = 1; }

A message compiled from the 1.20 protos keeps field 5 as an unknown field; it is decoded here with these
messages, declared through protobuf's descriptors rather than compiled (no newer Kubernetes source is at hand).
"""

from __future__ import annotations

from functools import cache

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.unknown_fields import UnknownFieldSet

DYNAMIC_RESOURCES = 5  # ContainerResources.dynamic_resources
LENGTH_DELIMITED = 2
PACKAGE = "slmpack.podresources.v1"

Field = descriptor_pb2.FieldDescriptorProto


@cache
def dynamic_resource_message():
    """The DynamicResource message class (with ClaimResource and CDIDevice), at the upstream field numbers."""
    file = descriptor_pb2.FileDescriptorProto(name="slmpack/podresources_dra.proto", package=PACKAGE, syntax="proto3")

    def message(name: str, *fields: tuple[str, int, int, str]) -> None:
        declared = file.message_type.add(name=name)
        for field_name, number, kind, type_name in fields:
            repeated = kind == Field.TYPE_MESSAGE
            declared.field.add(name=field_name, number=number, type=kind,
                               label=Field.LABEL_REPEATED if repeated else Field.LABEL_OPTIONAL,
                               type_name=f".{PACKAGE}.{type_name}" if type_name else None)

    message("CDIDevice", ("name", 1, Field.TYPE_STRING, ""))
    message("ClaimResource", ("cdi_devices", 1, Field.TYPE_MESSAGE, "CDIDevice"),
            ("driver_name", 2, Field.TYPE_STRING, ""), ("pool_name", 3, Field.TYPE_STRING, ""),
            ("device_name", 4, Field.TYPE_STRING, ""))
    message("DynamicResource", ("claim_name", 2, Field.TYPE_STRING, ""), ("claim_namespace", 3, Field.TYPE_STRING, ""),
            ("claim_resources", 4, Field.TYPE_MESSAGE, "ClaimResource"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.DynamicResource"))


def dynamic_resources(container) -> list:
    """A container's DRA allocations: the field itself where the compiled protos know it, else field 5 decoded
    from the unknown fields."""
    descriptor = getattr(container, "DESCRIPTOR", None)  # None: not a protobuf message (a test's stand-in)
    if descriptor is None or "dynamic_resources" in descriptor.fields_by_name:
        return list(getattr(container, "dynamic_resources", []))
    decode = dynamic_resource_message().FromString
    return [decode(field.data) for field in UnknownFieldSet(container)
            if field.field_number == DYNAMIC_RESOURCES and field.wire_type == LENGTH_DELIMITED]
