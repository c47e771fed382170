//! What Services cost in kernel memory, as the kernel counts it (each
//! map's `memlock` in fdinfo): run as root with a bpffs root of your own,
//! e.g.
//!
//!     mkdir -p /tmp/sm && mount -t bpf bpf /tmp/sm
//!     cargo run --release --example service_memory -- /tmp/sm/ferrite 5000 4
//!
//! writes FRONTENDS frontends with BACKENDS backends each, then prints each
//! Service map's memory before and after, and per frontend and backend.

// A tool run by hand or by scripts/bench: its report is its stdout.
#![allow(clippy::print_stdout)]

use std::net::{IpAddr, Ipv4Addr};

use ferrite_datapath::service::{Backend, Frontend, FrontendState};
use ferrite_datapath::Datapath;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = std::path::PathBuf::from(&args[1]);
    let frontends: u32 = args.get(2).map_or(5000, |a| a.parse().unwrap());
    let per: u32 = args.get(3).map_or(4, |a| a.parse().unwrap());
    let (dp, _) = Datapath::open_or_load(&root).expect("load");
    let maps = dp.service_maps().expect("service maps");
    let before = dp.state_map_memory().unwrap();
    for f in 0..frontends {
        let id = f + 1;
        let mut ids = Vec::new();
        for b in 0..per {
            let bid = f * per + b + 1;
            maps.set_backend(
                bid,
                &Backend {
                    frontend: id,
                    addr: IpAddr::V4(Ipv4Addr::from(0x0af4_0000 + bid)),
                    port: 8080,
                    terminating: false,
                },
            )
            .expect("backend");
            ids.push(bid);
        }
        let fe = Frontend {
            addr: IpAddr::V4(Ipv4Addr::from(0x0a60_0000 + f)),
            port: 80,
            proto: 6,
        };
        maps.set_frontend(
            &fe,
            &FrontendState {
                id,
                backends: ids,
                affinity_timeout: None,
                source_nat: false,
            },
        )
        .expect("frontend");
    }
    let after = dp.state_map_memory().unwrap();
    println!("{frontends} frontends x {per} backends"); // stdout-ok: the report
    let head = format!(
        "{:<18} {:>12} {:>12} {:>14}",
        "map", "before", "after", "per frontend"
    );
    println!("{head}"); // stdout-ok: the report
    for ((name, b), (_, a)) in before.iter().zip(&after) {
        if !name.starts_with("ferrite_svc") && name != "ferrite_backend" {
            continue;
        }
        let per = (*a as f64 - *b as f64) / f64::from(frontends);
        println!("{name:<18} {b:>12} {a:>12} {per:>14.1}"); // stdout-ok: the report
    }
}
