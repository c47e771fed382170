//! What NetworkPolicy costs in kernel memory, per entry, as the kernel
//! counts it (each map's `memlock` in fdinfo): run as root with a bpffs
//! root of your own, e.g.
//!
//!     mkdir -p /tmp/pm && mount -t bpf bpf /tmp/pm
//!     cargo run --release --example policy_memory -- /tmp/pm/ferrite 1000 100
//!
//! writes one rule set whose rules admit PEERS distinct pod addresses on
//! PORTS distinct TCP ports (one rule per port, every peer in each), then
//! prints each policy map's memory before and after.

// A tool run by hand or by scripts/bench: its report is its stdout.
#![allow(clippy::print_stdout)]

use std::net::{IpAddr, Ipv4Addr};

use ferrite_datapath::policy::{encode, Cidr, Peers, PortRange, Ports, Rule};
use ferrite_datapath::Datapath;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = std::path::PathBuf::from(&args[1]);
    let peers: u32 = args.get(2).map_or(1000, |a| a.parse().unwrap());
    let ports: u16 = args.get(3).map_or(100, |a| a.parse().unwrap());
    let (dp, _) = Datapath::open_or_load(&root).expect("load");
    let before = dp.state_map_memory().unwrap();
    let addrs: Vec<Cidr> = (0..peers)
        .map(|i| Cidr::host(IpAddr::V4(Ipv4Addr::from(0x0af4_0000 + i))))
        .collect();
    let rules: Vec<Rule> = (0..ports)
        .map(|p| Rule {
            peers: Peers::Some(addrs.clone()),
            ports: Ports::Some(vec![PortRange {
                proto: 6,
                first: 1000 + p * 7,
                last: 1000 + p * 7,
            }]),
        })
        .collect();
    let set = encode(&rules).expect("encode");
    dp.policy_maps().unwrap().write_rule_set(1, &set).unwrap();
    let after = dp.state_map_memory().unwrap();
    let report = format!(
        "one rule set, {ports} rules x {peers} peers: {} port entries, {} peer entries",
        set.ports.len(),
        set.peers.len()
    );
    println!("{report}"); // stdout-ok: the tool's report
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        let entries = match name.as_str() {
            "ferrite_polport" => set.ports.len(),
            "ferrite_polpeer" => set.peers.len(),
            _ => 0,
        };
        let per = if entries > 0 {
            format!(", {:.0} B per entry", (a - b) as f64 / entries as f64)
        } else {
            String::new()
        };
        println!("{name:<16} {b:>10} B -> {a:>10} B{per}"); // stdout-ok: the report
    }
}
