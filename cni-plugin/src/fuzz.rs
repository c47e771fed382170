//! Property tests over the parsers that read untrusted input: the network
//! configuration, CNI_ARGS and prevResult. A small deterministic mutator
//! (no extra crates) derives thousands of inputs from valid seeds; the
//! properties are "never panics" and "a failure is a CNI error with the
//! right code". FERRITE_FUZZ_RUNS raises the count for a longer run.

use std::collections::HashMap;

use crate::config::{parse_cni_args, NetConf};
use crate::error::Code;
use crate::plugin::dispatch;
use crate::result::CniOutput;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: &[&str] = &[
    "",
    "\"",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "-1",
    "0",
    "1e309",
    "4294967296",
    "\"\\u0000\"",
    "\"../../etc\"",
    "\"10.0.0.0/33\"",
    "\"::/0\"",
    "\"fe80::1/64\"",
    "[[]]",
    "{}",
    "\"1.1.0\"",
    "\"0.2.0\"",
    "\u{feff}",
    "\u{1f600}",
];

fn runs() -> usize {
    std::env::var("FERRITE_FUZZ_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3000)
}

fn mutate(rng: &mut Rng, seed: &[u8]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for _ in 0..=rng.below(4) {
        match rng.below(5) {
            0 if !v.is_empty() => {
                let i = rng.below(v.len());
                v[i] = rng.next() as u8;
            }
            1 if !v.is_empty() => {
                let i = rng.below(v.len());
                let n = rng.below(8).min(v.len() - i);
                v.drain(i..i + n);
            }
            2 => {
                let i = rng.below(v.len() + 1);
                let s = INTERESTING[rng.below(INTERESTING.len())].as_bytes();
                v.splice(i..i, s.iter().copied());
            }
            3 if !v.is_empty() => {
                let i = rng.below(v.len());
                let j = rng.below(v.len());
                let (a, b) = (i.min(j), i.max(j));
                let chunk = v[a..b].to_vec();
                v.splice(b..b, chunk);
            }
            _ => v.truncate(rng.below(v.len() + 1)),
        }
    }
    v
}

const CONF_SEEDS: &[&str] = &[
    r#"{"cniVersion":"1.1.0","name":"n","type":"ferrite","mtu":1500,"ipam":{"ranges":[[{"subnet":"10.1.0.0/24","rangeStart":"10.1.0.10","rangeEnd":"10.1.0.20","gateway":"10.1.0.1"}],[{"subnet":"fd00::/64"}]]},"bpffsRoot":"/sys/fs/bpf/x","stateDir":"/var/lib/x","logLevel":"debug","runtimeConfig":{"ips":["10.1.0.12/24"],"bandwidth":{"ingressRate":1000000,"egressRate":2000000}},"args":{"cni":{"ips":["10.1.0.13"]}}}"#,
    r#"{"cniVersions":["0.4.0","1.0.0"],"name":"n","ipam":{"type":"host-local","subnet":"10.0.0.0/8"},"prevResult":{"cniVersion":"1.0.0","interfaces":[{"name":"eth0","sandbox":"/x"}],"ips":[{"address":"10.0.0.2/32","interface":0}]}}"#,
    r#"{"cniVersion":"1.1.0","name":"n","ipam":{"subnet":"10.0.0.0/30"},"cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}"#,
];

#[test]
fn config_parser_never_panics_and_classifies_errors() {
    let mut rng = Rng(0x5eed_0001);
    let mut outcomes = [0usize; 3];
    for i in 0..runs() {
        let input = mutate(&mut rng, CONF_SEEDS[i % CONF_SEEDS.len()].as_bytes());
        match NetConf::parse(&input) {
            Ok(conf) => {
                outcomes[0] += 1;
                // A configuration that parses may still carry a bad pool;
                // that too must be a clean error.
                if let Err(e) = conf.pool() {
                    assert_eq!(e.code, Code::InvalidConfig, "{e}");
                }
            }
            Err(e) => {
                outcomes[1] += 1;
                assert!(
                    matches!(
                        e.code,
                        Code::Decode | Code::InvalidConfig | Code::IncompatibleVersion
                    ),
                    "unexpected code for {:?}: {e}",
                    String::from_utf8_lossy(&input)
                );
                assert!(!e.msg.is_empty());
            }
        }
        outcomes[2] += 1;
    }
    eprintln!(
        "config fuzz: {} inputs, {} parsed, {} rejected",
        outcomes[2], outcomes[0], outcomes[1]
    );
    assert!(
        outcomes[0] > 0 && outcomes[1] > 0,
        "the mutator should reach both outcomes"
    );
}

#[test]
fn cni_args_parser_never_panics() {
    let mut rng = Rng(0x5eed_0002);
    let seed = b"IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=web-0;IP=10.1.0.5,fd00::5";
    let (mut ok, mut bad) = (0, 0);
    for _ in 0..runs() {
        let input = mutate(&mut rng, seed);
        let s = String::from_utf8_lossy(&input);
        match parse_cni_args(&s) {
            Ok(args) => {
                ok += 1;
                assert!(args.pairs.iter().all(|(k, _)| !k.is_empty()));
            }
            Err(e) => {
                bad += 1;
                assert_eq!(e.code, Code::InvalidEnvironment, "{s:?}: {e}");
            }
        }
    }
    eprintln!(
        "CNI_ARGS fuzz: {} inputs, {ok} parsed, {bad} rejected",
        ok + bad
    );
}

#[test]
fn prev_result_parser_never_panics() {
    let mut rng = Rng(0x5eed_0003);
    let seed = br#"{"cniVersion":"0.4.0","interfaces":[{"name":"ferab","mac":"02:00:00:00:00:01"},{"name":"eth0","mac":"02:00:00:00:00:02","sandbox":"/run/netns/x"}],"ips":[{"version":"4","address":"10.1.0.5/32","gateway":"169.254.1.1","interface":1},{"address":"fd00::5/128","interface":1}],"routes":[{"dst":"0.0.0.0/0","gw":"169.254.1.1"}],"dns":{"nameservers":["10.96.0.10"]}}"#;
    let (mut ok, mut bad) = (0, 0);
    for _ in 0..runs() {
        let input = mutate(&mut rng, seed);
        let Ok(value) = serde_json::from_slice::<serde_json::Value>(&input) else {
            bad += 1;
            continue;
        };
        match CniOutput::from_json(&value) {
            Ok(r) => {
                ok += 1;
                assert!(r
                    .ips
                    .iter()
                    .all(|ip| ip.interface.is_none_or(|i| i < r.interfaces.len())));
            }
            Err(e) => {
                bad += 1;
                assert_eq!(e.code, Code::InvalidConfig);
            }
        }
    }
    eprintln!(
        "prevResult fuzz: {} inputs, {ok} parsed, {bad} rejected",
        ok + bad
    );
}

/// The whole protocol entry with mutated environment and stdin, for
/// commands that cannot touch the host (VERSION, and the others with an
/// environment that fails validation before anything is done).
#[test]
fn dispatch_always_answers_one_json_error_or_version() {
    let mut rng = Rng(0x5eed_0004);
    for i in 0..runs() / 3 {
        let stdin = mutate(&mut rng, CONF_SEEDS[i % CONF_SEEDS.len()].as_bytes());
        let id = String::from_utf8_lossy(&mutate(&mut rng, b"../bad id")).into_owned();
        let mut env: HashMap<String, String> = HashMap::new();
        let cmd = ["VERSION", "ADD", "DEL", "CHECK", "BOGUS"][rng.below(5)];
        env.insert("CNI_COMMAND".into(), cmd.into());
        env.insert("CNI_CONTAINERID".into(), format!("/{id}"));
        env.insert("CNI_IFNAME".into(), "eth0".into());
        let out = dispatch(&env, &stdin, false);
        let v = out.stdout.expect("always one JSON document");
        if cmd == "VERSION" {
            assert_eq!(out.exit, 0);
            assert!(v["supportedVersions"].is_array());
        } else {
            assert_eq!(out.exit, 1, "{cmd} with a bad container id must fail: {v}");
            let code = v["code"].as_u64().unwrap();
            assert!([1, 4, 6, 7].contains(&code), "{cmd}: {v}");
        }
    }
}
