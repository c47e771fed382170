//! Services on real pods and real sockets: a ClusterIP the agent would
//! write (written here straight into the maps) carries TCP (a megabyte
//! each way, so segmentation offloads and partial checksums are in play)
//! and UDP for both families; the client sees the Service's address, the
//! backend the client's; a backend reaches its own Service; a frontend
//! without backends refuses at once; a connected UDP socket moves to a
//! live backend on its next datagram when its backend goes; and `ferrite
//! services` shows it all.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use ferrite_datapath::service::{Backend, Frontend, FrontendState, ServiceMaps};
use ferrite_datapath::Datapath;
use serde_json::json;

use crate::harness::{privileged, Netns, Node, Pod};

const TCP: u8 = 6;
const UDP: u8 = 17;

/// Accepts one connection on `l`, answers with the peer's address as it
/// saw it, then echoes everything until the client closes.
fn serve_tcp_once(l: TcpListener) -> std::thread::JoinHandle<std::io::Result<SocketAddr>> {
    std::thread::spawn(move || {
        let (mut c, peer) = l.accept()?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut hello = peer.ip().to_string().into_bytes();
        hello.resize(64, b' ');
        c.write_all(&hello)?;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = c.read(&mut buf)?;
            if n == 0 {
                return Ok(peer);
            }
            c.write_all(&buf[..n])?;
        }
    })
}

/// Connects from `ns` to `to`; returns what the server saw as the
/// client's address, after `bytes` went each way unharmed.
fn tcp_through(ns: &Netns, to: SocketAddr, bytes: usize) -> String {
    let mut s = ns
        .run(|| TcpStream::connect_timeout(&to, Duration::from_secs(5)))
        .unwrap()
        .unwrap_or_else(|e| panic!("connect {to}: {e}"));
    assert_eq!(s.peer_addr().unwrap(), to, "the client sees the Service");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut hello = [0u8; 64];
    s.read_exact(&mut hello).unwrap();
    let seen = String::from_utf8_lossy(&hello).trim().to_string();
    let mut r = s.try_clone().unwrap();
    let w = std::thread::spawn(move || {
        let chunk: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let mut sent = 0;
        while sent < bytes {
            let n = chunk.len().min(bytes - sent);
            s.write_all(&chunk[..n]).unwrap();
            sent += n;
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut got = Vec::with_capacity(bytes);
    r.read_to_end(&mut got).unwrap();
    w.join().unwrap();
    assert_eq!(got.len(), bytes, "{to}: echoed");
    assert!(
        got.iter()
            .enumerate()
            .all(|(i, b)| *b == ((i % (64 * 1024)) % 251) as u8),
        "{to}: the echo is intact"
    );
    seen
}

/// A UDP server in `ns` on `ip:port` answering every datagram with `name`
/// and the sender's address, until it reads "stop".
fn serve_udp(ns: &Netns, ip: IpAddr, port: u16, name: &'static str) -> std::thread::JoinHandle<()> {
    let sock = ns
        .run(|| UdpSocket::bind(SocketAddr::new(ip, port)))
        .unwrap()
        .unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 256];
        loop {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                return;
            };
            if &buf[..n] == b"stop" {
                return;
            }
            let _ = sock.send_to(format!("{name} {}", from.ip()).as_bytes(), from);
        }
    })
}

fn frontend(addr: IpAddr, port: u16, proto: u8) -> Frontend {
    Frontend { addr, port, proto }
}

/// Backends `(id, addr, port)` of frontend `id`, all active.
fn program(m: &ServiceMaps, fe: Frontend, id: u32, backends: &[(u32, IpAddr, u16)]) {
    for &(bid, addr, port) in backends {
        m.set_backend(
            bid,
            &Backend {
                frontend: id,
                addr,
                port,
                terminating: false,
            },
        )
        .unwrap();
    }
    m.set_frontend(
        &fe,
        &FrontendState {
            id,
            backends: backends.iter().map(|b| b.0).collect(),
            affinity_timeout: None,
            source_nat: false,
        },
    )
    .unwrap();
}

#[test]
fn clusterip_on_real_pods_both_families() {
    if !privileged("clusterip_on_real_pods_both_families") {
        return;
    }
    let mut node = Node::new("10.74.0.0/24").unwrap();
    node.extra = json!({
        "ipam": { "ranges": [[{ "subnet": "10.74.0.0/24" }], [{ "subnet": "fd00:74::/64" }]] }
    });
    let a = node.add_pod("1.1.0").unwrap();
    let b = node.add_pod("1.1.0").unwrap();
    let c = node.add_pod("1.1.0").unwrap();
    let root = node.bpffs.path().join("ferrite");
    let dp = Datapath::open(&root).unwrap().expect("loaded by ADD");
    let m = dp.service_maps().unwrap();
    // The agent tells the programs where Services live (hairpin answers
    // are addressed to one).
    dp.policy_maps()
        .unwrap()
        .set_service_cidrs(&[
            ("10.96.0.0".parse().unwrap(), 16),
            ("fd00:96::".parse().unwrap(), 108),
        ])
        .unwrap();

    for (fam, vip) in [(0usize, "10.96.7.7"), (1, "fd00:96::7")] {
        let vip: IpAddr = vip.parse().unwrap();
        let (a_ip, b_ip, c_ip) = (a.ips()[fam], b.ips()[fam], c.ips()[fam]);
        let base = 10 * (fam as u32 + 1);

        // TCP: a -> VIP:80 -> b:8080, a megabyte each way.
        program(
            &m,
            frontend(vip, 80, TCP),
            base + 1,
            &[(100 * base + 1, b_ip, 8080)],
        );
        let l =
            b.ns.run(|| TcpListener::bind(SocketAddr::new(b_ip, 8080)))
                .unwrap()
                .unwrap();
        let srv = serve_tcp_once(l);
        let seen = tcp_through(&a.ns, SocketAddr::new(vip, 80), 1 << 20);
        assert_eq!(seen, a_ip.to_string(), "the backend sees the client");
        assert_eq!(srv.join().unwrap().unwrap().ip(), a_ip);

        // Hairpin: b -> VIP:80 -> b itself, seen from the Service.
        let l =
            b.ns.run(|| TcpListener::bind(SocketAddr::new(b_ip, 8080)))
                .unwrap()
                .unwrap();
        let srv = serve_tcp_once(l);
        let seen = tcp_through(&b.ns, SocketAddr::new(vip, 80), 64 * 1024);
        assert_eq!(
            seen,
            vip.to_string(),
            "hairpin: the backend sees the Service"
        );
        srv.join().unwrap().unwrap();

        // No backend: refused at once, not timed out.
        program(&m, frontend(vip, 81, TCP), base + 2, &[]);
        let t0 = Instant::now();
        let err = a
            .ns
            .run(|| TcpStream::connect_timeout(&SocketAddr::new(vip, 81), Duration::from_secs(5)))
            .unwrap()
            .expect_err("no backend");
        assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{err}");
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "refused in {:?}",
            t0.elapsed()
        );

        // UDP, connected: answered from the Service; when b goes, the
        // next datagram is answered by c.
        let fe = frontend(vip, 53, UDP);
        program(&m, fe, base + 3, &[(100 * base + 3, b_ip, 5353)]);
        let sb = serve_udp(&b.ns, b_ip, 5353, "b");
        let sc = serve_udp(&c.ns, c_ip, 5353, "c");
        let u =
            a.ns.run(|| UdpSocket::bind(SocketAddr::new(a_ip, 0)))
                .unwrap()
                .unwrap();
        u.connect(SocketAddr::new(vip, 53)).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let ask = |u: &UdpSocket| {
            u.send(b"who").unwrap();
            let mut buf = [0u8; 256];
            let n = u.recv(&mut buf).expect("an answer through the Service");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        };
        assert_eq!(ask(&u), format!("b {a_ip}"));
        assert_eq!(ask(&u), format!("b {a_ip}"), "the flow keeps its backend");
        program(&m, fe, base + 3, &[(100 * base + 4, c_ip, 5353)]);
        m.remove_backend(100 * base + 3).unwrap();
        assert_eq!(ask(&u), format!("c {a_ip}"), "moved on the next datagram");
        for (ns, ip) in [(&b.ns, b_ip), (&c.ns, c_ip)] {
            let s = ns
                .run(|| UdpSocket::bind(SocketAddr::new(ip, 0)))
                .unwrap()
                .unwrap();
            s.send_to(b"stop", SocketAddr::new(ip, 5353)).unwrap();
        }
        sb.join().unwrap();
        sc.join().unwrap();

        let st = m.stats(base + 3).unwrap().unwrap();
        assert_eq!(st.flows, 2, "chosen twice: {st:?}");
        assert_eq!(m.stats(base + 2).unwrap().unwrap().rejected, 1);
    }

    let view = node
        .ferrite(&["services", "--bpffs-root", root.to_str().unwrap()])
        .unwrap();
    for line in [
        "10.96.7.7:80/tcp id 11: 1 backends",
        "[fd00:96::7]:53/udp id 23: 1 backends",
        "10.96.7.7:81/tcp id 12: 0 backends",
        "no backend: answered \"port unreachable\"",
    ] {
        assert!(view.contains(line), "{line:?} in\n{view}");
    }
    drop::<[Pod; 3]>([a, b, c]);
}

/// hostPorts through the plugin itself (ferrite with the portMappings
/// capability, as the agent's conflist declares it): ADD writes the pod's
/// runtimeConfig.portMappings, a pod of the node reaches the node's
/// address on the hostPort (TCP and UDP) and hears back from it, `ferrite
/// services` lists them, DEL removes them; a mapping that cannot be served
/// is refused before anything is made; without the capability the
/// mappings are another plugin's and nothing is written.
#[test]
fn host_ports_written_by_add_and_removed_by_del() {
    if !privileged("host_ports_written_by_add_and_removed_by_del") {
        return;
    }
    let mut node = Node::new("10.75.0.0/24").unwrap();
    node.extra = json!({ "capabilities": { "portMappings": true } });
    // The node's own address (the agent would tell the programs).
    node.ns.exec("ip addr add 192.0.2.75/32 dev lo").unwrap();
    let node_ip: IpAddr = "192.0.2.75".parse().unwrap();
    let a = node.add_pod("1.0.0").unwrap();
    let root = node.bpffs.path().join("ferrite");
    let dp = Datapath::open(&root).unwrap().expect("loaded by ADD");
    let m = dp.service_maps().unwrap();
    dp.policy_maps()
        .unwrap()
        .set_host_addresses(&[node_ip])
        .unwrap();
    m.set_node_frontends(false, true).unwrap();

    let mappings = json!([
        { "hostPort": 28080, "containerPort": 8080, "protocol": "tcp" },
        { "hostPort": 28080, "containerPort": 5353, "protocol": "udp", "hostIP": "192.0.2.75" },
    ]);
    let mut conf = node.conf("1.0.0");
    conf["runtimeConfig"] = json!({ "portMappings": mappings });

    // Refused whole, nothing made: an SCTP mapping.
    let mut bad = conf.clone();
    bad["runtimeConfig"]["portMappings"][1]["protocol"] = json!("sctp");
    let links = node.links_settled().unwrap();
    let ns = crate::harness::Netns::new("p").unwrap();
    let inv = node
        .invoke("ADD", "hp-bad", Some(&ns.path()), "eth0", &bad, &[])
        .unwrap();
    assert_eq!(inv.code(), 7, "{}", inv.stdout);
    assert!(inv.stdout.contains("portMappings[1]"), "{}", inv.stdout);
    assert_eq!(node.links_settled().unwrap(), links, "no veth made");
    assert!(m.host_ports().unwrap().is_empty());

    let mut b = node.add_pod_with(conf.clone()).unwrap();
    let (b_ip, ns) = (b.ip(), &b.ns);
    let view = node
        .ferrite(&["services", "--bpffs-root", root.to_str().unwrap()])
        .unwrap();
    for line in [
        format!("HostPort 0.0.0.0:28080/tcp -> {b_ip}:8080"),
        format!("HostPort 192.0.2.75:28080/udp -> {b_ip}:5353"),
        "hostPorts served (2)".to_string(),
    ] {
        assert!(view.contains(&line), "{line:?} in\n{view}");
    }

    // TCP from a pod of the node to the node's address: into b, which
    // sees a; the client sees the node's address.
    let l = ns
        .run(|| TcpListener::bind(SocketAddr::new(b_ip, 8080)))
        .unwrap()
        .unwrap();
    let srv = serve_tcp_once(l);
    let seen = tcp_through(&a.ns, SocketAddr::new(node_ip, 28080), 256 * 1024);
    assert_eq!(seen, a.ip().to_string(), "the pod sees the client");
    srv.join().unwrap().unwrap();
    // UDP, connected: the answer comes from the hostPort.
    let su = serve_udp(ns, b_ip, 5353, "b");
    let u =
        a.ns.run(|| UdpSocket::bind(SocketAddr::new(a.ip(), 0)))
            .unwrap()
            .unwrap();
    u.connect(SocketAddr::new(node_ip, 28080)).unwrap();
    u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    u.send(b"who").unwrap();
    let mut buf = [0u8; 256];
    let n = u.recv(&mut buf).expect("an answer from the hostPort");
    assert_eq!(String::from_utf8_lossy(&buf[..n]), format!("b {}", a.ip()));
    let stop = ns
        .run(|| UdpSocket::bind(SocketAddr::new(b_ip, 0)))
        .unwrap()
        .unwrap();
    stop.send_to(b"stop", SocketAddr::new(b_ip, 5353)).unwrap();
    su.join().unwrap();

    // DEL (the runtime sends the mappings again): gone.
    b.del().unwrap().expect_ok();
    assert!(m.host_ports().unwrap().is_empty());
    let err =
        a.ns.run(|| {
            TcpStream::connect_timeout(&SocketAddr::new(node_ip, 28080), Duration::from_secs(2))
        })
        .unwrap();
    assert!(err.is_err(), "nothing behind the hostPort after DEL");

    // Without the capability the mappings are portmap's: none written.
    let mut other = conf.clone();
    other.as_object_mut().unwrap().remove("capabilities");
    let c = node.add_pod_with(other).unwrap();
    assert!(m.host_ports().unwrap().is_empty());
    drop::<[Pod; 2]>([a, c]);
}
