// SPDX-License-Identifier: Apache-2.0
//! Programs the datapath from the view: each local endpoint's rules, per
//! direction, as a rule set shared by every endpoint with the same rules.
//!
//! A change never leaves an endpoint half-programmed: a new rule set is
//! written whole under a fresh id before an endpoint points at it, the
//! endpoint switches with one map write, and the old set goes once no
//! endpoint uses it. Ids are never reused within a run, and a restarted
//! agent starts above every id the maps hold, so the programs keep
//! enforcing the old sets until the new ones are in place.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ferrite_datapath::policy::{encode, Encoded, EndpointPolicy, Rule, RuleSetRef};
use ferrite_datapath::DatapathError;

use super::compile::View;

/// The maps, as the engine uses them (a fake in tests).
pub trait PolicyTarget {
    /// This node's endpoints: address and host veth.
    fn endpoints(&self) -> Result<Vec<(IpAddr, u32)>, DatapathError>;
    /// (host veth, namespace, pod) as ADD recorded them.
    fn pod_ids(&self) -> Result<Vec<(u32, String, String)>, DatapathError>;
    fn endpoint_policies(&self) -> Result<Vec<(u32, EndpointPolicy)>, DatapathError>;
    fn write_rule_set(&mut self, id: u32, set: &Encoded) -> Result<(), DatapathError>;
    fn remove_rule_set(&mut self, id: u32, set: &Encoded) -> Result<(), DatapathError>;
    /// Removes every rule set but `keep`; how many entries went.
    fn remove_rule_sets_except(&mut self, keep: &BTreeSet<u32>) -> Result<usize, DatapathError>;
    fn set_endpoint(&mut self, ifindex: u32, policy: &EndpointPolicy) -> Result<(), DatapathError>;
    fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError>;
    fn set_policy_namespaces(&mut self, namespaces: &BTreeSet<String>)
        -> Result<(), DatapathError>;
    /// The policies computed ahead for pods of this node (ADD copies one).
    fn pod_policies(&self) -> Result<Vec<(String, String, EndpointPolicy)>, DatapathError>;
    fn set_pod_policy(
        &mut self,
        namespace: &str,
        name: &str,
        policy: &EndpointPolicy,
    ) -> Result<(), DatapathError>;
    fn remove_pod_policy(&mut self, namespace: &str, name: &str) -> Result<(), DatapathError>;
}

struct RuleSetEntry {
    id: u32,
    encoded: Encoded,
}

/// What one sync left behind, for logs and /metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Endpoints with a policy entry the agent wrote.
    pub programmed: usize,
    /// Endpoints still pending (their pod not yet in the view).
    pub pending: usize,
    pub rule_sets: usize,
    /// Pods of this node whose policy waits for their ADD.
    pub precomputed: usize,
    /// Endpoint policies written this sync.
    pub changed: usize,
    /// Policies that fail closed, "namespace/name: why".
    pub failed: BTreeSet<String>,
}

pub struct Engine {
    node: String,
    sets: BTreeMap<Vec<Rule>, RuleSetEntry>,
    next_id: u32,
    started: bool,
}

/// A rule set that admits nothing: where rules cannot be expressed.
const CLOSED: &[Rule] = &[];

impl Engine {
    pub fn new(node: &str) -> Engine {
        Engine {
            node: node.to_owned(),
            sets: BTreeMap::new(),
            next_id: 1,
            started: false,
        }
    }

    fn intern(
        &mut self,
        rules: &[Rule],
        dp: &mut dyn PolicyTarget,
        failed: &mut BTreeSet<String>,
        who: &str,
    ) -> Result<RuleSetRef, DatapathError> {
        if let Some(e) = self.sets.get(rules) {
            return Ok(RuleSetRef {
                id: e.id,
                words: e.encoded.words,
            });
        }
        let (rules, encoded) = match encode(rules) {
            Ok(enc) => (rules.to_vec(), enc),
            Err(e) => {
                failed.insert(format!("{who}: {e}"));
                if let Some(closed) = self.sets.get(CLOSED) {
                    return Ok(RuleSetRef {
                        id: closed.id,
                        words: 0,
                    });
                }
                (Vec::new(), Encoded::default())
            }
        };
        let id = self.next_id;
        self.next_id += 1;
        dp.write_rule_set(id, &encoded)?;
        let r = RuleSetRef {
            id,
            words: encoded.words,
        };
        self.sets.insert(rules, RuleSetEntry { id, encoded });
        Ok(r)
    }

    /// Makes the maps match the view for every endpoint of this node.
    pub fn sync(
        &mut self,
        view: &mut View,
        dp: &mut dyn PolicyTarget,
    ) -> Result<SyncReport, DatapathError> {
        let current: BTreeMap<u32, EndpointPolicy> = dp.endpoint_policies()?.into_iter().collect();
        let current_pods: BTreeMap<(String, String), EndpointPolicy> = dp
            .pod_policies()?
            .into_iter()
            .map(|(ns, name, p)| ((ns, name), p))
            .collect();
        if !self.started {
            let top = current
                .values()
                .chain(current_pods.values())
                .flat_map(|p| [p.ingress, p.egress])
                .flatten()
                .map(|r| r.id)
                .max()
                .unwrap_or(0);
            self.next_id = self.next_id.max(top + 1);
        }
        let namespaces: BTreeSet<String> = view.policies.keys().map(|(ns, _)| ns.clone()).collect();
        dp.set_policy_namespaces(&namespaces)?;

        // Which pod each local endpoint serves: ADD's record, or else its
        // address among this node's pods.
        let endpoints = dp.endpoints()?;
        let mut by_ifindex: BTreeMap<u32, Vec<IpAddr>> = BTreeMap::new();
        for (ip, ifindex) in &endpoints {
            by_ifindex.entry(*ifindex).or_default().push(*ip);
        }
        // ADD's record comes first (an ADD in progress is programmed
        // before its endpoint is in the map); DEL removes it.
        let mut owner: BTreeMap<u32, (String, String)> = BTreeMap::new();
        for (ifindex, ns, name) in dp.pod_ids()? {
            owner.insert(ifindex, (ns, name));
        }
        for (key, pod) in &view.pods {
            if pod.node.as_deref() != Some(self.node.as_str()) || pod.host_network {
                continue;
            }
            for (ip, ifindex) in &endpoints {
                if pod.ips.contains(ip) {
                    owner.entry(*ifindex).or_insert_with(|| key.clone());
                }
            }
        }
        // A pod ADD just created is a peer before the API server knows
        // its address: take it from the endpoint.
        for (ifindex, key) in &owner {
            if let Some(pod) = view.pods.get_mut(key) {
                if pod.ips.is_empty() {
                    pod.ips = by_ifindex.get(ifindex).cloned().unwrap_or_default();
                }
            }
        }

        let mut report = SyncReport::default();
        // Each pod's policy, computed once: None where nothing isolates it.
        let mut computed: BTreeMap<(String, String), Option<EndpointPolicy>> = BTreeMap::new();
        let mut policy_of = |engine: &mut Engine,
                             key: &(String, String),
                             view: &View,
                             dp: &mut dyn PolicyTarget,
                             report: &mut SyncReport|
         -> Result<Option<EndpointPolicy>, DatapathError> {
            if let Some(p) = computed.get(key) {
                return Ok(*p);
            }
            let Some(pod) = view.pods.get(key) else {
                return Ok(None);
            };
            let rules = view.rules_for(pod);
            report.failed.extend(rules.failed.iter().cloned());
            let who = format!("{}/{}", key.0, key.1);
            let mut policy = None::<EndpointPolicy>;
            if let Some(r) = &rules.ingress {
                policy.get_or_insert_with(Default::default).ingress =
                    Some(engine.intern(r, dp, &mut report.failed, &who)?);
            }
            if let Some(r) = &rules.egress {
                policy.get_or_insert_with(Default::default).egress =
                    Some(engine.intern(r, dp, &mut report.failed, &who)?);
            }
            computed.insert(key.clone(), policy);
            Ok(policy)
        };
        // Each rule's peers are computed once for all the endpoints (the
        // view holds still meanwhile).
        let view: &View = view;
        let (wanted, wanted_pods) = view.batch(|view| -> Result<_, DatapathError> {
            let mut wanted: BTreeMap<u32, EndpointPolicy> = BTreeMap::new();
            for (ifindex, key) in &owner {
                if let Some(policy) = policy_of(self, key, view, dp, &mut report)? {
                    wanted.insert(*ifindex, policy);
                }
            }
            // Every pod scheduled here in a namespace with policies gets its
            // policy ahead of its sandbox: ADD copies it, and the endpoint is
            // never pending. Not isolated is said too (else ADD would wait).
            let mut wanted_pods: BTreeMap<(String, String), EndpointPolicy> = BTreeMap::new();
            let local: Vec<(String, String)> = view
                .pods
                .iter()
                .filter(|(_, p)| p.node.as_deref() == Some(self.node.as_str()) && !p.host_network)
                .filter(|(k, _)| namespaces.contains(&k.0))
                .map(|(k, _)| k.clone())
                .collect();
            for key in local {
                let policy = policy_of(self, &key, view, dp, &mut report)?.unwrap_or_default();
                wanted_pods.insert(key, policy);
            }
            Ok((wanted, wanted_pods))
        })?;

        for (key, policy) in &wanted_pods {
            if current_pods.get(key) != Some(policy) {
                dp.set_pod_policy(&key.0, &key.1, policy)?;
            }
        }
        for key in current_pods.keys() {
            if !wanted_pods.contains_key(key) {
                dp.remove_pod_policy(&key.0, &key.1)?;
            }
        }
        report.precomputed = wanted_pods.len();
        for (ifindex, policy) in &wanted {
            if current.get(ifindex) != Some(policy) {
                dp.set_endpoint(*ifindex, policy)?;
                report.changed += 1;
            }
        }
        for (ifindex, policy) in &current {
            if wanted.contains_key(ifindex) {
                continue;
            }
            // Pending, and its pod (or its endpoint) not seen yet: it stays
            // closed. Otherwise nothing selects it, or its veth is gone.
            if policy.pending {
                let known = owner
                    .get(ifindex)
                    .is_some_and(|key| view.pods.contains_key(key));
                if !known {
                    report.pending += 1;
                    continue;
                }
            }
            dp.remove_endpoint(*ifindex)?;
            report.changed += 1;
        }

        // Rule sets no endpoint uses any more.
        let used: BTreeSet<u32> = wanted
            .values()
            .chain(wanted_pods.values())
            .flat_map(|p| [p.ingress, p.egress])
            .flatten()
            .map(|r| r.id)
            .collect();
        let unused: Vec<Vec<Rule>> = self
            .sets
            .iter()
            .filter(|(_, e)| !used.contains(&e.id))
            .map(|(k, _)| k.clone())
            .collect();
        for k in unused {
            if let Some(e) = self.sets.remove(&k) {
                dp.remove_rule_set(e.id, &e.encoded)?;
            }
        }
        if !self.started {
            // What an earlier run left: everything not in use now.
            dp.remove_rule_sets_except(&used)?;
            self.started = true;
        }
        report.programmed = wanted.len();
        report.rule_sets = self.sets.len();
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::super::model::{NamespaceInfo, PodInfo, PolicyInfo};
    use super::*;
    use serde_json::json;

    /// The maps, in memory.
    #[derive(Default)]
    struct Fake {
        endpoints: Vec<(IpAddr, u32)>,
        pod_ids: Vec<(u32, String, String)>,
        eppol: BTreeMap<u32, EndpointPolicy>,
        sets: BTreeMap<u32, Encoded>,
        namespaces: BTreeSet<String>,
        pod_policies: BTreeMap<(String, String), EndpointPolicy>,
        /// Every set an endpoint pointed at existed when it did.
        dangling: usize,
    }

    impl PolicyTarget for Fake {
        fn pod_policies(&self) -> Result<Vec<(String, String, EndpointPolicy)>, DatapathError> {
            Ok(self
                .pod_policies
                .iter()
                .map(|((ns, n), p)| (ns.clone(), n.clone(), *p))
                .collect())
        }
        fn set_pod_policy(
            &mut self,
            namespace: &str,
            name: &str,
            p: &EndpointPolicy,
        ) -> Result<(), DatapathError> {
            for r in [p.ingress, p.egress].into_iter().flatten() {
                assert!(self.sets.contains_key(&r.id), "pod policy before its set");
            }
            self.pod_policies
                .insert((namespace.into(), name.into()), *p);
            Ok(())
        }
        fn remove_pod_policy(&mut self, namespace: &str, name: &str) -> Result<(), DatapathError> {
            self.pod_policies.remove(&(namespace.into(), name.into()));
            Ok(())
        }
        fn endpoints(&self) -> Result<Vec<(IpAddr, u32)>, DatapathError> {
            Ok(self.endpoints.clone())
        }
        fn pod_ids(&self) -> Result<Vec<(u32, String, String)>, DatapathError> {
            Ok(self.pod_ids.clone())
        }
        fn endpoint_policies(&self) -> Result<Vec<(u32, EndpointPolicy)>, DatapathError> {
            Ok(self.eppol.iter().map(|(k, v)| (*k, *v)).collect())
        }
        fn write_rule_set(&mut self, id: u32, set: &Encoded) -> Result<(), DatapathError> {
            assert!(
                self.sets.insert(id, set.clone()).is_none(),
                "id {id} reused"
            );
            Ok(())
        }
        fn remove_rule_set(&mut self, id: u32, _: &Encoded) -> Result<(), DatapathError> {
            assert!(
                !self
                    .eppol
                    .values()
                    .flat_map(|p| [p.ingress, p.egress])
                    .flatten()
                    .any(|r| r.id == id),
                "set {id} removed while in use"
            );
            self.sets.remove(&id);
            Ok(())
        }
        fn remove_rule_sets_except(
            &mut self,
            keep: &BTreeSet<u32>,
        ) -> Result<usize, DatapathError> {
            let before = self.sets.len();
            self.sets.retain(|id, _| keep.contains(id));
            Ok(before - self.sets.len())
        }
        fn set_endpoint(&mut self, ifindex: u32, p: &EndpointPolicy) -> Result<(), DatapathError> {
            for r in [p.ingress, p.egress].into_iter().flatten() {
                if !self.sets.contains_key(&r.id) {
                    self.dangling += 1;
                }
            }
            self.eppol.insert(ifindex, *p);
            Ok(())
        }
        fn remove_endpoint(&mut self, ifindex: u32) -> Result<(), DatapathError> {
            self.eppol.remove(&ifindex);
            Ok(())
        }
        fn set_policy_namespaces(&mut self, ns: &BTreeSet<String>) -> Result<(), DatapathError> {
            self.namespaces = ns.clone();
            Ok(())
        }
    }

    fn pod(ns: &str, name: &str, node: &str, ip: Option<&str>, app: &str) -> PodInfo {
        PodInfo {
            namespace: ns.into(),
            name: name.into(),
            node: Some(node.into()),
            labels: [("app".to_string(), app.to_string())].into(),
            ips: ip.map(|i| i.parse().unwrap()).into_iter().collect(),
            host_network: false,
            ports: vec![],
        }
    }

    fn put_policy(v: &mut View, p: serde_json::Value) {
        let info = PolicyInfo::from_api(&serde_json::from_value(p).unwrap());
        v.policies
            .insert((info.namespace.clone(), info.name.clone()), info);
    }

    fn setup() -> (View, Fake) {
        let mut v = View::default();
        v.namespaces.insert(
            "x".into(),
            NamespaceInfo {
                name: "x".into(),
                labels: Default::default(),
            },
        );
        for (name, node, ip, app) in [
            ("a", "n1", "10.0.1.2", "web"),
            ("b", "n1", "10.0.1.3", "web"),
            ("c", "n2", "10.0.2.2", "db"),
        ] {
            v.pods.insert(
                ("x".into(), name.into()),
                pod("x", name, node, Some(ip), app),
            );
        }
        let fake = Fake {
            endpoints: vec![
                ("10.0.1.2".parse().unwrap(), 11),
                ("10.0.1.3".parse().unwrap(), 12),
            ],
            ..Fake::default()
        };
        (v, fake)
    }

    #[test]
    fn endpoints_with_the_same_rules_share_a_set_and_changes_switch_whole() {
        let (mut v, mut dp) = setup();
        let mut e = Engine::new("n1");
        let r = e.sync(&mut v, &mut dp).unwrap();
        assert_eq!((r.programmed, r.rule_sets), (0, 0), "no policy: no entries");

        put_policy(
            &mut v,
            json!({"metadata": {"name": "db-only", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}},
                     "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "db"}}}], "ports": [{"port": 5432}]}]}}),
        );
        let r = e.sync(&mut v, &mut dp).unwrap();
        assert_eq!((r.programmed, r.rule_sets, r.changed), (2, 1, 2));
        assert_eq!(dp.eppol[&11], dp.eppol[&12]);
        assert!(dp.namespaces.contains("x"));
        let first = dp.eppol[&11].ingress.unwrap().id;

        // c moves: the rules change, a new set replaces the old one.
        v.pods
            .get_mut(&("x".to_string(), "c".to_string()))
            .unwrap()
            .ips = vec!["10.0.2.9".parse().unwrap()];
        let r = e.sync(&mut v, &mut dp).unwrap();
        assert_eq!(r.rule_sets, 1);
        let second = dp.eppol[&11].ingress.unwrap().id;
        assert_ne!(first, second);
        assert!(!dp.sets.contains_key(&first), "the old set went");
        assert_eq!(dp.dangling, 0);

        // Nothing changed: nothing written.
        assert_eq!(e.sync(&mut v, &mut dp).unwrap().changed, 0);

        // The policy goes: the entries go.
        v.policies.clear();
        let r = e.sync(&mut v, &mut dp).unwrap();
        assert_eq!((r.programmed, r.rule_sets), (0, 0));
        assert!(dp.eppol.is_empty() && dp.sets.is_empty() && dp.namespaces.is_empty());
    }

    #[test]
    fn a_new_pod_is_programmed_from_adds_record_before_the_api_has_its_address() {
        let (mut v, mut dp) = setup();
        put_policy(
            &mut v,
            json!({"metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}}}),
        );
        v.pods.insert(
            ("x".into(), "new".into()),
            pod("x", "new", "n1", None, "web"),
        );
        dp.endpoints.push(("10.0.1.7".parse().unwrap(), 17));
        dp.pod_ids.push((17, "x".into(), "new".into()));
        dp.eppol.insert(17, EndpointPolicy::PENDING);
        let mut e = Engine::new("n1");
        let r = e.sync(&mut v, &mut dp).unwrap();
        let p = dp.eppol[&17];
        assert!(!p.pending && p.ingress.is_some());
        assert_eq!(r.pending, 0);
        // Its address is known to the view now, as a peer.
        assert_eq!(
            v.pods[&("x".to_string(), "new".to_string())].ips,
            vec!["10.0.1.7".parse::<IpAddr>().unwrap()]
        );

        // A pending endpoint whose pod the view has not seen stays closed.
        dp.endpoints.push(("10.0.1.8".parse().unwrap(), 18));
        dp.pod_ids.push((18, "x".into(), "unseen".into()));
        dp.eppol.insert(18, EndpointPolicy::PENDING);
        let r = e.sync(&mut v, &mut dp).unwrap();
        assert_eq!(r.pending, 1);
        assert!(dp.eppol[&18].pending);
    }

    #[test]
    fn a_restarted_agent_starts_above_old_ids_and_clears_what_it_left() {
        let (mut v, mut dp) = setup();
        put_policy(
            &mut v,
            json!({"metadata": {"name": "deny", "namespace": "x"}, "spec": {"podSelector": {}}}),
        );
        let mut first = Engine::new("n1");
        first.sync(&mut v, &mut dp).unwrap();
        let old = dp.eppol[&11].ingress.unwrap().id;
        // A leftover set of some earlier run.
        dp.sets.insert(99, Encoded::default());
        dp.eppol.insert(
            12,
            EndpointPolicy {
                ingress: Some(RuleSetRef { id: 99, words: 0 }),
                egress: None,
                pending: false,
            },
        );

        let mut second = Engine::new("n1");
        second.sync(&mut v, &mut dp).unwrap();
        let new = dp.eppol[&11].ingress.unwrap().id;
        assert!(new > 99 && new != old);
        assert_eq!(dp.sets.keys().copied().collect::<Vec<_>>(), vec![new]);
        assert_eq!(dp.dangling, 0);
    }

    #[test]
    fn too_many_rules_fail_closed() {
        let (mut v, mut dp) = setup();
        // 1,100 ipBlocks on distinct ports: more rules than a set holds.
        let rules: Vec<serde_json::Value> = (0..1100)
            .map(|i| json!({"from": [{"ipBlock": {"cidr": format!("10.9.{}.{}/32", i / 256, i % 256)}}], "ports": [{"port": 1000 + i}]}))
            .collect();
        put_policy(
            &mut v,
            json!({"metadata": {"name": "huge", "namespace": "x"},
            "spec": {"podSelector": {"matchLabels": {"app": "web"}}, "ingress": rules}}),
        );
        let mut e = Engine::new("n1");
        let r = e.sync(&mut v, &mut dp).unwrap();
        assert_eq!(r.failed.len(), 2, "{:?}", r.failed);
        let p = dp.eppol[&11].ingress.unwrap();
        assert_eq!(p.words, 0, "isolated, nothing allowed");
    }

    #[test]
    fn pods_scheduled_here_get_their_policy_before_their_add() {
        let (mut v, mut dp) = setup();
        // d is scheduled to n1 but has no sandbox yet; y has no policy.
        v.pods
            .insert(("x".into(), "d".into()), pod("x", "d", "n1", None, "db"));
        v.pods
            .insert(("y".into(), "e".into()), pod("y", "e", "n1", None, "web"));
        put_policy(
            &mut v,
            json!({"metadata": {"namespace": "x", "name": "web"},
                   "spec": {"podSelector": {"matchLabels": {"app": "web"}}}}),
        );
        let mut e = Engine::new("n1");
        let r = e.sync(&mut v, &mut dp).unwrap();
        assert_eq!(
            r.precomputed, 3,
            "a, b and d of x on n1; not c (n2), not e (y)"
        );
        let key = |n: &str| ("x".to_string(), n.to_string());
        let web = dp.pod_policies[&key("a")];
        assert!(web.ingress.is_some() && !web.pending);
        assert_eq!(dp.pod_policies[&key("b")], web, "same rules, same set");
        assert_eq!(
            dp.pod_policies[&key("d")],
            EndpointPolicy::default(),
            "d: not isolated, and said so (ADD must not wait)"
        );
        assert!(!dp.pod_policies.contains_key(&("y".into(), "e".into())));

        // ADD of d copies its policy; the next sync agrees and changes nothing.
        dp.endpoints.push(("10.0.1.9".parse().unwrap(), 13));
        dp.pod_ids.push((13, "x".into(), "d".into()));
        dp.eppol.insert(13, dp.pod_policies[&key("d")]);
        let r = e.sync(&mut v, &mut dp).unwrap();
        assert_eq!(r.changed, 1, "only the empty entry of d goes");
        assert!(!dp.eppol.contains_key(&13));

        // The policy goes: so do the computed ones, and its set.
        v.policies.clear();
        e.sync(&mut v, &mut dp).unwrap();
        assert!(dp.pod_policies.is_empty());
        assert!(dp.sets.is_empty());
    }
}
