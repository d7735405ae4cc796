#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0
"""A small stand-in for a Kubernetes API server (plain HTTP) for the http and k8s selftests.

Serves discovery (/version, /api, /api/v1, /apis), namespaces and pods (list, get, watch),
secrets (list, get, watch), an exec subresource (POST or GET with Upgrade: 101, then an echo),
/echo (what arrived: method, path, Authorization, body length and hash), /gzip (a gzip JSON
body), /plain. Reflections of the Authorization header as a hostile or careless server would
send them back: /echo-plain (text/plain, Content-Length), /echo-header (in a response header),
/echo-gzip (gzip text), /echo-chunked (chunked, the value cut across chunks written apart),
/echo-close (close-delimited); after an exec upgrade, "whoami" is answered with it in two
writes. Every request is logged to LOG as "METHOD PATH auth=VALUE" so that tests can
prove what reached the server and what never did.

With CERT and KEY it serves HTTPS (TLS 1.2+, ALPN http/1.1). With JWTPUB (a PEM EC P-256
public key) and AUD it also checks the bearer token of every request as an API server's JWT
authenticator would: an ES256 signature by that key, aud, exp and nbf, and a jti seen on one
connection only (the same token on another connection is a replay); a token refused is
answered 401 with a Status naming why, and logged as "jwt=refused:WHY".

usage: k8s_api.py ADDR PORT LOG [CERT KEY [JWTPUB AUD]]
"""
import base64
import gzip
import hashlib
import json
import ssl
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ADDR, PORT, LOG = sys.argv[1], int(sys.argv[2]), sys.argv[3]
CERT, KEY = (sys.argv[4], sys.argv[5]) if len(sys.argv) > 5 else (None, None)
JWTPUB, AUD = (sys.argv[6], sys.argv[7]) if len(sys.argv) > 7 else (None, None)
JTI_SEEN = {}  # jti -> the connection (client address) it first came on
JTI_LOCK = threading.Lock()


def b64url(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def jwt_check(auth, conn):
    """None when the bearer token is good, else why it is refused."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, utils

    if not auth or not auth.startswith("Bearer "):
        return "no bearer token"
    parts = auth[7:].split(".")
    if len(parts) != 3:
        return "not a JWT"
    try:
        head, claims, sig = (json.loads(b64url(parts[0])), json.loads(b64url(parts[1])),
                             b64url(parts[2]))
    except ValueError:
        return "malformed JWT"
    if head.get("alg") != "ES256" or len(sig) != 64:
        return "not ES256"
    with open(JWTPUB, "rb") as f:
        pub = serialization.load_pem_public_key(f.read())
    der = utils.encode_dss_signature(int.from_bytes(sig[:32], "big"),
                                     int.from_bytes(sig[32:], "big"))
    try:
        pub.verify(der, (parts[0] + "." + parts[1]).encode(), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return "bad signature"
    aud = claims.get("aud")
    if aud != AUD and not (isinstance(aud, list) and AUD in aud):
        return "wrong audience"
    now = time.time()
    if not isinstance(claims.get("exp"), int) or claims["exp"] <= now:
        return "token expired"
    if claims.get("nbf", 0) > now + 5:
        return "token not yet valid"
    jti = claims.get("jti")
    if not jti:
        return "no jti"
    with JTI_LOCK:
        first = JTI_SEEN.setdefault(jti, conn)
    if first != conn:
        return "replayed jti"
    return None


def b64(s):
    return base64.b64encode(s.encode()).decode()


def pod(name, ns="default"):
    return {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "uid": "uid-" + name,
                     "resourceVersion": "1", "creationTimestamp": "2026-01-01T00:00:00Z"},
        "spec": {"containers": [{"name": "app", "image": "nginx",
                                 "env": [{"name": "OWNER", "value": "owner alice@example.com"}]}]},
        "status": {"phase": "Running"},
    }


def secret(name, ns="default"):
    last = json.dumps({"apiVersion": "v1", "kind": "Secret",
                       "data": {"password": b64("hunter2-secret-pw")}})
    return {
        "kind": "Secret", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "resourceVersion": "7",
                     "annotations": {"kubectl.kubernetes.io/last-applied-configuration": last}},
        "type": "Opaque",
        "data": {"password": b64("hunter2-secret-pw"), "user": b64("admin-user-name")},
        "stringData": {"token": "plain-token-value-123"},
    }


RESOURCES = {
    "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
    "resources": [
        {"name": "namespaces", "singularName": "namespace", "namespaced": False,
         "kind": "Namespace", "verbs": ["create", "delete", "get", "list", "patch", "update",
                                        "watch"], "shortNames": ["ns"]},
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod",
         "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update",
                   "watch"], "shortNames": ["po"]},
        {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions",
         "verbs": ["create", "get"]},
        {"name": "secrets", "singularName": "secret", "namespaced": True, "kind": "Secret",
         "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update",
                   "watch"]},
    ],
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        pass

    def note(self):
        with open(LOG, "a") as f:
            f.write("%s %s auth=%s\n" % (self.command, self.path,
                                         self.headers.get("Authorization", "-")))

    def body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                line = self.rfile.readline()
                size = int(line.split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length", "0") or 0)
        return self.rfile.read(n) if n else b""

    def send_json(self, obj, code=200, ctype="application/json", enc=None):
        raw = json.dumps(obj).encode()
        if enc == "gzip":
            raw = gzip.compress(raw)
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        if enc:
            self.send_header("Content-Encoding", enc)
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def watch(self, kind, make):
        self.send_response(200)
        self.send_header("Content-Type", "application/json;stream=watch")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, t in enumerate(["ADDED", "MODIFIED", "DELETED"]):
            ev = json.dumps({"type": t, "object": make("obj-%d" % i)}).encode() + b"\n"
            self.wfile.write(b"%x\r\n%s\r\n" % (len(ev), ev))
            self.wfile.flush()
            time.sleep(0.3)
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def exec_upgrade(self):
        self.send_response(101)
        self.send_header("Connection", "Upgrade")
        self.send_header("Upgrade", self.headers.get("Upgrade", "SPDY/3.1"))
        self.end_headers()
        self.wfile.flush()
        self.close_connection = True
        sock = self.connection
        while True:
            data = sock.recv(4096)
            if not data:
                return
            if data.strip() == b"whoami":
                auth = (self.headers.get("Authorization") or "-").encode()
                cut = len(auth) // 2
                sock.sendall(b"you are " + auth[:cut])
                time.sleep(0.2)
                sock.sendall(auth[cut:] + b"\n")
                continue
            sock.sendall(b"exec-echo:" + data)

    def echo_reflect(self, path):
        auth = (self.headers.get("Authorization") or "-").encode()
        raw = b"you sent Authorization: " + auth + b"\nagain: " + auth + b"\n"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        if path == "/echo-header":
            self.send_header("X-Echo-Authorization", auth.decode())
            raw = b"see the headers\n"
        if path == "/echo-gzip":
            raw = gzip.compress(raw)
            self.send_header("Content-Encoding", "gzip")
        if path == "/echo-chunked":
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            # pieces of 7 bytes, each its own chunk and write: the value straddles them all
            for i in range(0, len(raw), 7):
                piece = raw[i:i + 7]
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                self.wfile.flush()
                if i % 28 == 0:
                    time.sleep(0.01)
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            return
        if path == "/echo-close":
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            half = len(raw) // 2
            self.wfile.write(raw[:half])
            self.wfile.flush()
            time.sleep(0.1)
            self.wfile.write(raw[half:])
            self.wfile.flush()
            return
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(raw)

    def route(self):
        self.note()
        if JWTPUB:
            why = jwt_check(self.headers.get("Authorization"), self.client_address)
            with open(LOG, "a") as f:
                f.write("%s %s jwt=%s\n" % (self.command, self.path,
                                            "refused:" + why if why else "ok"))
            if why:
                self.body() if self.command in ("POST", "PUT", "PATCH", "DELETE") else None
                return self.send_json({"kind": "Status", "apiVersion": "v1",
                                       "status": "Failure", "reason": "Unauthorized",
                                       "message": "Unauthorized: " + why, "code": 401},
                                      code=401)
        path, _, query = self.path.partition("?")
        body = self.body() if self.command in ("POST", "PUT", "PATCH", "DELETE") else b""
        if path == "/version":
            return self.send_json({"major": "1", "minor": "29", "gitVersion": "v1.29.0",
                                   "platform": "linux/amd64"})
        if path == "/api":
            return self.send_json({"kind": "APIVersions", "versions": ["v1"],
                                   "serverAddressByClientCIDRs": [
                                       {"clientCIDR": "0.0.0.0/0",
                                        "serverAddress": "%s:%d" % (ADDR, PORT)}]})
        if path == "/apis":
            return self.send_json({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        if path == "/api/v1":
            return self.send_json(RESOURCES)
        if path in ("/echo-plain", "/echo-header", "/echo-gzip", "/echo-chunked", "/echo-close"):
            return self.echo_reflect(path)
        if path == "/echo-header-names":
            # the names of the request headers received, lowercase, one a line
            raw = "".join("%s\n" % k.lower() for k in self.headers.keys()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return
        if path == "/te-gzip-chunked":
            # the reflection gzipped as a transfer coding under chunked: not for the agent
            auth = (self.headers.get("Authorization") or "-").encode()
            raw = gzip.compress(b"you sent Authorization: " + auth + b"\n")
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Transfer-Encoding", "gzip, chunked")
            self.end_headers()
            self.wfile.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(raw), raw))
            self.wfile.flush()
            return
        if path == "/echo" or path.startswith("/echo/"):
            return self.send_json({
                "method": self.command, "path": self.path,
                "authorization": self.headers.get("Authorization"),
                "expect": self.headers.get("Expect"),
                "body_len": len(body), "body_sha256": hashlib.sha256(body).hexdigest()})
        if path == "/gzip":
            return self.send_json({"users": [{"name": "alice", "email": "alice@example.com"},
                                             {"name": "bob", "email": "bob@example.org",
                                              "card": "4111 1111 1111 1111"}]}, enc="gzip")
        if path == "/brotli":
            raw = b"\x8b\x03\x80{\"email\": \"carol@example.net\"}\x03"
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "br")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return
        if path == "/plain":
            raw = b"plain text body\n"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(raw)
            return
        if path == "/nocontent":
            self.send_response(204)
            self.end_headers()
            return
        parts = path.strip("/").split("/")
        watch = "watch=true" in query or "watch=1" in query
        if parts[:2] == ["api", "v1"]:
            rest = parts[2:]
            if rest and rest[0] == "watch":
                watch = True
                rest = rest[1:]
            if rest == ["namespaces"]:
                return self.send_json({"kind": "NamespaceList", "apiVersion": "v1",
                                       "metadata": {"resourceVersion": "1"},
                                       "items": [{"metadata": {"name": "default"}},
                                                 {"metadata": {"name": "kube-system"}}]})
            if len(rest) == 2 and rest[0] == "namespaces":
                return self.send_json({"kind": "Namespace", "apiVersion": "v1",
                                       "metadata": {"name": rest[1]}})
            if len(rest) >= 3 and rest[0] == "namespaces":
                ns, res, tail = rest[1], rest[2], rest[3:]
                if res == "pods":
                    if not tail:
                        if watch:
                            return self.watch("Pod", pod)
                        return self.send_json({"kind": "PodList", "apiVersion": "v1",
                                               "metadata": {"resourceVersion": "1"},
                                               "items": [pod("web-1", ns), pod("web-2", ns)]})
                    if len(tail) == 2 and tail[1] in ("exec", "attach"):
                        if self.headers.get("Upgrade"):
                            return self.exec_upgrade()
                        return self.send_json({"kind": "Status", "status": "Failure",
                                               "message": "upgrade request required",
                                               "code": 400}, code=400)
                    if self.command == "DELETE":
                        return self.send_json({"kind": "Status", "apiVersion": "v1",
                                               "status": "Success", "code": 200})
                    return self.send_json(pod(tail[0], ns))
                if res == "secrets":
                    if not tail:
                        if watch:
                            return self.watch("Secret", secret)
                        return self.send_json({"kind": "SecretList", "apiVersion": "v1",
                                               "metadata": {"resourceVersion": "1"},
                                               "items": [secret("db-pass", ns),
                                                         secret("api-key", ns)]})
                    if "as=yaml" in query:
                        raw = ("data:\n  password: %s\n" % b64("hunter2-secret-pw")).encode()
                        self.send_response(200)
                        self.send_header("Content-Type", "application/yaml")
                        self.send_header("Content-Length", str(len(raw)))
                        self.end_headers()
                        self.wfile.write(raw)
                        return
                    return self.send_json(secret(tail[0], ns))
        return self.send_json({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                               "reason": "NotFound", "message": "not found: " + path,
                               "code": 404}, code=404)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = route


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


if __name__ == "__main__":
    srv = Server((ADDR, PORT), Handler)
    if CERT:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(CERT, KEY)
        ctx.set_alpn_protocols(["http/1.1"])
        # the handshake runs in the connection's thread, not in the accept loop
        srv.socket = ctx.wrap_socket(srv.socket, server_side=True,
                                     do_handshake_on_connect=False)
    print("ready", flush=True)
    srv.serve_forever()
