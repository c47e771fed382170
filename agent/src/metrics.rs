// SPDX-License-Identifier: Apache-2.0
//! What the agent knows about itself, shared between its threads, and its
//! rendering as Prometheus text (exposition format 0.0.4).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferrite_datapath::{DatapathError, Endpoint, EndpointStats};

/// Read access to the pinned endpoint and counter maps. The datapath
/// implements it; tests use canned values.
pub trait EndpointCounters: Send + Sync {
    fn endpoints(&self) -> Result<Vec<(IpAddr, Endpoint)>, DatapathError>;
    fn stats(&self, ifindex: u32) -> Result<Option<EndpointStats>, DatapathError>;
}

impl EndpointCounters for ferrite_datapath::Datapath {
    fn endpoints(&self) -> Result<Vec<(IpAddr, Endpoint)>, DatapathError> {
        ferrite_datapath::Datapath::endpoints(self)
    }

    fn stats(&self, ifindex: u32) -> Result<Option<EndpointStats>, DatapathError> {
        ferrite_datapath::Datapath::stats(self, ifindex)
    }
}

/// The agent's state as the HTTP endpoints report it.
#[derive(Default)]
pub struct AgentState {
    /// The conflist is on disk with the node's pod CIDRs.
    pub conflist_written: AtomicBool,
    /// Routes were synced once from a complete node list.
    pub routes_synced: AtomicBool,
    pub routes_programmed: AtomicU64,
    /// Unix time of the last sync that finished without error (0: never).
    pub last_sync_seconds: AtomicU64,
    pub api_errors: AtomicU64,
    pub sync_errors: AtomicU64,
    pub metrics_read_errors: AtomicU64,
    counters: Mutex<Option<Arc<dyn EndpointCounters>>>,
    policy: Mutex<PolicyStatus>,
    services: Mutex<ServiceStatus>,
}

/// Cumulative buckets, Prometheus style: upper bounds in seconds (the
/// latencies measured are from a change to the maps written).
const LATENCY_BUCKETS: [f64; 10] = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0];

/// A Prometheus histogram of a latency (ADD to an endpoint programmed, a
/// Service change to the maps written).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    /// Observations at or below each of `LATENCY_BUCKETS`.
    pub buckets: [u64; 10],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, seconds: f64) {
        for (n, le) in self.buckets.iter_mut().zip(LATENCY_BUCKETS) {
            if seconds <= le {
                *n += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// What the policy thread last reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PolicyStatus {
    /// The policy thread ran one sync since the agent started.
    pub synced: bool,
    pub syncs: u64,
    pub sync_errors: u64,
    /// Endpoints with a policy entry the agent wrote.
    pub programmed: u64,
    /// Endpoints still waiting for their pod in the view.
    pub pending: u64,
    pub rule_sets: u64,
    /// Pods of this node whose policy is computed ahead of their ADD.
    pub precomputed: u64,
    /// Policies the datapath cannot express ("namespace/name: why"): the
    /// pods they select fail closed.
    pub failed: BTreeSet<String>,
    pub conntrack_entries: u64,
    pub last_sync_micros: u64,
    pub add_to_programmed: Histogram,
}

/// What the service thread last reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServiceStatus {
    /// The service thread ran one sync since the agent started.
    pub synced: bool,
    pub syncs: u64,
    pub sync_errors: u64,
    pub frontends: u64,
    pub active_backends: u64,
    pub terminating_backends: u64,
    /// Frontends (cluster IP x port) of protocols ferrite does not serve.
    pub left_to_kube_proxy: u64,
    /// Services over the limits, left out whole.
    pub left_out: u64,
    pub last_sync_micros: u64,
    /// The node's own socket hooks ferrite has attached (of 8: connect,
    /// sendmsg, recvmsg and getpeername, both families); 0 while
    /// kube-proxy serves the node's own traffic.
    pub host_socket_hooks: u64,
    /// From a watch event reaching the service thread to the maps written.
    pub event_to_datapath: Histogram,
}

impl AgentState {
    pub fn ready(&self) -> bool {
        self.conflist_written.load(Ordering::Relaxed) && self.routes_synced.load(Ordering::Relaxed)
    }

    /// Where per-endpoint counters come from, once the datapath is loaded.
    pub fn set_counters(&self, counters: Arc<dyn EndpointCounters>) {
        *self.counters.lock().unwrap_or_else(|e| e.into_inner()) = Some(counters);
    }

    pub fn policy_status(&self) -> PolicyStatus {
        self.policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_policy_status(&self, status: PolicyStatus) {
        *self.policy.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    pub fn policy_sync_failed(&self) {
        self.policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sync_errors += 1;
    }

    pub fn service_status(&self) -> ServiceStatus {
        self.services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn set_service_status(&self, status: ServiceStatus) {
        *self.services.lock().unwrap_or_else(|e| e.into_inner()) = status;
    }

    pub fn service_sync_failed(&self) {
        self.services
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .sync_errors += 1;
    }

    fn counters(&self) -> Option<Arc<dyn EndpointCounters>> {
        self.counters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads the maps (when loaded) and renders every metric.
    pub fn render(&self) -> String {
        let sample = self.counters().map(|c| read_endpoints(c.as_ref()));
        if let Some(Err(_)) = &sample {
            self.metrics_read_errors.fetch_add(1, Ordering::Relaxed);
        }
        render(&self.snapshot(), sample.and_then(Result::ok).as_deref())
    }

    pub fn snapshot(&self) -> StateSnapshot {
        StateSnapshot {
            ready: self.ready(),
            conflist_written: self.conflist_written.load(Ordering::Relaxed),
            routes_synced: self.routes_synced.load(Ordering::Relaxed),
            routes_programmed: self.routes_programmed.load(Ordering::Relaxed),
            last_sync_seconds: self.last_sync_seconds.load(Ordering::Relaxed),
            api_errors: self.api_errors.load(Ordering::Relaxed),
            sync_errors: self.sync_errors.load(Ordering::Relaxed),
            metrics_read_errors: self.metrics_read_errors.load(Ordering::Relaxed),
            policy: self.policy_status(),
            services: self.service_status(),
        }
    }
}

/// The agent's own numbers at one moment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StateSnapshot {
    pub ready: bool,
    pub conflist_written: bool,
    pub routes_synced: bool,
    pub routes_programmed: u64,
    pub last_sync_seconds: u64,
    pub api_errors: u64,
    pub sync_errors: u64,
    pub metrics_read_errors: u64,
    pub policy: PolicyStatus,
    pub services: ServiceStatus,
}

/// One pod (host veth) with its addresses and counters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSample {
    pub ifindex: u32,
    /// IPv4 first.
    pub ips: Vec<IpAddr>,
    pub stats: Option<EndpointStats>,
}

/// Groups the endpoint map's addresses by host veth and reads each veth's
/// counters once (a dual-stack pod has two addresses and one counter set).
pub fn read_endpoints(c: &dyn EndpointCounters) -> Result<Vec<EndpointSample>, DatapathError> {
    let mut by_ifindex: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
    for (ip, ep) in c.endpoints()? {
        by_ifindex.entry(ep.ifindex).or_default().push(ip);
    }
    let mut out = Vec::with_capacity(by_ifindex.len());
    for (ifindex, mut ips) in by_ifindex {
        ips.sort_by_key(|ip| (ip.is_ipv6(), *ip));
        out.push(EndpointSample {
            ifindex,
            ips,
            stats: c.stats(ifindex)?,
        });
    }
    Ok(out)
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Prometheus text for the agent's state and, when the datapath is loaded,
/// its endpoints. Series per endpoint carry `ifindex` and `ip` (the pod's
/// first address, IPv4 first).
pub fn render(state: &StateSnapshot, endpoints: Option<&[EndpointSample]>) -> String {
    let mut out = String::with_capacity(4096);
    let gauges: [(&str, &str, u64); 4] = [
        (
            "ferrite_agent_ready",
            "1 when the conflist is written and routes were synced once.",
            u64::from(state.ready),
        ),
        (
            "ferrite_agent_conflist_written",
            "1 when the CNI configuration is on disk.",
            u64::from(state.conflist_written),
        ),
        (
            "ferrite_agent_routes_programmed",
            "Routes to other nodes' pod CIDRs the agent keeps.",
            state.routes_programmed,
        ),
        (
            "ferrite_agent_last_sync_timestamp_seconds",
            "Unix time of the last sync that finished without error (0: never).",
            state.last_sync_seconds,
        ),
    ];
    for (name, help, value) in gauges {
        header(&mut out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    let counters: [(&str, &str, u64); 3] = [
        (
            "ferrite_agent_api_errors_total",
            "Errors talking to the Kubernetes API server.",
            state.api_errors,
        ),
        (
            "ferrite_agent_sync_errors_total",
            "Syncs of routes, masquerade or files that failed.",
            state.sync_errors,
        ),
        (
            "ferrite_agent_datapath_read_errors_total",
            "Scrapes that could not read the pinned maps.",
            state.metrics_read_errors,
        ),
    ];
    for (name, help, value) in counters {
        header(&mut out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    render_policy(&mut out, &state.policy);
    render_services(&mut out, &state.services);
    let Some(endpoints) = endpoints else {
        return out;
    };
    header(
        &mut out,
        "ferrite_endpoints",
        "gauge",
        "Pods (host veths) in the endpoint map.",
    );
    let _ = writeln!(out, "ferrite_endpoints {}", endpoints.len());
    header(
        &mut out,
        "ferrite_endpoint_addresses",
        "gauge",
        "Pod addresses in the endpoint map.",
    );
    let _ = writeln!(
        out,
        "ferrite_endpoint_addresses {}",
        endpoints.iter().map(|e| e.ips.len()).sum::<usize>()
    );
    type Field = fn(&EndpointStats) -> u64;
    let series: [(&str, &str, Field); 8] = [
        ("from_pod_packets", "Packets the pod sent.", |s| {
            s.from_pod_packets
        }),
        ("from_pod_bytes", "Bytes the pod sent.", |s| {
            s.from_pod_bytes
        }),
        (
            "redirected_packets",
            "Packets the pod sent that the fast path delivered to another pod.",
            |s| s.redirected_packets,
        ),
        (
            "redirected_bytes",
            "Bytes the pod sent that the fast path delivered to another pod.",
            |s| s.redirected_bytes,
        ),
        (
            "redirected_in_packets",
            "Packets another pod sent straight into this one (fast path).",
            |s| s.redirected_in_packets,
        ),
        (
            "redirected_in_bytes",
            "Bytes another pod sent straight into this one (fast path).",
            |s| s.redirected_in_bytes,
        ),
        (
            "via_stack_packets",
            "Packets the host stack delivered to the pod.",
            |s| s.to_pod_packets,
        ),
        (
            "via_stack_bytes",
            "Bytes the host stack delivered to the pod.",
            |s| s.to_pod_bytes,
        ),
    ];
    for (suffix, help, field) in series {
        let name = format!("ferrite_endpoint_{suffix}_total");
        header(&mut out, &name, "counter", help);
        for e in endpoints {
            if let Some(s) = &e.stats {
                let _ = writeln!(out, "{name}{{{}}} {}", labels(e), field(s));
            }
        }
    }
    let name = "ferrite_endpoint_drops_total";
    header(
        &mut out,
        name,
        "counter",
        "Packets the pod sent that ferrite dropped, by reason.",
    );
    for e in endpoints {
        if let Some(s) = &e.stats {
            for (reason, n) in &s.drops {
                let _ = writeln!(out, "{name}{{{},reason=\"{reason}\"}} {n}", labels(e));
            }
        }
    }
    out
}

fn render_policy(out: &mut String, p: &PolicyStatus) {
    if !p.synced {
        return;
    }
    let gauges: [(&str, &str, u64); 6] = [
        (
            "ferrite_policy_pods_computed_ahead",
            "Pods of this node in namespaces with policies whose rules wait for their ADD.",
            p.precomputed,
        ),
        (
            "ferrite_policy_endpoints_programmed",
            "Local endpoints isolated by a NetworkPolicy, with their rules in the maps.",
            p.programmed,
        ),
        (
            "ferrite_policy_endpoints_pending",
            "Local endpoints still dropping everything while their policy is computed.",
            p.pending,
        ),
        (
            "ferrite_policy_rule_sets",
            "Distinct rule sets in the maps (endpoints with the same rules share one).",
            p.rule_sets,
        ),
        (
            "ferrite_policy_conntrack_entries",
            "Flows in the connection-tracking table.",
            p.conntrack_entries,
        ),
        (
            "ferrite_policy_last_sync_microseconds",
            "How long the last policy sync took.",
            p.last_sync_micros,
        ),
    ];
    for (name, help, value) in gauges {
        header(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    for (name, help, value) in [
        ("ferrite_policy_syncs_total", "Policy syncs run.", p.syncs),
        (
            "ferrite_policy_sync_errors_total",
            "Policy syncs that failed (retried).",
            p.sync_errors,
        ),
    ] {
        header(out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    let name = "ferrite_policy_failed";
    header(
        out,
        name,
        "gauge",
        "NetworkPolicies the datapath cannot express: the pods they select fail closed.",
    );
    for f in &p.failed {
        let (policy, why) = f.split_once(": ").unwrap_or((f, ""));
        let _ = writeln!(
            out,
            "{name}{{policy=\"{}\",reason=\"{}\"}} 1",
            escape(policy),
            escape(why)
        );
    }
    let name = "ferrite_policy_add_to_programmed_seconds";
    header(
        out,
        name,
        "histogram",
        "From ADD starting an endpoint policy-pending to its rules in the maps.",
    );
    render_histogram(out, name, &p.add_to_programmed);
}

fn render_histogram(out: &mut String, name: &str, h: &Histogram) {
    for (n, le) in h.buckets.iter().zip(LATENCY_BUCKETS) {
        let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", h.count);
    let _ = writeln!(out, "{name}_sum {}", h.sum);
    let _ = writeln!(out, "{name}_count {}", h.count);
}

fn render_services(out: &mut String, s: &ServiceStatus) {
    if !s.synced && s.sync_errors == 0 {
        return;
    }
    let gauges: [(&str, &str, u64); 5] = [
        (
            "ferrite_services_frontends",
            "Service frontends (cluster IP, port, protocol) in the maps.",
            s.frontends,
        ),
        (
            "ferrite_services_left_to_kube_proxy",
            "Service frontends of protocols ferrite does not serve (SCTP and others).",
            s.left_to_kube_proxy,
        ),
        (
            "ferrite_services_left_out",
            "Services over the map limits, left out whole.",
            s.left_out,
        ),
        (
            "ferrite_services_last_sync_microseconds",
            "How long the last Service sync took.",
            s.last_sync_micros,
        ),
        (
            "ferrite_services_host_socket_hooks",
            "Socket hooks (of 8) through which the node's own processes reach Services; 0 where kube-proxy serves them.",
            s.host_socket_hooks,
        ),
    ];
    for (name, help, value) in gauges {
        header(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {value}");
    }
    let name = "ferrite_services_backends";
    header(
        out,
        name,
        "gauge",
        "Service backends in the maps: active take new flows, terminating only flows already there.",
    );
    let _ = writeln!(out, "{name}{{state=\"active\"}} {}", s.active_backends);
    let _ = writeln!(
        out,
        "{name}{{state=\"terminating\"}} {}",
        s.terminating_backends
    );
    for (name, help, value) in [
        (
            "ferrite_services_syncs_total",
            "Service syncs run.",
            s.syncs,
        ),
        (
            "ferrite_services_sync_errors_total",
            "Service syncs that failed (retried).",
            s.sync_errors,
        ),
    ] {
        header(out, name, "counter", help);
        let _ = writeln!(out, "{name} {value}");
    }
    let name = "ferrite_services_event_to_datapath_seconds";
    header(
        out,
        name,
        "histogram",
        "From a Service or Endpoints change reaching the agent's service thread to the maps written.",
    );
    render_histogram(out, name, &s.event_to_datapath);
}

/// A label value as the text format wants it.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn labels(e: &EndpointSample) -> String {
    let ip = e.ips.first().map(ToString::to_string).unwrap_or_default();
    format!("ifindex=\"{}\",ip=\"{ip}\"", e.ifindex)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrite_datapath::DropReason;

    fn stats(n: u64) -> EndpointStats {
        EndpointStats {
            from_pod_packets: n,
            from_pod_bytes: n * 100,
            redirected_packets: n / 2,
            redirected_bytes: n * 50,
            to_pod_packets: 3,
            to_pod_bytes: 300,
            redirected_in_packets: 4,
            redirected_in_bytes: 400,
            drops: DropReason::ALL
                .iter()
                .map(|r| (*r, u64::from(*r == DropReason::SpoofedIp) * 9))
                .collect(),
        }
    }

    struct Canned(Vec<(IpAddr, Endpoint)>);

    impl EndpointCounters for Canned {
        fn endpoints(&self) -> Result<Vec<(IpAddr, Endpoint)>, DatapathError> {
            Ok(self.0.clone())
        }
        fn stats(&self, ifindex: u32) -> Result<Option<EndpointStats>, DatapathError> {
            Ok((ifindex != 99).then(|| stats(u64::from(ifindex))))
        }
    }

    fn ep(ifindex: u32) -> Endpoint {
        Endpoint {
            ifindex,
            flags: 0,
            pod_mac: [2, 0, 0, 0, 0, 1],
            host_mac: [2, 0, 0, 0, 0, 2],
        }
    }

    #[test]
    fn groups_addresses_by_veth() {
        let c = Canned(vec![
            ("fd00::5".parse().unwrap(), ep(12)),
            ("10.244.1.5".parse().unwrap(), ep(12)),
            ("10.244.1.6".parse().unwrap(), ep(13)),
        ]);
        let s = read_endpoints(&c).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            s[0].ips,
            vec![
                "10.244.1.5".parse::<IpAddr>().unwrap(),
                "fd00::5".parse().unwrap()
            ]
        );
        assert_eq!(s[1].stats.as_ref().unwrap().from_pod_packets, 13);
    }

    #[test]
    fn renders_state_without_a_datapath() {
        let text = render(
            &StateSnapshot {
                ready: true,
                conflist_written: true,
                routes_programmed: 4,
                last_sync_seconds: 1_700_000_000,
                api_errors: 2,
                ..Default::default()
            },
            None,
        );
        assert!(text.contains("\nferrite_agent_ready 1\n"));
        assert!(text.contains("\nferrite_agent_routes_programmed 4\n"));
        assert!(text.contains("\nferrite_agent_last_sync_timestamp_seconds 1700000000\n"));
        assert!(text.contains(
            "# TYPE ferrite_agent_api_errors_total counter\nferrite_agent_api_errors_total 2\n"
        ));
        assert!(!text.contains("ferrite_endpoints"));
    }

    #[test]
    fn renders_endpoints_and_drops() {
        let c = Canned(vec![
            ("10.244.1.5".parse().unwrap(), ep(12)),
            ("fd00::5".parse().unwrap(), ep(12)),
            ("10.244.1.9".parse().unwrap(), ep(99)),
        ]);
        let samples = read_endpoints(&c).unwrap();
        let text = render(&StateSnapshot::default(), Some(&samples));
        assert!(text.contains("\nferrite_endpoints 2\n"));
        assert!(text.contains("\nferrite_endpoint_addresses 3\n"));
        assert!(text.contains(
            "\nferrite_endpoint_from_pod_packets_total{ifindex=\"12\",ip=\"10.244.1.5\"} 12\n"
        ));
        assert!(text.contains(
            "\nferrite_endpoint_via_stack_bytes_total{ifindex=\"12\",ip=\"10.244.1.5\"} 300\n"
        ));
        assert!(text.contains(
            "\nferrite_endpoint_redirected_in_packets_total{ifindex=\"12\",ip=\"10.244.1.5\"} 4\n"
        ));
        assert!(text.contains(
            "\nferrite_endpoint_drops_total{ifindex=\"12\",ip=\"10.244.1.5\",reason=\"SPOOFED_IP\"} 9\n"
        ));
        assert!(text.contains("reason=\"CSUM_ERR\"} 0\n"));
        // The veth without counters has no series.
        assert!(!text.contains("ifindex=\"99\""));
    }

    #[test]
    fn every_line_is_a_comment_or_a_sample() {
        let c = Canned(vec![("10.244.1.5".parse().unwrap(), ep(12))]);
        let samples = read_endpoints(&c).unwrap();
        let text = render(&StateSnapshot::default(), Some(&samples));
        for line in text.lines() {
            if line.starts_with('#') {
                assert!(line.starts_with("# HELP ferrite_") || line.starts_with("# TYPE ferrite_"));
                continue;
            }
            let (name, value) = line.rsplit_once(' ').unwrap();
            assert!(value.parse::<u64>().is_ok(), "{line}");
            let metric = name.split('{').next().unwrap();
            assert!(
                metric
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
                "{line}"
            );
            assert!(text.contains(&format!("# TYPE {metric} ")), "{metric}");
        }
    }

    #[test]
    fn readiness_needs_conflist_and_routes() {
        let s = AgentState::default();
        assert!(!s.ready());
        s.conflist_written.store(true, Ordering::Relaxed);
        assert!(!s.ready());
        s.routes_synced.store(true, Ordering::Relaxed);
        assert!(s.ready());
        s.set_counters(Arc::new(Canned(vec![])));
        assert!(s.render().contains("\nferrite_endpoints 0\n"));
    }

    #[test]
    fn renders_policy_once_synced_with_failed_policies_and_the_histogram() {
        let mut state = StateSnapshot::default();
        assert!(
            !render(&state, None).contains("ferrite_policy_"),
            "nothing before a sync"
        );
        let mut p = PolicyStatus {
            synced: true,
            programmed: 3,
            precomputed: 5,
            failed: ["x/odd: protocol \"ICMP\"".to_string()].into(),
            ..Default::default()
        };
        for s in [0.0, 0.0005, 0.003, 2.0] {
            p.add_to_programmed.observe(s);
        }
        state.policy = p;
        let out = render(&state, None);
        assert!(out.contains("ferrite_policy_endpoints_programmed 3\n"));
        assert!(out.contains("ferrite_policy_pods_computed_ahead 5\n"));
        assert!(out.contains(
            "ferrite_policy_failed{policy=\"x/odd\",reason=\"protocol \\\"ICMP\\\"\"} 1\n"
        ));
        assert!(out.contains("ferrite_policy_add_to_programmed_seconds_bucket{le=\"0.001\"} 2\n"));
        assert!(out.contains("ferrite_policy_add_to_programmed_seconds_bucket{le=\"0.005\"} 3\n"));
        assert!(out.contains("ferrite_policy_add_to_programmed_seconds_bucket{le=\"+Inf\"} 4\n"));
        assert!(out.contains("ferrite_policy_add_to_programmed_seconds_count 4\n"));
    }

    #[test]
    fn renders_services_once_synced() {
        let mut state = StateSnapshot::default();
        assert!(!render(&state, None).contains("ferrite_services_"));
        state.services.sync_errors = 1;
        assert!(
            render(&state, None).contains("\nferrite_services_sync_errors_total 1\n"),
            "failures show before a first sync"
        );
        let mut s = ServiceStatus {
            synced: true,
            syncs: 3,
            frontends: 4,
            active_backends: 6,
            terminating_backends: 1,
            left_to_kube_proxy: 2,
            left_out: 1,
            last_sync_micros: 250,
            host_socket_hooks: 8,
            ..Default::default()
        };
        s.event_to_datapath.observe(0.0015);
        s.event_to_datapath.observe(0.2);
        state.services = s;
        let out = render(&state, None);
        for line in [
            "ferrite_services_frontends 4\n",
            "ferrite_services_backends{state=\"active\"} 6\n",
            "ferrite_services_backends{state=\"terminating\"} 1\n",
            "ferrite_services_left_to_kube_proxy 2\n",
            "ferrite_services_left_out 1\n",
            "ferrite_services_syncs_total 3\n",
            "ferrite_services_last_sync_microseconds 250\n",
            "ferrite_services_host_socket_hooks 8\n",
            "ferrite_services_event_to_datapath_seconds_bucket{le=\"0.001\"} 0\n",
            "ferrite_services_event_to_datapath_seconds_bucket{le=\"0.002\"} 1\n",
            "ferrite_services_event_to_datapath_seconds_bucket{le=\"0.5\"} 2\n",
            "ferrite_services_event_to_datapath_seconds_count 2\n",
            "# TYPE ferrite_services_event_to_datapath_seconds histogram\n",
        ] {
            assert!(out.contains(line), "{line} not in\n{out}");
        }
    }
}
