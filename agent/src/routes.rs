// SPDX-License-Identifier: Apache-2.0
//! Routes to other nodes' pod CIDRs: what should be there, what is there,
//! and the smallest set of changes between them.
//!
//! Every route the agent installs carries [`RTPROT_FERRITE_NODES`]; that
//! number alone says a route is the agent's to replace or remove. Routes of
//! any other protocol are never changed, even when they point at a pod CIDR
//! the agent would route (that is reported as a conflict instead).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnetwork::IpNetwork;

/// The route protocol of the agent's routes to other nodes' pod CIDRs
/// (`ip route show proto 71`). Free in iproute2's rt_protos and the
/// kernel's `RTPROT_*` list. Not 70 (0x46): the CNI plugin marks the /32
/// routes to its pods with that one, and those are not the agent's to
/// remove.
pub const RTPROT_FERRITE_NODES: u8 = 71;

/// `RT_TABLE_MAIN`: the only table the agent writes.
pub const TABLE_MAIN: u32 = 254;

/// A route as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PresentRoute {
    pub destination: IpNetwork,
    pub gateway: Option<IpAddr>,
    pub protocol: u8,
    pub table: u32,
    /// The metric (`RTA_PRIORITY`), 0 when the kernel reports none.
    pub priority: u32,
}

/// What one sync changes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// Add or replace: destination via gateway.
    pub replace: Vec<(IpNetwork, IpAddr)>,
    /// The agent's routes nobody wants any more.
    pub delete: Vec<PresentRoute>,
    /// Wanted destinations already routed by someone else (their protocol):
    /// left alone.
    pub conflicts: Vec<(IpNetwork, u8)>,
    /// Wanted routes that are already right.
    pub unchanged: usize,
}

/// Compares the wanted routes with the present ones. Only routes with the
/// agent's protocol are ever replaced or deleted; deletions are meant to be
/// applied before replacements.
pub fn plan(desired: &BTreeMap<IpNetwork, IpAddr>, present: &[PresentRoute]) -> RoutePlan {
    let mut out = RoutePlan::default();
    let ours = |dst: IpNetwork| {
        present.iter().filter(move |r| {
            r.protocol == RTPROT_FERRITE_NODES && r.table == TABLE_MAIN && r.destination == dst
        })
    };
    for (dst, gw) in desired {
        let foreign = present.iter().find(|r| {
            r.table == TABLE_MAIN && r.destination == *dst && r.protocol != RTPROT_FERRITE_NODES
        });
        if let Some(f) = foreign {
            out.conflicts.push((*dst, f.protocol));
            continue;
        }
        let mine: Vec<&PresentRoute> = ours(*dst).collect();
        match mine.as_slice() {
            [one] if one.gateway == Some(*gw) => out.unchanged += 1,
            [] | [_] => out.replace.push((*dst, *gw)),
            // Several of ours (other metrics): start again from one.
            many => {
                out.delete.extend(many.iter().map(|r| (*r).clone()));
                out.replace.push((*dst, *gw));
            }
        }
    }
    for r in present
        .iter()
        .filter(|r| r.protocol == RTPROT_FERRITE_NODES)
    {
        let wanted = r.table == TABLE_MAIN
            && desired.contains_key(&r.destination)
            && !out.conflicts.iter().any(|(d, _)| *d == r.destination);
        if !wanted {
            out.delete.push(r.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNetwork {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn route(dst: &str, gw: &str, protocol: u8) -> PresentRoute {
        PresentRoute {
            destination: net(dst),
            gateway: Some(ip(gw)),
            protocol,
            table: TABLE_MAIN,
            priority: 0,
        }
    }

    fn desired(pairs: &[(&str, &str)]) -> BTreeMap<IpNetwork, IpAddr> {
        pairs.iter().map(|(d, g)| (net(d), ip(g))).collect()
    }

    #[test]
    fn adds_what_is_missing_and_keeps_what_is_right() {
        let want = desired(&[
            ("10.244.2.0/24", "192.0.2.2"),
            ("10.244.3.0/24", "192.0.2.3"),
        ]);
        let have = [route("10.244.2.0/24", "192.0.2.2", RTPROT_FERRITE_NODES)];
        let p = plan(&want, &have);
        assert_eq!(p.replace, vec![(net("10.244.3.0/24"), ip("192.0.2.3"))]);
        assert!(p.delete.is_empty());
        assert_eq!(p.unchanged, 1);
    }

    #[test]
    fn replaces_a_changed_gateway() {
        let want = desired(&[("fd00:244:2::/64", "2001:db8::22")]);
        let have = [route(
            "fd00:244:2::/64",
            "2001:db8::2",
            RTPROT_FERRITE_NODES,
        )];
        let p = plan(&want, &have);
        assert_eq!(
            p.replace,
            vec![(net("fd00:244:2::/64"), ip("2001:db8::22"))]
        );
        assert!(p.delete.is_empty());
    }

    #[test]
    fn deletes_only_its_own_unwanted_routes() {
        let have = [
            route("10.244.7.0/24", "192.0.2.7", RTPROT_FERRITE_NODES),
            route("10.244.8.0/24", "192.0.2.8", 4), // static
            route("10.244.1.5/32", "169.254.1.1", 70), // the plugin's pod route
            route("10.244.9.0/24", "192.0.2.9", 2), // kernel
        ];
        let p = plan(&BTreeMap::new(), &have);
        assert_eq!(p.delete, vec![have[0].clone()]);
        assert!(p.replace.is_empty());
    }

    #[test]
    fn a_foreign_route_to_a_wanted_cidr_is_a_conflict_not_a_replace() {
        let want = desired(&[("10.244.2.0/24", "192.0.2.2")]);
        let have = [route("10.244.2.0/24", "192.0.2.99", 4)];
        let p = plan(&want, &have);
        assert!(p.replace.is_empty());
        assert!(p.delete.is_empty());
        assert_eq!(p.conflicts, vec![(net("10.244.2.0/24"), 4)]);
    }

    #[test]
    fn its_route_beside_a_foreign_one_goes() {
        // Someone took the destination over: ferrite's copy is stale.
        let want = desired(&[("10.244.2.0/24", "192.0.2.2")]);
        let have = [
            route("10.244.2.0/24", "192.0.2.99", 4),
            PresentRoute {
                table: TABLE_MAIN,
                ..route("10.244.2.0/24", "192.0.2.2", RTPROT_FERRITE_NODES)
            },
        ];
        let p = plan(&want, &have);
        assert_eq!(p.delete, vec![have[1].clone()]);
    }

    #[test]
    fn its_routes_in_other_tables_are_stale() {
        let want = desired(&[("10.244.2.0/24", "192.0.2.2")]);
        let have = [PresentRoute {
            table: 100,
            ..route("10.244.2.0/24", "192.0.2.2", RTPROT_FERRITE_NODES)
        }];
        let p = plan(&want, &have);
        assert_eq!(p.replace.len(), 1);
        assert_eq!(p.delete, vec![have[0].clone()]);
    }

    #[test]
    fn several_of_its_routes_to_one_cidr_start_again_from_one() {
        let want = desired(&[("10.244.2.0/24", "192.0.2.2")]);
        let have = [
            route("10.244.2.0/24", "192.0.2.2", RTPROT_FERRITE_NODES),
            PresentRoute {
                priority: 50,
                ..route("10.244.2.0/24", "192.0.2.5", RTPROT_FERRITE_NODES)
            },
        ];
        let p = plan(&want, &have);
        assert_eq!(p.delete, have.to_vec());
        assert_eq!(p.replace, vec![(net("10.244.2.0/24"), ip("192.0.2.2"))]);
    }

    #[test]
    fn same_prefix_in_both_families_is_two_routes() {
        let want = desired(&[
            ("10.244.2.0/24", "192.0.2.2"),
            ("fd00:244:2::/64", "2001:db8::2"),
        ]);
        let p = plan(&want, &[]);
        assert_eq!(p.replace.len(), 2);
    }

    #[test]
    fn protocol_differs_from_the_plugins_pod_routes() {
        let plugin = include_str!("../../cni-plugin/src/netlink.rs");
        let line = plugin
            .lines()
            .find(|l| l.contains("pub const FERRITE_ROUTE_PROTOCOL: u8"))
            .expect("the plugin's route protocol");
        let value = line
            .rsplit('=')
            .next()
            .unwrap()
            .trim()
            .trim_end_matches(';');
        let plugin_proto = u8::from_str_radix(value.trim_start_matches("0x"), 16).unwrap();
        assert_ne!(plugin_proto, RTPROT_FERRITE_NODES);
        let rt_protos = [
            0u8, 1, 2, 3, 4, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 42, 99, 186, 187, 188, 189,
            192,
        ];
        assert!(!rt_protos.contains(&RTPROT_FERRITE_NODES));
    }
}
