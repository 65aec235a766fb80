"""moto_server with AWS IoT's CreateThing semantics, which the operator's write-first
provisioning relies on and moto 5 lacks.

AWS answers CreateThing for an existing thing name with success only when the thing's
configuration (attributes, thing type, billing group) is the one asked for, and returns the
existing thing unchanged; any other configuration gets 409 ResourceAlreadyExistsException
("If this call is made multiple times using the same thing name and configuration, the call
will succeed. If this call is made with the same thing name but different configuration a
ResourceAlreadyExistsException is thrown.", AWS IoT API reference, CreateThing). moto instead
replaces the thing, dropping its shadows and attributes, which would hide a takeover of another
owner's thing.

And one lock around the IoT and IoT data backends: moto's threaded server does not lock them, so
DeleteCertificate (which iterates over every attachment) answers 500 "OrderedDict mutated during
iteration" whenever another request attaches or detaches meanwhile. AWS has no such race; with
it, many concurrent teardowns (the benchmark's, or tests next to one) crawl through retries.

Everything else is moto as installed: the arguments are moto_server's.
"""

import functools
import inspect
import sys
import threading

from moto.iot import models
from moto.iotdata import models as data_models
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

_lock = threading.RLock()


def _locked(method):
    @functools.wraps(method)
    def locked(*args, **kwargs):
        with _lock:
            return method(*args, **kwargs)

    return locked


for backend in (models.IoTBackend, data_models.IoTDataPlaneBackend):
    for name, member in list(vars(backend).items()):
        if inspect.isfunction(member) and not name.startswith("__"):
            setattr(backend, name, _locked(member))

if __name__ == "__main__":
    sys.exit(main())
