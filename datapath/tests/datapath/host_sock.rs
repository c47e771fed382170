//! The node's own sockets reaching Services (bpf/host_sock.c, issue 14):
//! real sockets of processes in a private cgroup and network namespace,
//! with the programs attached to that cgroup. A client in the "host"
//! namespace reaches a frontend's backend over TCP, connected and
//! unconnected UDP, IPv4 and IPv6, and sees the Service's address as its
//! peer; a frontend without backends refuses at once; a client of the
//! same cgroup in another namespace (a pod) is left alone; attaching
//! again keeps the links, detaching ends them.

use std::{
    ffi::CString,
    io::Write,
    net::{IpAddr, TcpListener, UdpSocket},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::Command,
};

use ferrite_datapath::{
    host_sock::{cgroup2_root, PROGRAMS},
    service::{Backend, Frontend, FrontendState, HostPort},
    Datapath,
};

use crate::harness::{in_netns, load, privileged};

/// A cgroup v2 directory of its own under the machine's v2 root; removed on
/// drop (its processes have exited by then).
struct Cgroup(PathBuf);

impl Cgroup {
    fn new(test: &str) -> Self {
        let root = cgroup2_root(Path::new("/sys/fs/cgroup")).expect("a cgroup v2 hierarchy");
        let path = root.join(format!("ferrite-test-{}-{test}", std::process::id()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self(path)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The client: one line per check, what the socket saw.
const CLIENT: &str = r#"
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[2] else socket.AF_INET
mode, vip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if mode == "tcp":
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect((vip, port))
        peer = s.getpeername()
        print(s.recv(100).decode().strip(), peer[0], peer[1])
    elif mode == "udp":
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.sendto(b"ping", (vip, port))
        data, frm = s.recvfrom(100)
        print(data.decode(), frm[0], frm[1])
    elif mode == "udp-connected":
        s = socket.socket(fam, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.connect((vip, port))
        s.send(b"ping")
        data = s.recv(100)
        peer = s.getpeername()
        print(data.decode(), peer[0], peer[1])
    elif mode == "pod":
        # In a namespace of its own, where the Service address is local:
        # an untranslated connect reaches this listener.
        srv = socket.socket(fam, socket.SOCK_STREAM)
        srv.bind((vip, port))
        srv.listen(1)
        s = socket.create_connection((vip, port), timeout=3)
        c, _ = srv.accept()
        c.sendall(b"pod-self\n")
        peer = s.getpeername()
        print(s.recv(100).decode().strip(), peer[0], peer[1])
except ConnectionRefusedError:
    print("refused")
except OSError as e:
    print("error", e.errno)
"#;

/// Runs the client in `cgroup` (and, for `pod`, in a new network
/// namespace with `vip` on its loopback); its one line of output.
fn client(cgroup: &Cgroup, mode: &str, vip: &str, port: u16) -> String {
    let procs = CString::new(cgroup.0.join("cgroup.procs").to_str().unwrap()).unwrap();
    let mut cmd = if mode == "pod" {
        let prefix = if vip.contains(':') { 128 } else { 32 };
        let mut c = Command::new("unshare");
        c.args(["--net", "sh", "-c"]).arg(format!(
            "ip link set lo up && ip addr add {vip}/{prefix} dev lo nodad && exec python3 -c \"$0\" pod {vip} {port}"
        ));
        c.arg(CLIENT);
        c
    } else {
        let mut c = Command::new("python3");
        c.args(["-c", CLIENT, mode, vip, &port.to_string()]);
        c
    };
    // SAFETY: between fork and exec only open/write/close, which are
    // async-signal-safe; the path was allocated before the fork.
    unsafe {
        cmd.pre_exec(move || {
            let fd = libc::open(procs.as_ptr(), libc::O_WRONLY);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let n = libc::write(fd, b"0".as_ptr().cast(), 1);
            libc::close(fd);
            if n != 1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let out = cmd.output().expect("running the client");
    assert!(
        out.status.success(),
        "client {mode} {vip}:{port}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// A TCP backend answering every connection with `name`, and a UDP one
/// answering every datagram with "pong".
fn backends(bind: &str, name: &'static str) -> (u16, u16) {
    let tcp = TcpListener::bind((bind, 0)).unwrap();
    let udp = UdpSocket::bind((bind, 0)).unwrap();
    let ports = (
        tcp.local_addr().unwrap().port(),
        udp.local_addr().unwrap().port(),
    );
    std::thread::spawn(move || {
        for mut c in tcp.incoming().map_while(Result::ok) {
            let _ = c.write_all(format!("{name}\n").as_bytes());
        }
    });
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((_, from)) = udp.recv_from(&mut buf) {
            let _ = udp.send_to(b"pong", from);
        }
    });
    ports
}

fn frontend(dp: &Datapath, id: u32, vip: &str, port: u16, proto: u8, backend: Option<(&str, u16)>) {
    let m = dp.service_maps().unwrap();
    let mut active = Vec::new();
    if let Some((addr, bport)) = backend {
        let bid = id * 100;
        m.set_backend(
            bid,
            &Backend {
                frontend: id,
                addr: addr.parse::<IpAddr>().unwrap(),
                port: bport,
                terminating: false,
            },
        )
        .unwrap();
        active.push(bid);
    }
    m.set_frontend(
        &Frontend {
            addr: vip.parse().unwrap(),
            port,
            proto,
        },
        &FrontendState {
            id,
            backends: active,
            affinity_timeout: None,
            source_nat: false,
        },
    )
    .unwrap();
}

#[test]
fn host_sockets_reach_services_and_pods_keep_the_address() {
    if !privileged("host_sockets_reach_services_and_pods_keep_the_address") {
        return;
    }
    let cgroup = Cgroup::new("hostsock");
    in_netns(move || {
        let t = load("host_sock");
        // As the agent sets it without kube-proxy, hostPorts served.
        t.dp.service_maps()
            .unwrap()
            .set_node_frontends(true, true)
            .unwrap();
        let st = Command::new("ip")
            .args(["link", "set", "lo", "up"])
            .status()
            .unwrap();
        assert!(st.success());
        let (tcp4, udp4) = backends("127.0.0.1", "backend-v4");
        let (tcp6, udp6) = backends("::1", "backend-v6");
        frontend(&t.dp, 1, "10.96.0.10", 80, 6, Some(("127.0.0.1", tcp4)));
        frontend(&t.dp, 2, "10.96.0.10", 53, 17, Some(("127.0.0.1", udp4)));
        frontend(&t.dp, 3, "fd00:96::10", 80, 6, Some(("::1", tcp6)));
        frontend(&t.dp, 4, "fd00:96::10", 53, 17, Some(("::1", udp6)));
        frontend(&t.dp, 5, "10.96.0.11", 80, 6, None);

        // Before the hooks: the Service address is nowhere.
        assert_eq!(
            client(&cgroup, "tcp", "10.96.0.10", 80),
            "error 101",
            "before attaching, 10.96.0.10 is unreachable"
        );

        let report = t.dp.attach_host_sockets(&cgroup.0).unwrap();
        assert_eq!(report.created, PROGRAMS.len());
        let root = t.dp.bpffs_root().to_owned();
        assert!(Datapath::host_sockets_attached(&root));

        assert_eq!(
            client(&cgroup, "tcp", "10.96.0.10", 80),
            "backend-v4 10.96.0.10 80"
        );
        assert_eq!(
            client(&cgroup, "udp", "10.96.0.10", 53),
            "pong 10.96.0.10 53"
        );
        assert_eq!(
            client(&cgroup, "udp-connected", "10.96.0.10", 53),
            "pong 10.96.0.10 53"
        );
        assert_eq!(
            client(&cgroup, "tcp", "fd00:96::10", 80),
            "backend-v6 fd00:96::10 80"
        );
        assert_eq!(
            client(&cgroup, "udp", "fd00:96::10", 53),
            "pong fd00:96::10 53"
        );
        assert_eq!(
            client(&cgroup, "udp-connected", "fd00:96::10", 53),
            "pong fd00:96::10 53"
        );
        // No backend: refused at connect, as kube-proxy's REJECT does.
        assert_eq!(client(&cgroup, "tcp", "10.96.0.11", 80), "refused");
        // A pod (same cgroup, its own namespace) keeps the Service address.
        assert_eq!(
            client(&cgroup, "pod", "10.96.0.10", 80),
            "pod-self 10.96.0.10 80"
        );
        assert_eq!(
            client(&cgroup, "pod", "fd00:96::10", 80),
            "pod-self fd00:96::10 80"
        );

        let m = t.dp.service_maps().unwrap();
        let flows = |id| m.stats(id).unwrap().map_or(0, |s| s.flows);
        assert_eq!((flows(1), flows(2), flows(3), flows(4)), (1, 2, 1, 2));
        assert_eq!(m.stats(5).unwrap().map_or(0, |s| s.rejected), 1);

        // hostPorts: on 127.0.0.1 itself, and on every address (loopback
        // included), as a hostNetwork pod reaches them.
        let hp = |host: &str, port: u16, proto: u8, to: u16| HostPort {
            frontend: Frontend {
                addr: host.parse().unwrap(),
                port,
                proto,
            },
            backend: "127.0.0.1".parse().unwrap(),
            backend_port: to,
        };
        m.add_hostport(&hp("127.0.0.1", 54321, 6, tcp4)).unwrap();
        m.add_hostport(&hp("0.0.0.0", 54322, 17, udp4)).unwrap();
        let host_ports = || {
            (
                client(&cgroup, "tcp", "127.0.0.1", 54321),
                client(&cgroup, "udp", "127.0.0.1", 54322),
            )
        };
        let served = (
            "backend-v4 127.0.0.1 54321".to_string(),
            "pong 127.0.0.1 54322".to_string(),
        );
        assert_eq!(host_ports(), served);
        // With kube-proxy: hostPorts still, ClusterIPs left to it.
        m.set_node_frontends(false, true).unwrap();
        assert_eq!(host_ports(), served);
        assert_eq!(client(&cgroup, "tcp", "10.96.0.10", 80), "error 101");
        // Served by portmap: nothing of the hooks.
        m.set_node_frontends(false, false).unwrap();
        assert_eq!(client(&cgroup, "tcp", "127.0.0.1", 54321), "refused");
        m.set_node_frontends(true, true).unwrap();

        // Again (an agent restart): the same links, nothing new.
        let again = t.dp.attach_host_sockets(&cgroup.0).unwrap();
        assert_eq!(
            (again.created, again.updated, again.unchanged),
            (0, 0, PROGRAMS.len())
        );

        // Detached: the address is nowhere again.
        assert_eq!(
            Datapath::detach_host_sockets(&root).unwrap(),
            PROGRAMS.len()
        );
        assert!(!Datapath::host_sockets_attached(&root));
        assert_eq!(client(&cgroup, "tcp", "10.96.0.10", 80), "error 101");
        assert_eq!(Datapath::detach_host_sockets(&root).unwrap(), 0);
    });
}
