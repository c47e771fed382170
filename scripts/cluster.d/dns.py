#!/usr/bin/env python3
# SPDX-License-Identifier: Apache-2.0
# A stand-in for the cluster's DNS (CoreDNS's kubernetes plugin, in short):
# A records of Services (their ClusterIP; a headless Service's ready
# endpoints, and hostname.service for endpoints that have a hostname), SRV
# records of named ports, CNAMEs of ExternalName Services, PTRs, and pod
# records a-b-c-d.NS.pod.DOMAIN; over UDP and TCP. Names outside the cluster
# domain get SERVFAIL (there is no upstream). The API is read every second.
# scripts/cluster up --dns runs it in the control plane's namespace.
#   dns.py ADDR DOMAIN APISERVER CA CERT KEY    serve
#   dns.py ask SERVER                           exit 0 when SERVER answers
#                                               kubernetes.default's A record (UDP)
import json, re, socket, socketserver, ssl, struct, sys, threading, time, urllib.request

if sys.argv[1:2] == ["ask"]:
    q = struct.pack("!HHHHHH", 7, 0x100, 1, 0, 0, 0) + b"".join(
        bytes([len(l)]) + l.encode() for l in "kubernetes.default.svc.cluster.local".split(".")
    ) + b"\0\0\1\0\1"
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(1)
    s.sendto(q, (sys.argv[2], 53))
    sys.exit(0 if struct.unpack("!H", s.recv(512)[6:8])[0] == 1 else 1)

addr, domain, api, ca, cert, key = sys.argv[1:7]
domain = domain.strip(".").lower()
TTL = 5
A, CNAME, PTR, SRV, AAAA, ANY = 1, 5, 12, 33, 28, 255

ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(cert, key)
opener = urllib.request.build_opener(urllib.request.HTTPSHandler(context=ctx),
                                     urllib.request.ProxyHandler({}))

def get(path):
    with opener.open(api + path, timeout=10) as r:
        return json.load(r)["items"]

records = {}  # name -> [(type, value)]

def rev(ip):
    return ".".join(reversed(ip.split("."))) + ".in-addr.arpa"

def build():
    recs = {}
    add = lambda n, t, v: recs.setdefault(n.lower(), []).append((t, v))
    eps = {(e["metadata"]["namespace"], e["metadata"]["name"]): e for e in get("/api/v1/endpoints")}
    for s in get("/api/v1/services"):
        ns, name, spec = s["metadata"]["namespace"], s["metadata"]["name"], s["spec"]
        fq = f"{name}.{ns}.svc.{domain}"
        if spec.get("type") == "ExternalName":
            add(fq, CNAME, spec["externalName"].strip("."))
            continue
        ips = [spec["clusterIP"]] if spec.get("clusterIP") not in (None, "", "None") else []
        targets = [(fq, ip) for ip in ips]
        if not ips:  # headless: the ready endpoints
            for sub in (eps.get((ns, name)) or {}).get("subsets") or []:
                for a in sub.get("addresses") or []:
                    host = f"{a['hostname']}.{fq}" if a.get("hostname") else fq
                    targets.append((fq, a["ip"]))
                    if host != fq:
                        targets.append((host, a["ip"]))
        for n, ip in targets:
            if ":" not in ip:
                add(n, A, ip)
                add(rev(ip), PTR, n)
        for p in spec.get("ports") or []:
            if p.get("name"):
                srvname = f"_{p['name']}._{p.get('protocol', 'TCP').lower()}.{fq}"
                hosts = sorted({n for n, _ in targets if n != fq}) or [fq]
                for h in hosts:
                    add(srvname, SRV, (p["port"], h))
    return recs

def poll():
    global records
    while True:
        try:
            records = build()
        except Exception as e:  # the API restarts, a timeout: keep the last records
            print(f"dns: {e}", file=sys.stderr, flush=True)
        time.sleep(1)

def qname(msg, off):
    labels = []
    while True:
        n = msg[off]
        if n == 0:
            return ".".join(labels), off + 1
        if n & 0xC0:
            raise ValueError("compressed question")
        labels.append(msg[off + 1:off + 1 + n].decode("ascii", "replace"))
        off += 1 + n

def enc(name):
    return b"".join(bytes([len(l)]) + l.encode() for l in name.strip(".").split(".") if l) + b"\0"

def rr(name, t, v):
    if t == A:
        data = socket.inet_aton(v)
    elif t in (CNAME, PTR):
        data = enc(v)
    elif t == SRV:
        data = struct.pack("!HHH", 0, 100, v[0]) + enc(v[1])
    return enc(name) + struct.pack("!HHIH", t, 1, TTL, len(data)) + data

POD = re.compile(r"^(\d+)-(\d+)-(\d+)-(\d+)\.[^.]+\.pod\." + re.escape(domain) + "$")

def answer(msg, limit=65535):
    ident, flags, qd = struct.unpack("!HHH", msg[:6])
    if qd != 1 or flags & 0x8000:
        return None
    name, off = qname(msg, 12)
    qtype, qclass = struct.unpack("!HH", msg[off:off + 4])
    question = msg[12:off + 4]
    n = name.strip(".").lower()
    ans, rcode = [], 0
    recs = records
    m = POD.match(n)
    if m and all(int(x) < 256 for x in m.groups()):
        have = [(A, ".".join(m.groups()))]
    else:
        have = recs.get(n)
    if have is None:
        local = n == domain or n.endswith("." + domain) or n.endswith(".in-addr.arpa")
        rcode = 3 if local else 2  # NXDOMAIN in the cluster's zones, SERVFAIL elsewhere
    else:
        for t, v in have:
            if t == qtype or qtype == ANY or t == CNAME:
                ans.append(rr(n, t, v))
                if t == CNAME and qtype != CNAME:  # the target's records, if it is ours
                    for t2, v2 in recs.get(v.lower(), []):
                        if t2 == qtype or qtype == ANY:
                            ans.append(rr(v, t2, v2))
    # QR, the query's opcode and RD, AA, RA, the rcode; TC when it does not fit.
    out_flags = 0x8000 | (flags & 0x7900) | 0x0400 | 0x0080 | rcode
    if 12 + len(question) + sum(map(len, ans)) > limit:
        out_flags |= 0x0200
        ans = []
    return struct.pack("!HHHHHH", ident, out_flags, 1, len(ans), 0, 0) + question + b"".join(ans)

class UDP(socketserver.BaseRequestHandler):
    def handle(self):
        data, sock = self.request
        try:
            out = answer(data, 512)  # more: truncated, the client asks over TCP
        except Exception:
            return
        if out:
            sock.sendto(out, self.client_address)

class TCP(socketserver.StreamRequestHandler):
    def handle(self):
        while True:
            h = self.rfile.read(2)
            if len(h) < 2:
                return
            data = self.rfile.read(struct.unpack("!H", h)[0])
            try:
                out = answer(data)
            except Exception:
                return
            if not out:
                return
            self.wfile.write(struct.pack("!H", len(out)) + out)

class ThreadedUDP(socketserver.ThreadingMixIn, socketserver.UDPServer):
    daemon_threads = True

class ThreadedTCP(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = True

records = build()
threading.Thread(target=poll, daemon=True).start()
tcp = ThreadedTCP((addr, 53), TCP)
threading.Thread(target=tcp.serve_forever, daemon=True).start()
print(f"dns: serving {domain} on {addr}:53 (udp, tcp), {len(records)} names", file=sys.stderr, flush=True)
ThreadedUDP((addr, 53), UDP).serve_forever()
