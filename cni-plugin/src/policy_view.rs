// SPDX-License-Identifier: Apache-2.0
//! `ferrite policy`: each endpoint's NetworkPolicy as the pinned maps hold
//! it (the agent writes them; this only reads).

use std::collections::BTreeMap;
use std::io::Write;
use std::net::IpAddr;

use ferrite_datapath::policy::{describe, Encoded, RuleSetRef};
use ferrite_datapath::Datapath;

fn direction(
    out: &mut dyn Write,
    name: &str,
    r: Option<RuleSetRef>,
    sets: &BTreeMap<u32, Encoded>,
    pending: bool,
) -> std::io::Result<()> {
    let word = if name == "ingress" { "from" } else { "to" };
    match r {
        None if pending => writeln!(out, "  {name}: pending (everything dropped)"),
        None => writeln!(out, "  {name}: not isolated (everything allowed)"),
        Some(r) => {
            let Some(set) = sets.get(&r.id) else {
                return writeln!(
                    out,
                    "  {name}: rule set {} (missing from the maps: nothing allowed)",
                    r.id
                );
            };
            let rules = describe(set);
            if rules.is_empty() {
                return writeln!(out, "  {name}: rule set {}: nothing allowed", r.id);
            }
            writeln!(out, "  {name}: rule set {}, {} rules", r.id, rules.len())?;
            for (i, rule) in rules.iter().enumerate() {
                let mut line = format!("    {i}: {word} {}", rule.peers.join(", "));
                if !rule.except.is_empty() {
                    line.push_str(&format!(" except {}", rule.except.join(", ")));
                }
                line.push_str(&format!("; ports {}", rule.ports.join(", ")));
                writeln!(out, "{line}")?;
            }
            Ok(())
        }
    }
}

/// Writes every endpoint (by host veth) with its pod, addresses and rules,
/// then the node-wide settings the programs read.
pub fn write(dp: &Datapath, out: &mut dyn Write) -> anyhow::Result<()> {
    let maps = dp.policy_maps()?;
    let sets = maps.rule_sets()?;
    let policies: BTreeMap<u32, _> = maps.endpoints()?.into_iter().collect();
    let pods: BTreeMap<u32, (String, String)> = maps
        .pod_ids()?
        .into_iter()
        .map(|(i, ns, n)| (i, (ns, n)))
        .collect();
    let mut addrs: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
    for (ip, ep) in dp.endpoints()? {
        addrs.entry(ep.ifindex).or_default().push(ip);
    }
    for (ifindex, ips) in &addrs {
        let pod = pods
            .get(ifindex)
            .map_or("-".to_string(), |(ns, n)| format!("{ns}/{n}"));
        let ips: Vec<String> = ips.iter().map(ToString::to_string).collect();
        writeln!(out, "endpoint {ifindex} {pod} {}", ips.join(" "))?;
        let p = policies.get(ifindex).copied().unwrap_or_default();
        direction(out, "ingress", p.ingress, &sets, p.pending)?;
        direction(out, "egress", p.egress, &sets, p.pending)?;
    }
    let ns: Vec<String> = maps.policy_namespaces()?.into_iter().collect();
    writeln!(
        out,
        "namespaces with policies (new pods there start pending): {}",
        if ns.is_empty() {
            "-".into()
        } else {
            ns.join(" ")
        }
    )?;
    let host: Vec<String> = maps
        .host_addresses()?
        .iter()
        .map(ToString::to_string)
        .collect();
    writeln!(
        out,
        "node addresses (always reach local pods): {}",
        host.join(" ")
    )?;
    let svc: Vec<String> = maps
        .service_cidrs()?
        .iter()
        .map(|(a, p)| format!("{a}/{p}"))
        .collect();
    writeln!(
        out,
        "service CIDRs (egress checked after translation): {}",
        svc.join(" ")
    )?;
    writeln!(
        out,
        "connection-tracking entries: {}",
        maps.conntrack_len()?
    )?;
    Ok(())
}
