#!/usr/bin/env python3
"""A loopback test double of the Azure IoT Hub service REST API (api-version 2021-04-12), the
subset thing-operator uses: device identities (PUT/GET/DELETE /devices/{id}) and twins
(GET/PATCH /twins/{id}). No IoT Hub emulator exists anywhere; this double is the honest
substitute, and it is as strict as the documentation:

- every request carries `Authorization: SharedAccessSignature sr=..&sig=..&se=..&skn=..`; the
  signature is checked exactly as documented (HMAC-SHA256 with the base64-decoded policy key over
  `urlencode(resource) + "\\n" + expiry`), as are expiry, policy name and audience (`sr` must be
  the hub or a prefix of the requested resource); failures answer 401 IotHubUnauthorizedAccess;
- `api-version` must be given (400 InvalidProtocolVersion otherwise);
- device ids follow IoT Hub's rules (<= 128 chars of `[A-Za-z0-9-.%_*?!(),:=@$']`), 400 otherwise;
- PUT without If-Match on an existing device is 409 DeviceAlreadyExists; a stale If-Match is
  412 PreconditionFailed; DELETE requires If-Match (`*` or the etag); unknown ids are 404
  DeviceNotFound; twin PATCH with If-Match is etag-checked the same way;
- twin limits: tags, desired and reported each at most 32 KB, nesting depth at most 10, keys
  without `.`, `$`, space or control characters and at most 1 KB; 400 ArgumentInvalid otherwise;
- desired and reported `$version` increment by one on every change, the twin `version` too;
- `self-signed` devices carry thumbprints; `sas` devices get generated keys when none are given.

Microsoft Entra workload identity (on the TLS listener only: the token endpoint, like Entra, and
bearer tokens, like the hub, are https-only; `--tls-port`, `--tls-cert`, `--tls-key`):
- `POST /{tenant}/oauth2/v2.0/token` as Entra's v2.0 token endpoint serves the client-credentials
  grant with a federated client assertion (form fields `grant_type=client_credentials`,
  `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`,
  `client_assertion`, `client_id`, `scope`): the tenant and client id must be a registered app
  (`POST /_double/entra/apps`), and the assertion must be exactly the content of the federated
  token file registered with it (read at every request, as a projected token is rotated); the
  scope must be `<resource>/.default`. Success: `{"token_type": "Bearer", "expires_in": N,
  "ext_expires_in": N, "access_token": ...}` with the app's `expiresIn`; failures answer 400 with
  Entra's error document (`error`, `error_description` with an AADSTS code, `error_codes`) and
  never echo the assertion;
- the hub accepts `Authorization: Bearer <token>` for a token the endpoint issued for resource
  `https://iothubs.azure.net`, until it expires; an unknown, expired or foreign-audience token,
  or a bearer token over plain http, is 401 IotHubUnauthorizedAccess.

Test-only endpoints, outside the IoT Hub API (no SAS, loopback only):
- `POST /_double/faults` `{"status": 429, "count": 3, "retryAfter": 1, "match": "/twins/"}`:
  the next `count` API requests whose path contains `match` answer `status`;
- `GET /_double/state`: every device and twin, request counters and the time of every injected
  fault served (`faultLog`: are retries spaced as Retry-After asks?), for assertions;
- `POST /_double/reset`: forget everything;
- `POST /_double/entra/apps` `{"tenant": .., "clientId": .., "federatedTokenFile": .., "expiresIn":
  3600}`: registers an app (a user-assigned managed identity with a federated credential);
  `/_double/state` counts token requests per client id (`entra.tokenRequests`, failures
  included) and hub requests each one's tokens authenticated (`entra.bearerRequests`);
- `PATCH /_double/devices/{id}/reported`: a device writing reported properties (the device
  simulator). The device proves who it is like a real one would: header `x-device-cert` with its
  PEM certificate, whose SHA-1 or SHA-256 thumbprint must be registered (X.509 devices), or
  `Authorization` with a SAS token for `<hub>/devices/<id>` signed with one of its keys.

Usage: iothub_double.py --port PORT --hub HOSTNAME --policy NAME --key-file FILE (base64 key)
       [--tls-port PORT --tls-cert PEM --tls-key PEM]
"""

import argparse
import base64
import hashlib
import hmac
import json
import re
import secrets
import ssl
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

DEVICE_ID = re.compile(r"^[A-Za-z0-9\-.%_*?!(),:=@$']{1,128}$")
MAX_SECTION = 32 * 1024
MAX_DEPTH = 10
LOCK = threading.Lock()
STATE = {"devices": {}, "twins": {}, "faults": [], "requests": {}, "faultLog": []}
# Entra: registered apps by (tenant, client id); issued tokens; counters by client id.
ENTRA = {"apps": {}, "tokens": {}, "tokenRequests": {}, "bearerRequests": {}}
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
IOT_HUB_RESOURCE = "https://iothubs.azure.net"


def sign(key_b64, resource_encoded, expiry):
    mac = hmac.new(base64.b64decode(key_b64), f"{resource_encoded}\n{expiry}".encode(), hashlib.sha256)
    return base64.b64encode(mac.digest()).decode()


def parse_sas(header):
    if not header or not header.startswith("SharedAccessSignature "):
        return None
    fields = {}
    for part in header[len("SharedAccessSignature "):].split("&"):
        if "=" not in part:
            return None
        k, v = part.split("=", 1)
        fields[k] = v
    if not {"sr", "sig", "se"} <= fields.keys():
        return None
    return fields


def check_sas(header, keys, resource, policy=None):
    """None when the token is valid for `resource` (unencoded, `host/path`), else the reason."""
    f = parse_sas(header)
    if f is None:
        return "malformed SharedAccessSignature"
    if policy is not None and f.get("skn") != policy:
        return "unknown policy"
    try:
        expiry = int(f["se"])
    except ValueError:
        return "bad expiry"
    if expiry < time.time():
        return "token expired"
    audience = urllib.parse.unquote_plus(f["sr"]).lower()
    if not resource.lower().startswith(audience):
        return "token audience does not cover the resource"
    sig = urllib.parse.unquote(f["sig"])
    for key in keys:
        if key and hmac.compare_digest(sign(key, f["sr"], f["se"]), sig):
            return None
    return "signature mismatch"


def depth(v):
    if isinstance(v, dict):
        return 1 + max((depth(x) for x in v.values()), default=0)
    if isinstance(v, list):
        return 1 + max((depth(x) for x in v), default=0)
    return 0


def bad_key(v):
    if isinstance(v, dict):
        for k, x in v.items():
            if k.startswith("$"):
                continue
            if any(c in k for c in ".$ ") or any(ord(c) < 32 or 127 <= ord(c) < 160 for c in k) or len(k.encode()) > 1024:
                return k
            found = bad_key(x)
            if found:
                return found
    return None


def merge(target, patch):
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            merge(target[k], v)
        elif isinstance(v, dict):
            target[k] = {}
            merge(target[k], v)
        else:
            target[k] = v


def check_section(name, value):
    if not isinstance(value, dict):
        return f"{name} must be an object"
    k = bad_key(value)
    if k is not None:
        return f"{name}: invalid key {k!r}"
    if depth(value) > MAX_DEPTH:
        return f"{name}: nesting deeper than {MAX_DEPTH}"
    if len(json.dumps(value, separators=(",", ":")).encode()) > MAX_SECTION:
        return f"{name}: larger than {MAX_SECTION} bytes"
    return None


def new_etag():
    return base64.b64encode(uuid.uuid4().hex[:12].encode()).decode()


def thumbprints_of(pem):
    m = re.search(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", pem or "", re.S)
    if not m:
        return set()
    der = ssl.PEM_cert_to_DER_cert(m.group(0))
    return {hashlib.sha1(der).hexdigest().upper(), hashlib.sha256(der).hexdigest().upper()}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "iothub-double"

    def log_message(self, fmt, *args):  # quiet; the request counters are in /_double/state
        pass

    def reply(self, status, body=None, code=None, etag=None, headers=None):
        data = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        if code:
            self.send_header("iothub-errorcode", code)
        if etag:
            self.send_header("ETag", f'"{etag}"')
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def error(self, status, code, message, headers=None):
        self.reply(status, {"Message": f"ErrorCode:{code};{message}", "ExceptionMessage": ""}, code=code, headers=headers)

    def body(self):
        raw = getattr(self, "raw_body", b"")
        if not raw:
            return None
        return json.loads(raw)

    def if_match(self):
        v = self.headers.get("If-Match")
        return None if v is None else v.strip().strip('"')

    def route(self, method):
        # The whole body is read first, whatever the answer: an unread body would be taken for the
        # next request on this keep-alive connection.
        n = int(self.headers.get("Content-Length") or 0)
        self.raw_body = self.rfile.read(n) if n else b""
        url = urllib.parse.urlsplit(self.path)
        path = url.path
        try:
            if path.startswith("/_double/"):
                return self.control(method, path)
            m = re.fullmatch(r"/([^/]+)/oauth2/v2\.0/token", path)
            if m and method == "POST":
                if not self.server.tls:
                    return self.entra_error("invalid_request", 90000, "The token endpoint is served over TLS only.")
                return self.token_endpoint(urllib.parse.unquote(m.group(1)))
            with LOCK:
                key = f"{method} {re.sub(r'/[^/]+$', '/{id}', path)}"
                STATE["requests"][key] = STATE["requests"].get(key, 0) + 1
                exact = f"{method} {path}"
                STATE["requests"][exact] = STATE["requests"].get(exact, 0) + 1
                for fault in STATE["faults"]:
                    if fault["count"] > 0 and fault.get("match", "") in path:
                        fault["count"] -= 1
                        STATE["requests"]["faulted"] = STATE["requests"].get("faulted", 0) + 1
                        STATE["faultLog"].append({"path": path, "status": fault["status"], "t": time.time()})
                        headers = {"Retry-After": str(fault["retryAfter"])} if fault.get("retryAfter") is not None else None
                        code = "ThrottlingException" if fault["status"] == 429 else "ServerError"
                        return self.error(fault["status"], code, "injected fault", headers)
            query = urllib.parse.parse_qs(url.query)
            if "api-version" not in query:
                return self.error(400, "InvalidProtocolVersion", "api-version is required")
            resource = self.server.hub + urllib.parse.unquote(path)
            authorization = self.headers.get("Authorization") or ""
            if authorization.startswith("Bearer "):
                reason = self.check_bearer(authorization[len("Bearer "):])
            else:
                reason = check_sas(authorization, [self.server.key], resource, self.server.policy)
            if reason:
                return self.error(401, "IotHubUnauthorizedAccess", reason)
            m = re.fullmatch(r"/(devices|twins)/([^/]+)", path)
            if not m:
                return self.error(404, "NotFound", "no such resource")
            kind, device_id = m.group(1), urllib.parse.unquote(m.group(2))
            if not DEVICE_ID.match(device_id):
                return self.error(400, "ArgumentInvalid", "invalid device id")
            body = self.body() if method in ("PUT", "PATCH") else None
            with LOCK:
                if kind == "devices":
                    return self.devices(method, device_id, body)
                return self.twins(method, device_id, body)
        except (ValueError, json.JSONDecodeError) as e:
            return self.error(400, "IotHubFormatError", str(e))

    def check_bearer(self, token):
        """None when `token` is an unexpired Entra token for IoT Hub, else the reason."""
        if not self.server.tls:
            return "bearer tokens are accepted over TLS only"
        with LOCK:
            issued = ENTRA["tokens"].get(token)
            if issued is None:
                return "unknown bearer token"
            if issued["exp"] < time.time():
                return "bearer token expired"
            if issued["aud"] != IOT_HUB_RESOURCE:
                return "bearer token audience is not IoT Hub"
            client = issued["clientId"]
            ENTRA["bearerRequests"][client] = ENTRA["bearerRequests"].get(client, 0) + 1
        return None

    def entra_error(self, error, code, description):
        self.reply(400, {"error": error, "error_description": f"AADSTS{code}: {description}",
                         "error_codes": [code], "timestamp": time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime()),
                         "trace_id": str(uuid.uuid4()), "correlation_id": str(uuid.uuid4())})

    def token_endpoint(self, tenant):
        """Entra's v2.0 token endpoint: the client-credentials grant with a federated assertion."""
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
            return self.entra_error("invalid_request", 900144, "The request body must be form-encoded.")
        form = dict(urllib.parse.parse_qsl(self.raw_body.decode("utf-8", "replace")))
        client_id = form.get("client_id", "")
        with LOCK:
            ENTRA["tokenRequests"][client_id] = ENTRA["tokenRequests"].get(client_id, 0) + 1
            tenants = {t for (t, _) in ENTRA["apps"]}
            app = ENTRA["apps"].get((tenant, client_id))
        if form.get("grant_type") != "client_credentials":
            return self.entra_error("unsupported_grant_type", 70003, "The app requested an unsupported grant type.")
        if form.get("client_assertion_type") != ASSERTION_TYPE or not form.get("client_assertion"):
            return self.entra_error("invalid_request", 90014, "The request body must contain a client_assertion of type jwt-bearer.")
        if tenant not in tenants:
            return self.entra_error("invalid_request", 90002, f"Tenant '{tenant}' not found.")
        if app is None:
            return self.entra_error("unauthorized_client", 700016, f"Application with identifier '{client_id}' was not found in the directory.")
        try:
            with open(app["federatedTokenFile"]) as f:
                expected = f.read()
        except OSError:
            expected = None
        if expected is None or not hmac.compare_digest(form["client_assertion"].encode(), expected.encode()):
            return self.entra_error("invalid_client", 700213, "No matching federated identity record found for presented assertion.")
        scope = form.get("scope", "")
        if not scope.endswith("/.default") or " " in scope:
            return self.entra_error("invalid_scope", 70011, "The provided scope is not valid; it must be one resource's /.default.")
        token = secrets.token_urlsafe(32)
        expires_in = int(app["expiresIn"])
        with LOCK:
            ENTRA["tokens"][token] = {"exp": time.time() + expires_in, "aud": scope[: -len("/.default")], "clientId": client_id}
        return self.reply(200, {"token_type": "Bearer", "expires_in": expires_in, "ext_expires_in": expires_in,
                                "access_token": token})

    def devices(self, method, device_id, body):
        devices, twins = STATE["devices"], STATE["twins"]
        have = devices.get(device_id)
        match = self.if_match()
        if method == "GET":
            if have is None:
                return self.error(404, "DeviceNotFound", "device not found")
            return self.reply(200, have, etag=have["etag"])
        if method == "DELETE":
            if match is None:
                return self.error(400, "ArgumentInvalid", "If-Match is required")
            if have is None:
                return self.error(404, "DeviceNotFound", "device not found")
            if match != "*" and match != have["etag"]:
                return self.error(412, "PreconditionFailed", "etag mismatch")
            del devices[device_id]
            twins.pop(device_id, None)
            return self.reply(204)
        if method != "PUT":
            return self.error(405, "InvalidOperation", "method not allowed")
        if not isinstance(body, dict) or body.get("deviceId") != device_id:
            return self.error(400, "ArgumentInvalid", "deviceId in the body must match the path")
        if have is not None and match is None:
            return self.error(409, "DeviceAlreadyExists", "a device with this id exists")
        if have is None and match is not None and match != "*":
            return self.error(404, "DeviceNotFound", "device not found")
        if have is not None and match != "*" and match != have["etag"]:
            return self.error(412, "PreconditionFailed", "etag mismatch")
        auth = body.get("authentication") or {"type": "sas"}
        kind = auth.get("type")
        if kind == "selfSigned":
            tp = auth.get("x509Thumbprint") or {}
            if not tp.get("primaryThumbprint"):
                return self.error(400, "ArgumentInvalid", "selfSigned needs a primaryThumbprint")
            auth = {"type": kind, "x509Thumbprint": {"primaryThumbprint": tp["primaryThumbprint"].upper(), "secondaryThumbprint": (tp.get("secondaryThumbprint") or "").upper() or None}, "symmetricKey": {"primaryKey": None, "secondaryKey": None}}
        elif kind == "sas":
            keys = auth.get("symmetricKey") or {}
            auth = {"type": kind, "symmetricKey": {"primaryKey": keys.get("primaryKey") or base64.b64encode(uuid.uuid4().bytes * 2).decode(), "secondaryKey": keys.get("secondaryKey") or base64.b64encode(uuid.uuid4().bytes * 2).decode()}, "x509Thumbprint": {"primaryThumbprint": None, "secondaryThumbprint": None}}
        else:
            return self.error(400, "ArgumentInvalid", f"unsupported authentication type {kind!r}")
        device = {
            "deviceId": device_id,
            "generationId": have["generationId"] if have else uuid.uuid4().hex[:18],
            "etag": new_etag(),
            "status": body.get("status", "enabled"),
            "connectionState": "Disconnected",
            "authentication": auth,
            "capabilities": {"iotEdge": False},
            "cloudToDeviceMessageCount": 0,
        }
        devices[device_id] = device
        if have is None:
            twins[device_id] = {"deviceId": device_id, "etag": new_etag(), "version": 1, "tags": {},
                                "properties": {"desired": {"$version": 1}, "reported": {"$version": 1}}}
        return self.reply(200, device, etag=device["etag"])

    def twins(self, method, device_id, body):
        twin = STATE["twins"].get(device_id)
        if twin is None:
            return self.error(404, "DeviceNotFound", "device not found")
        if method == "GET":
            return self.reply(200, self.twin_view(twin), etag=twin["etag"])
        if method not in ("PATCH", "PUT"):
            return self.error(405, "InvalidOperation", "method not allowed")
        match = self.if_match()
        if match is not None and match != "*" and match != twin["etag"]:
            return self.error(412, "PreconditionFailed", "etag mismatch")
        if not isinstance(body, dict):
            return self.error(400, "ArgumentInvalid", "twin patch must be an object")
        if "reported" in (body.get("properties") or {}):
            return self.error(400, "ArgumentInvalid", "reported properties are read-only for the service")
        tags = json.loads(json.dumps(twin["tags"]))
        desired = {k: v for k, v in twin["properties"]["desired"].items() if k != "$version"}
        new_desired = json.loads(json.dumps(desired))
        if method == "PUT":
            tags, new_desired = {}, {}
        merge(tags, body.get("tags") or {})
        merge(new_desired, (body.get("properties") or {}).get("desired") or {})
        for name, section in (("tags", tags), ("desired", new_desired)):
            problem = check_section(name, section)
            if problem:
                return self.error(400, "ArgumentInvalid", problem)
        changed = False
        if tags != twin["tags"]:
            twin["tags"] = tags
            changed = True
        if new_desired != desired:
            new_desired["$version"] = twin["properties"]["desired"]["$version"] + 1
            twin["properties"]["desired"] = new_desired
            changed = True
        if changed:
            twin["version"] += 1
            twin["etag"] = new_etag()
        return self.reply(200, self.twin_view(twin), etag=twin["etag"])

    @staticmethod
    def twin_view(twin):
        view = json.loads(json.dumps(twin))
        device = STATE["devices"].get(twin["deviceId"], {})
        view["status"] = device.get("status", "enabled")
        view["authenticationType"] = (device.get("authentication") or {}).get("type")
        return view

    def control(self, method, path):
        with LOCK:
            if path == "/_double/state" and method == "GET":
                entra = {"tokenRequests": ENTRA["tokenRequests"], "bearerRequests": ENTRA["bearerRequests"]}
                return self.reply(200, {"devices": STATE["devices"], "twins": STATE["twins"], "requests": STATE["requests"], "faults": STATE["faults"], "faultLog": STATE["faultLog"], "entra": entra})
            if path == "/_double/entra/apps" and method == "POST":
                a = self.body() or {}
                if not all(isinstance(a.get(k), str) and a.get(k) for k in ("tenant", "clientId", "federatedTokenFile")):
                    return self.error(400, "ArgumentInvalid", "tenant, clientId and federatedTokenFile are required")
                ENTRA["apps"][(a["tenant"], a["clientId"])] = {"federatedTokenFile": a["federatedTokenFile"], "expiresIn": int(a.get("expiresIn", 3600))}
                return self.reply(204)
            if path == "/_double/reset" and method == "POST":
                for k in ("devices", "twins", "requests"):
                    STATE[k].clear()
                STATE["faults"].clear()
                STATE["faultLog"].clear()
                for v in ENTRA.values():
                    v.clear()
                return self.reply(204)
            if path == "/_double/faults" and method == "POST":
                f = self.body() or {}
                STATE["faults"].append({"status": int(f.get("status", 429)), "count": int(f.get("count", 1)),
                                        "retryAfter": f.get("retryAfter"), "match": f.get("match", "")})
                return self.reply(204)
            m = re.fullmatch(r"/_double/devices/([^/]+)/reported", path)
            if m and method == "PATCH":
                device_id = urllib.parse.unquote(m.group(1))
                device = STATE["devices"].get(device_id)
                twin = STATE["twins"].get(device_id)
                if device is None or twin is None:
                    return self.error(404, "DeviceNotFound", "device not found")
                auth = device["authentication"]
                if auth["type"] == "selfSigned":
                    registered = {t for t in auth["x509Thumbprint"].values() if t}
                    if not thumbprints_of(self.headers.get("x-device-cert", "").replace("\\n", "\n")) & registered:
                        return self.error(401, "IotHubUnauthorizedAccess", "certificate not registered")
                else:
                    keys = list(auth["symmetricKey"].values())
                    reason = check_sas(self.headers.get("Authorization"), keys, f"{self.server.hub}/devices/{device_id}")
                    if reason:
                        return self.error(401, "IotHubUnauthorizedAccess", reason)
                patch = self.body() or {}
                reported = {k: v for k, v in twin["properties"]["reported"].items() if k != "$version"}
                new = json.loads(json.dumps(reported))
                merge(new, patch)
                problem = check_section("reported", new)
                if problem:
                    return self.error(400, "ArgumentInvalid", problem)
                if new != reported:
                    new["$version"] = twin["properties"]["reported"]["$version"] + 1
                    twin["properties"]["reported"] = new
                    twin["version"] += 1
                    twin["etag"] = new_etag()
                return self.reply(200, {"$version": twin["properties"]["reported"]["$version"]})
        return self.error(404, "NotFound", "no such control endpoint")

    def do_GET(self):
        self.route("GET")

    def do_PUT(self):
        self.route("PUT")

    def do_PATCH(self):
        self.route("PATCH")

    def do_DELETE(self):
        self.route("DELETE")

    def do_POST(self):
        self.route("POST")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--hub", required=True, help="host name the hub answers as, e.g. double.azure-devices.net")
    p.add_argument("--policy", default="iothubowner")
    p.add_argument("--key-file", required=True, help="file holding the policy's base64 key")
    p.add_argument("--tls-port", type=int, help="also serve over TLS here (the hub and Entra's token endpoint)")
    p.add_argument("--tls-cert", help="PEM server certificate for --tls-port")
    p.add_argument("--tls-key", help="PEM server key for --tls-port")
    a = p.parse_args()
    with open(a.key_file) as f:
        key = f.read().strip()

    def server_on(port, tls):
        server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        server.hub, server.policy, server.key, server.tls = a.hub, a.policy, key, tls
        server.daemon_threads = True
        return server

    if a.tls_port:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(a.tls_cert, a.tls_key)
        tls = server_on(a.tls_port, True)
        tls.socket = context.wrap_socket(tls.socket, server_side=True)
        threading.Thread(target=tls.serve_forever, daemon=True).start()
    server_on(a.port, False).serve_forever()


if __name__ == "__main__":
    main()
