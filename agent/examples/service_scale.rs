// SPDX-License-Identifier: Apache-2.0
//! The agent's Service table at scale, measured in this process: SERVICES
//! Services (default 10,000) of one TCP port with 6 ready backends each
//! (60,000 backends, under the default limit of 65,536), compiled and
//! programmed into maps kept in memory. Prints each step's time and map
//! writes: the first sync, a resync with no change, one backend replaced
//! (a whole compile, then the agent's way: only that Service's frontends).
//!
//!     cargo run --release -p ferrite-agent --example service_scale [-- SERVICES]

// A tool run by hand: its report is its stdout.
#![allow(clippy::print_stdout)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use ferrite_agent::service::compile::{Limits, ServiceView};
use ferrite_agent::service::engine::{Backend, Engine, Frontend, FrontendState, ServiceTarget};
use ferrite_agent::service::model::{
    EndpointAddr, EndpointPort, EndpointsInfo, ServiceInfo, ServicePort, Subset, PROTO_TCP,
};

#[derive(Default)]
struct Maps {
    frontends: BTreeMap<Frontend, FrontendState>,
    backends: BTreeMap<u32, Backend>,
    writes: usize,
}

#[derive(Debug)]
struct Never;

impl std::fmt::Display for Never {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("never")
    }
}

impl std::error::Error for Never {}

impl ServiceTarget for Maps {
    type Error = Never;
    fn frontends(&self) -> Result<Vec<(Frontend, FrontendState)>, Never> {
        Ok(self
            .frontends
            .iter()
            .map(|(f, s)| (*f, s.clone()))
            .collect())
    }
    fn backends(&self) -> Result<Vec<(u32, Backend)>, Never> {
        Ok(self.backends.iter().map(|(i, b)| (*i, *b)).collect())
    }
    fn set_backend(&mut self, id: u32, b: &Backend) -> Result<(), Never> {
        self.writes += 1;
        self.backends.insert(id, *b);
        Ok(())
    }
    fn remove_backend(&mut self, id: u32) -> Result<(), Never> {
        self.writes += 1;
        self.backends.remove(&id);
        Ok(())
    }
    fn set_frontend(&mut self, fe: &Frontend, st: &FrontendState) -> Result<(), Never> {
        self.writes += 1;
        self.frontends.insert(*fe, st.clone());
        Ok(())
    }
    fn remove_frontend(&mut self, fe: &Frontend, _: &FrontendState) -> Result<(), Never> {
        self.writes += 1;
        self.frontends.remove(fe);
        Ok(())
    }
}

fn addr(n: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from(n))
}

fn main() {
    let services: u32 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000);
    let mut view = ServiceView::default();
    for i in 0..services {
        let key = ("ns".to_string(), format!("svc-{i}"));
        view.services.insert(
            key.clone(),
            ServiceInfo {
                namespace: key.0.clone(),
                name: key.1.clone(),
                external_name: false,
                cluster_ips: vec![addr(0x0a60_0000 + i)],
                ports: vec![ServicePort {
                    name: "http".into(),
                    proto: PROTO_TCP,
                    port: 80,
                    node_port: None,
                }],
                affinity: None,
                internal_local: false,
                external_local: false,
            },
        );
        view.endpoints.insert(
            key.clone(),
            EndpointsInfo {
                namespace: key.0,
                name: key.1,
                subsets: vec![Subset {
                    ready: (0..6)
                        .map(|b| EndpointAddr {
                            ip: addr(0x0af4_0000 + i * 8 + b),
                            node: Some("n1".into()),
                        })
                        .collect(),
                    not_ready: vec![],
                    ports: vec![EndpointPort {
                        name: "http".into(),
                        proto: PROTO_TCP,
                        port: 8080,
                    }],
                }],
            },
        );
    }
    let limits = Limits::default();
    let mut maps = Maps::default();
    let mut engine = Engine::new();
    let mut step = |what: &str, view: &ServiceView, maps: &mut Maps| {
        maps.writes = 0;
        let t0 = Instant::now();
        let table = view.table("n1", &limits, &BTreeSet::new());
        let compiled = t0.elapsed();
        let report = engine.sync(&table, maps).expect("in memory");
        println!(
            "{what}: compile {:.1} ms, sync {:.1} ms, {} map writes ({} frontends, {} backends, {} left out)",
            compiled.as_secs_f64() * 1e3,
            (t0.elapsed() - compiled).as_secs_f64() * 1e3,
            maps.writes,
            report.frontends,
            report.active_backends,
            report.left_out
        );
    };
    step("first sync", &view, &mut maps);
    step("resync, no change", &view, &mut maps);
    let key = ("ns".to_string(), "svc-0".to_string());
    view.endpoints.get_mut(&key).expect("svc-0").subsets[0].ready[0].ip = addr(0x0aff_0001);
    step("one backend replaced, whole compile", &view, &mut maps);

    let mut table = view.table("n1", &limits, &BTreeSet::new());
    view.endpoints.get_mut(&key).expect("svc-0").subsets[0].ready[0].ip = addr(0x0aff_0002);
    maps.writes = 0;
    let t0 = Instant::now();
    let touched = table
        .update_service(&view, &key, "n1", &limits)
        .expect("fits");
    let compiled = t0.elapsed();
    engine
        .sync_some(&table, &touched, &mut maps)
        .expect("in memory");
    println!(
        "one backend replaced, that Service only: compile {:.3} ms, sync {:.3} ms, {} map writes",
        compiled.as_secs_f64() * 1e3,
        (t0.elapsed() - compiled).as_secs_f64() * 1e3,
        maps.writes
    );
}
