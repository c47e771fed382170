//! podman 4 with its CNI network backend: a ferrite network (with the
//! reference portmap plugin chained after it) in a private CNI conf
//! directory, private storage, a local busybox image.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use crate::harness::{
    assert_clean, busybox_rootfs, kill, pids_mentioning, ping, privileged, run_in, serial, sh,
    unique, wait_for, CgroupParent, HostDirs, Netns, Network, TempDir,
};

const IMAGE: &str = "ferrite.test/busybox:1";
const SUBNET: &str = "10.245.0.0/24";

pub struct Podman<'a> {
    pub net: &'a Network,
    dir: TempDir,
    cgroup: CgroupParent,
    // Last: the hard-coded host directories go once everything else is gone.
    _host: HostDirs,
}

impl<'a> Podman<'a> {
    /// Private containers.conf and storage, the network's conflist with
    /// portmap chained after ferrite, and the busybox image imported.
    pub fn new(net: &'a Network) -> Result<Self> {
        let host = HostDirs::guard();
        let dir = TempDir::new("podman")?;
        let d = dir.path().display();
        // This machine's hard limits are nofile 20000 and nproc 96365;
        // podman's defaults (1048576) would be refused.
        let conf = format!(
            r#"[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "none"
tmp_dir = "{d}/tmp"
volume_path = "{d}/volumes"
static_dir = "{d}/storage/libpod"

[network]
network_backend = "cni"
cni_plugin_dirs = ["{bin}", "/usr/lib/cni"]
network_config_dir = "{conf}"
"#,
            bin = net.bin_dir().display(),
            conf = net.conf_dir().display(),
        );
        std::fs::write(dir.path().join("containers.conf"), conf)?;
        let storage = format!(
            "[storage]\ndriver = \"vfs\"\nrunroot = \"{d}/runroot\"\ngraphroot = \"{d}/storage\"\n"
        );
        std::fs::write(dir.path().join("storage.conf"), storage)?;
        let mut conflist = net.conflist();
        conflist["plugins"]
            .as_array_mut()
            .context("plugins")?
            .push(json!({ "type": "portmap", "capabilities": { "portMappings": true } }));
        net.write_conf(&format!("{}.conflist", net.name), &conflist)?;
        let p = Self {
            net,
            dir,
            cgroup: CgroupParent::new(),
            _host: host,
        };
        let rootfs = busybox_rootfs(&p.dir.path().join("image"))?;
        p.ok(&["import", "--quiet", &rootfs.display().to_string(), IMAGE])?;
        Ok(p)
    }

    /// podman in the node namespace with this instance's configuration.
    pub fn podman(&self, args: &[&str]) -> Result<Output> {
        Command::new("nsenter")
            .arg(format!("--net={}", self.net.node.path().display()))
            .arg("podman")
            .args(args)
            .env("CONTAINERS_CONF", self.dir.path().join("containers.conf"))
            .env(
                "CONTAINERS_STORAGE_CONF",
                self.dir.path().join("storage.conf"),
            )
            .output()
            .context("running podman")
    }

    pub fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.podman(args)?;
        if !out.status.success() {
            bail!(
                "podman {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `podman run -d` on the ferrite network.
    pub fn run(&self, name: &str, opts: &[&str], cmd: &[&str]) -> Result<Output> {
        let mut args = vec![
            "run",
            "-d",
            "--name",
            name,
            "--network",
            &self.net.name,
            "--cgroup-parent",
            &self.cgroup.path,
        ];
        args.extend_from_slice(opts);
        args.push(IMAGE);
        args.extend_from_slice(cmd);
        self.podman(&args)
    }

    pub fn run_sleeper(&self, name: &str, opts: &[&str]) -> Result<Container> {
        let out = self.run(name, opts, &["/bin/sleep", "600"])?;
        if !out.status.success() {
            bail!(
                "podman run {name} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        self.inspect(name)
    }

    pub fn inspect(&self, name: &str) -> Result<Container> {
        let v: Value = serde_json::from_str(&self.ok(&["inspect", name])?)?;
        let settings = &v[0]["NetworkSettings"];
        let ip = settings["Networks"][&self.net.name]["IPAddress"]
            .as_str()
            .with_context(|| format!("{name} has no address on the network: {settings}"))?
            .parse()?;
        let netns = settings["SandboxKey"]
            .as_str()
            .context("SandboxKey")?
            .into();
        Ok(Container {
            name: name.to_string(),
            ip,
            netns,
        })
    }
}

impl Drop for Podman<'_> {
    fn drop(&mut self) {
        let _ = self.podman(&["rm", "--all", "--force", "--time", "0"]);
        // conmon and anything else that names our private directories.
        for pid in pids_mentioning(&self.dir.path().display().to_string()) {
            kill(pid, libc::SIGKILL);
        }
        // Then `dir` unmounts and goes, then `_host`.
    }
}

#[derive(Debug)]
pub struct Container {
    pub name: String,
    pub ip: IpAddr,
    pub netns: PathBuf,
}

fn network() -> Result<Network> {
    Network::new(SUBNET)
}

#[test]
fn podman_containers_get_ferrite_addresses_and_reach_each_other() -> Result<()> {
    if !privileged("podman_containers_get_ferrite_addresses_and_reach_each_other") {
        return Ok(());
    }
    let _serial = serial();
    let net = network()?;
    let podman = Podman::new(&net)?;
    let a = podman.run_sleeper("a", &[])?;
    let b = podman.run_sleeper("b", &[])?;
    for c in [&a, &b] {
        assert!(net.contains(c.ip), "{c:?} outside {SUBNET}");
    }
    assert_ne!(a.ip, b.ip);
    assert!(ping(&a.netns, b.ip), "a cannot reach b");
    assert!(ping(&b.netns, a.ip), "b cannot reach a");
    for c in [&a, &b] {
        assert!(net.redirected(c.ip)? >= 2, "{}: {:?}", c.name, net.stats()?);
    }
    podman.ok(&["rm", "--force", "--time", "0", "a", "b"])?;
    assert!(!a.netns.exists() && !b.netns.exists());
    assert_clean(&net)?;
    for c in net.calls() {
        eprintln!("podman -> ferrite: {}", c.describe());
    }
    for w in net.log_warnings() {
        eprintln!("ferrite warned: {w}");
    }
    Ok(())
}

#[test]
fn podman_static_ip_is_honoured_or_refused_clearly() -> Result<()> {
    if !privileged("podman_static_ip_is_honoured_or_refused_clearly") {
        return Ok(());
    }
    let _serial = serial();
    let net = network()?;
    let podman = Podman::new(&net)?;
    let wanted = "10.245.0.50";
    let a = podman.run_sleeper("a", &["--ip", wanted])?;
    assert_eq!(a.ip.to_string(), wanted);
    let add = net
        .calls()
        .into_iter()
        .find(|c| c.command() == "ADD")
        .context("no ADD")?;
    assert!(
        add.var("CNI_ARGS")
            .split(';')
            .any(|kv| kv == format!("IP={wanted}")),
        "podman sent {}",
        add.var("CNI_ARGS")
    );
    eprintln!(
        "podman --ip -> ferrite: {}\n    stdin: {}",
        add.describe(),
        add.stdin
    );

    // Taken: podman fails and shows ferrite's reason.
    let taken = podman.run("b", &["--ip", wanted], &["/bin/sleep", "600"])?;
    let err = String::from_utf8_lossy(&taken.stderr);
    assert!(!taken.status.success(), "a taken address was granted");
    assert!(
        err.contains(r#"plugin type="ferrite" failed (add)"#) && err.contains(wanted),
        "unclear refusal: {err}"
    );
    eprintln!("podman on a taken --ip: {}", err.trim());

    // Outside every range.
    let outside = "10.9.0.50";
    let out = podman.run("c", &["--ip", outside], &["/bin/sleep", "600"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "an address outside the range was granted"
    );
    assert!(
        err.contains(r#"plugin type="ferrite" failed (add)"#) && err.contains(outside),
        "unclear refusal: {err}"
    );
    eprintln!("podman on an outside --ip: {}", err.trim());

    // The refusals took nothing.
    let alloc = net.allocations();
    assert_eq!(alloc.len(), 1, "{alloc:?}");
    assert!(alloc[0].starts_with(wanted));
    assert_eq!(net.host_veths()?.len(), 1);

    podman.ok(&["rm", "--all", "--force", "--time", "0"])?;
    assert_clean(&net)
}

#[test]
fn podman_published_port_reaches_the_container_through_portmap() -> Result<()> {
    if !privileged("podman_published_port_reaches_the_container_through_portmap") {
        return Ok(());
    }
    let _serial = serial();
    let net = network()?;
    // A client namespace cabled to the node: the published port is reached
    // on the node's address on that cable, as from another machine.
    let client = Netns::new("cli")?;
    let (node_if, node_ip, client_ip) = (unique("v"), "10.99.0.1", "10.99.0.2");
    sh(&format!(
        "ip link add {node_if} netns {node} type veth peer name eth0 netns {client} && \
         ip -n {node} addr add {node_ip}/24 dev {node_if} && ip -n {node} link set {node_if} up && \
         ip -n {client} addr add {client_ip}/24 dev eth0 && ip -n {client} link set eth0 up && \
         ip netns exec {node} sysctl -qw net.ipv4.ip_forward=1",
        node = net.node.name,
        client = client.name,
    ))?;
    let podman = Podman::new(&net)?;
    let out = podman.run(
        "web",
        &["-p", "18080:8080"],
        &["/bin/httpd", "-f", "-p", "8080", "-h", "/www"],
    )?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let web = podman.inspect("web")?;
    assert!(net.contains(web.ip));

    let addr: SocketAddr = format!("{node_ip}:18080").parse()?;
    let get = || -> Result<String> {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")?;
        let mut body = String::new();
        s.read_to_string(&mut body)?;
        Ok(body)
    };
    let body = wait_for(Duration::from_secs(10), || {
        run_in(&client.path(), get).ok()?.ok()
    })
    .context("the published port never answered from the client namespace")?;
    assert!(body.contains("ferrite"), "unexpected answer: {body}");

    // portmap built its DNAT from ferrite's prevResult: it names the pod.
    let nat = net.node.exec("iptables-save -t nat")?;
    assert!(
        nat.contains(&format!("--to-destination {}:8080", web.ip)),
        "{nat}"
    );
    podman.ok(&["rm", "--force", "--time", "0", "web"])?;
    let nat = net.node.exec("iptables-save -t nat")?;
    assert!(!nat.contains("CNI-DN-"), "portmap rules left: {nat}");
    assert_clean(&net)?;
    for c in net.calls() {
        eprintln!("podman -p -> ferrite: {}", c.describe());
    }
    Ok(())
}
