"""moto_server with AWS IoT's CreateThing semantics, which the operator's write-first
provisioning relies on and moto 5 lacks.

AWS answers CreateThing for an existing thing name with success only when the thing's
configuration (attributes, thing type, billing group) is the one asked for, and returns the
existing thing unchanged; any other configuration gets 409 ResourceAlreadyExistsException
("If this call is made multiple times using the same thing name and configuration, the call
will succeed. If this call is made with the same thing name but different configuration a
ResourceAlreadyExistsException is thrown.", AWS IoT API reference, CreateThing). moto instead
replaces the thing, dropping its shadows and attributes, which would hide a takeover of another
owner's thing. Everything else is moto as installed: the arguments are moto_server's.
"""

import sys

from moto.iot import models
from moto.iot.exceptions import ResourceAlreadyExistsException
from moto.server import main

_create_thing = models.IoTBackend.create_thing


def create_thing(self, thing_name, thing_type_name, attribute_payload, billing_group_name=None):
    existing = next((t for t in self.things.values() if t.thing_name == thing_name), None)
    if existing is None:
        return _create_thing(
            self, thing_name, thing_type_name, attribute_payload, billing_group_name
        )
    attributes = (attribute_payload or {}).get("attributes") or {}
    existing_type = existing.thing_type.thing_type_name if existing.thing_type else None
    same = (
        existing.attributes == attributes
        and existing_type == (thing_type_name or None)
        and getattr(existing, "billing_group_name", None) == (billing_group_name or None)
    )
    if not same:
        raise ResourceAlreadyExistsException(
            f"Thing {thing_name} already exists in account with different attributes",
            thing_name,
            existing.arn,
        )
    return existing


models.IoTBackend.create_thing = create_thing

if __name__ == "__main__":
    sys.exit(main())
