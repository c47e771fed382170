//! Programs NetworkPolicy maps by hand, for `scripts/bench --policy`
//! (what the agent would write), run as root:
//!
//!     policy_setup ROOT namespaces NS...        ADD in NS starts pending
//!     policy_setup ROOT isolate IFINDEX PEER RULES
//!         isolate host veth IFINDEX both ways with RULES rules: each admits
//!         four pod addresses that are not PEER on one TCP port; the last
//!         also admits PEER on every port. Prints the rule set's entries.

// A tool run by hand or by scripts/bench: its report is its stdout.
#![allow(clippy::print_stdout)]

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr};

use ferrite_datapath::policy::{
    encode, Cidr, EndpointPolicy, Peers, PortRange, Ports, Rule, RuleSetRef,
};
use ferrite_datapath::Datapath;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = std::path::PathBuf::from(&args[1]);
    let (dp, _) = Datapath::open_or_load(&root).expect("load");
    let maps = dp.policy_maps().expect("policy maps");
    match args[2].as_str() {
        "namespaces" => {
            let ns: BTreeSet<String> = args[3..].iter().cloned().collect();
            maps.set_policy_namespaces(&ns).expect("polns");
        }
        "isolate" => {
            let ifindex: u32 = args[3].parse().expect("ifindex");
            let peer: IpAddr = args[4].parse().expect("peer");
            let n: u32 = args[5].parse().expect("rules");
            let mut rules: Vec<Rule> = (0..n)
                .map(|i| Rule {
                    peers: Peers::Some(
                        (0..4)
                            .map(|k| {
                                Cidr::host(IpAddr::V4(Ipv4Addr::from(0x0a63_0000 + i * 4 + k)))
                            })
                            .collect(),
                    ),
                    ports: Ports::Some(vec![PortRange {
                        proto: 6,
                        first: (1000 + i) as u16,
                        last: (1000 + i) as u16,
                    }]),
                })
                .collect();
            if let Some(last) = rules.last_mut() {
                if let Peers::Some(p) = &mut last.peers {
                    p.push(Cidr::host(peer));
                }
                last.ports = Ports::All;
            }
            let set = encode(&rules).expect("encode");
            let id = 1000 + ifindex;
            maps.write_rule_set(id, &set).expect("write");
            let r = RuleSetRef {
                id,
                words: set.words,
            };
            maps.set_endpoint(
                ifindex,
                &EndpointPolicy {
                    ingress: Some(r),
                    egress: Some(r),
                    pending: false,
                },
            )
            .expect("endpoint");
            let report = format!(
                "{} rules: {} port entries, {} peer entries",
                rules.len(),
                set.ports.len(),
                set.peers.len()
            );
            println!("{report}"); // stdout-ok: the tool's report
        }
        other => panic!("unknown mode {other}"),
    }
}
